"""The engine inside this process: what `vllm-mlx-bench` (and the Python API)
run, with the server's own parts minus gRPC and the second process.

A request goes through the front end's RequestBuilder (validation, chat
template, media placeholders), its media through the media workers'
`prepare_item` (source guards, decoding, the model's processor), the core's
Loop on a thread of its own, and the front end's TokenStream (detokenizing,
stop strings). Only the transport differs from the server's path.
"""

import asyncio
import atexit
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine_worker.loop import Loop
from engine_worker.media_client import MediaRefused, PreparedItem
from engine_worker.model import load_model, load_tokenizer, read_facts
from engine_worker.request_builder import RequestBuilder
from engine_worker.text_output import TokenStream
from vllm_mlx.ipc.shared_tensors import take, unlink, write_segment
from vllm_mlx.settings import EngineSettings, MediaSettings
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import media_pb2 as mpb


class LocalMedia:
    """The media client's `prepare`, done here: the same preparation as a
    media worker's, item by item on a worker thread."""

    def __init__(self, model_path: str, settings: MediaSettings):
        # Imported here: text models never need the decoders (PyAV, Pillow).
        from media_worker.prepare import PreparedCache
        from media_worker.processor import Preprocessor

        self.settings = settings
        self.preprocessor = Preprocessor(model_path)
        self.cache = PreparedCache()

    async def prepare(self, request_id: str, sources: list[mpb.MediaSource],
                      timeout: float | None) -> list[PreparedItem]:
        from media_worker.errors import MediaError
        from media_worker.prepare import prepare_item

        items: list[PreparedItem] = []
        try:
            for i, source in enumerate(sources):
                try:
                    r = await asyncio.to_thread(prepare_item, source, self.settings,
                                                self.preprocessor, self.cache)
                except MediaError as e:
                    raise MediaRefused(i, str(e)) from None
                segment, layout = write_segment(r.tensors)
                items.append(PreparedItem(segment, layout, r.nbytes, r.placeholder_token_id,
                                          r.token_ids, r.frames, r.content_hash))
        except BaseException:
            for it in items:
                unlink(it.segment)
            raise
        return items


@dataclass
class Delta:
    """What one publish of the loop brought a request."""
    time: float  # time.perf_counter() when the loop published it
    token_ids: list[int]
    text: str


@dataclass
class Generation:
    """One request in flight; iterating yields its deltas until it finishes."""
    request_id: str
    prompt_tokens: int
    submitted: float  # time.perf_counter()
    stream: TokenStream
    _outputs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _engine: "InProcessEngine | None" = field(default=None, repr=False)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    def deliver(self, when: float, outputs: list) -> None:
        """The loop's thread hands over this request's outputs of one step."""
        self._outputs.put((when, outputs))

    def __iter__(self) -> Iterator[Delta]:
        while self.finish_reason is None:
            when, outputs = self._outputs.get()
            while not self._outputs.empty():  # whatever else already arrived
                outputs += self._outputs.get()[1]
            ids, text, _ = self.stream.take(outputs)
            self.token_ids += ids
            self.text += text
            if self.stream.stopped_by_string:
                self._engine.loop.abort(self.request_id, keep_kv=True)
            if ids or text:
                yield Delta(when, ids, text)
        if self.stream.finish_reason == "error":
            raise RuntimeError(f"the engine failed the request: {self.stream.error}")
        self._engine.forget(self.request_id)

    def wait(self) -> "Generation":
        for _ in self:
            pass
        return self


class InProcessEngine:
    def __init__(self, model_path: str, settings: EngineSettings | None = None,
                 media: MediaSettings | None = None):
        """`model_path`: a resolved local model folder. Vision-language models
        (detected from config.json, or settings.mllm) prepare media here with
        `media`'s limits."""
        settings = settings or EngineSettings(model=model_path)
        self.facts = read_facts(model_path, settings.served_model_name,
                                settings.max_model_len, settings.mllm)
        self.tokenizer = load_tokenizer(self.facts)
        local_media = (LocalMedia(model_path, media or MediaSettings(model=model_path))
                       if self.facts.vision else None)
        self.builder = RequestBuilder(self.facts, self.tokenizer, local_media)
        self._requests: dict[str, Generation] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.loop = Loop(settings, lambda s: load_model(self.facts), self._publish)
        self.loop.start()
        # The loop's thread must end before the interpreter does (Loop._run).
        atexit.register(self.close)
        self.loop.ready.wait()
        if self.loop.load_error is not None:
            raise RuntimeError(f"could not load {model_path}: {self.loop.load_error}")

    @property
    def stats(self) -> pb.Stats:
        return self.loop.stats

    def generate(self, request: pb.GenerateRequest) -> Generation:
        """Submit one request; InvalidRequest (request_builder) if the engine
        refuses it, as the server would."""
        rid = request.request_id or f"local-{next(self._ids)}"
        media = []
        if self.builder.media is not None:
            media = asyncio.run(self.builder.prepare_media(request, rid, None))
        try:
            r = self.builder.build(request, rid, self.loop.memory, media)
            if media:
                r.media = take(r.media)
        finally:
            for it in media:
                unlink(it.segment)
        stream = self.builder.token_stream(request, r, None)
        gen = Generation(rid, len(r.prompt), time.perf_counter(), stream, _engine=self)
        with self._lock:
            self._requests[rid] = gen
        self.loop.submit(r)
        return gen

    def _publish(self, outputs) -> None:
        now = time.perf_counter()
        by_request: dict[str, list] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        with self._lock:
            for rid, outs in by_request.items():
                gen = self._requests.get(rid)
                if gen is not None:
                    gen.deliver(now, outs)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def close(self) -> None:
        atexit.unregister(self.close)
        self.loop.stop()
