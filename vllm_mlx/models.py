"""The Python API: models in this process, as the seed documents them.

    model = MLXLanguageModel("mlx-community/Llama-3.2-3B-Instruct-4bit")
    model.load()
    print(model.generate("The capital of France is", max_tokens=20).text)
    for chunk in model.stream_generate("Tell me a story"):
        print(chunk.text, end="")
    print(model.chat([{"role": "user", "content": "Hello"}]).text)
    # Output that follows a JSON Schema (or regex=, choice=, grammar=, json_object=True),
    # enforced as the server enforces response_format:
    print(model.chat(messages, json_schema={"type": "object", ...}).text)

Both classes run the server's own engine (vllm_mlx/in_process.py): the same
request checks, chat templates, samplers, continuous batching and prefix
cache, without gRPC. Model names resolve as `vllm-mlx-up` resolves them.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import media_pb2 as mpb


@dataclass
class GenerationOutput:
    text: str
    tokens: list[int]
    finish_reason: str | None  # stop, length
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class StreamChunk:
    text: str
    tokens: list[int]
    finish_reason: str | None = None  # set on the last chunk


class MLXLanguageModel:
    def __init__(self, model_name: str | None = None, *, max_num_seqs: int = 64,
                 prefix_cache: bool = True, mllm: bool = False):
        """`model_name`: a local folder, Hugging Face repo, .gguf file, or None
        for the embedded default (SmolLM2-135M-Instruct)."""
        self.model_name = model_name
        self._options = {"max_num_seqs": max_num_seqs, "prefix_cache": prefix_cache,
                         "mllm": mllm}
        self._engine = None

    def load(self) -> "MLXLanguageModel":
        if self._engine is None:
            from vllm_mlx.in_process import InProcessEngine
            from vllm_mlx.model_files.model_source import resolve_for_serving
            from vllm_mlx.settings import EngineSettings, MediaSettings

            path = str(resolve_for_serving(self.model_name, self._options["mllm"]))
            settings = EngineSettings(model=path, **self._options)
            # The caller owns this process: its own files may be read.
            media = MediaSettings(model=path, allowed_local_media_paths=("/",))
            self._engine = InProcessEngine(path, settings, media)
        return self

    @property
    def engine(self):
        if self._engine is None:
            raise RuntimeError("call load() first")
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> "MLXLanguageModel":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text in, text out -------------------------------------------------------

    def generate(self, prompt: str, **sampling) -> GenerationOutput:
        """Continue `prompt` as it is (no chat template)."""
        return self._wait(self._submit(pb.GenerateRequest(text=prompt), sampling))

    def stream_generate(self, prompt: str, **sampling) -> Iterator[StreamChunk]:
        return self._stream(self._submit(pb.GenerateRequest(text=prompt), sampling))

    def chat(self, messages: Sequence[dict], **sampling) -> GenerationOutput:
        """A reply to `messages` ({"role", "content"} dicts) through the
        model's chat template."""
        return self._wait(self._submit(_chat_request(messages), sampling))

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[StreamChunk]:
        return self._stream(self._submit(_chat_request(messages), sampling))

    def batch_generate(self, prompts: Sequence[str], **sampling) -> list[GenerationOutput]:
        """All prompts decoded together in one continuous batch."""
        gens = [self._submit(pb.GenerateRequest(text=p), sampling) for p in prompts]
        return [self._wait(g) for g in gens]

    # -- shared ------------------------------------------------------------------

    def _submit(self, request: pb.GenerateRequest, sampling: dict):
        _apply(request, **sampling)
        return self.engine.generate(request)

    @staticmethod
    def _wait(gen) -> GenerationOutput:
        gen.wait()
        return GenerationOutput(gen.text, gen.token_ids, gen.finish_reason,
                                {"prompt_tokens": gen.prompt_tokens,
                                 "completion_tokens": len(gen.token_ids),
                                 "total_tokens": gen.prompt_tokens + len(gen.token_ids)})

    @staticmethod
    def _stream(gen) -> Iterator[StreamChunk]:
        for delta in gen:
            yield StreamChunk(delta.text, delta.token_ids)
        yield StreamChunk("", [], gen.finish_reason)


class MLXVisionLanguageModel(MLXLanguageModel):
    """Images and videos (paths, http(s) or data: URLs) go through the media
    workers' own decoding and guards, in this process."""

    def __init__(self, model_name: str, **options):
        super().__init__(model_name, mllm=True, **options)

    def generate(self, prompt: str, images: Sequence[str] = (), videos: Sequence[str] = (),
                 video_fps: float | None = None, video_max_frames: int | None = None,
                 **sampling) -> GenerationOutput:
        parts = [pb.ContentPart(media=_media(mpb.MEDIA_KIND_IMAGE, i)) for i in images]
        parts += [pb.ContentPart(media=_media(mpb.MEDIA_KIND_VIDEO, v, video_fps,
                                              video_max_frames)) for v in videos]
        parts.append(pb.ContentPart(text=prompt))
        request = pb.GenerateRequest(chat=pb.ChatInput(
            messages=[pb.ChatMessage(role="user", parts=parts)], add_generation_prompt=True))
        return self._wait(self._submit(request, sampling))

    def describe_image(self, image: str, **sampling) -> str:
        return self.generate("Describe this image.", images=[image], **sampling).text

    def answer_about_image(self, image: str, question: str, **sampling) -> str:
        return self.generate(question, images=[image], **sampling).text

    def describe_video(self, video: str, fps: float | None = None, **sampling) -> str:
        return self.generate("Describe what happens in this video.", videos=[video],
                             video_fps=fps, **sampling).text


def _media(kind: int, source: str, fps: float | None = None,
           max_frames: int | None = None) -> mpb.MediaSource:
    m = mpb.MediaSource(kind=kind, fps=fps or 0, max_frames=max_frames or 0)
    if source.startswith(("http://", "https://", "data:", "file://")):
        m.url = source
    else:
        m.path = str(Path(source).expanduser().resolve())
    return m


def _chat_request(messages: Sequence[dict]) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatInput(
        messages=[pb.ChatMessage(role=m["role"], content=m.get("content") or "")
                  for m in messages], add_generation_prompt=True))


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed")


def _apply(request: pb.GenerateRequest, max_tokens: int = 256,
           stop: str | Sequence[str] | None = None, *, json_schema: dict | None = None,
           json_object: bool = False, regex: str | None = None,
           choice: Sequence[str] | None = None, grammar: str | None = None,
           **sampling) -> None:
    """The keyword arguments onto the request; an unknown one is a TypeError,
    never ignored. At most one of json_schema, json_object, regex, choice and
    grammar (Lark or GBNF) constrains the output."""
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
    constraints = {"json_schema": json_schema is not None and json.dumps(json_schema),
                   "json_object": json_object, "regex": regex, "grammar": grammar}
    given = [k for k, v in constraints.items() if v] + (["choice"] if choice else [])
    if len(given) > 1:
        raise TypeError(f"give one output constraint, not {' and '.join(given)}")
    so = request.structured_output
    for name, value in constraints.items():
        if value:
            setattr(so, name, value)
    if choice:
        so.choice.options.extend(choice)
    request.max_tokens = max_tokens
    if stop:
        request.stop.extend([stop] if isinstance(stop, str) else stop)
    for name, value in sampling.items():
        if value is not None:
            setattr(request.sampling, name, value)
