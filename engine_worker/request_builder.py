"""A GenerateRequest into the core's `messages.Request`: the prompt's token ids
(text, token ids, or chat messages through the chat template), its media
prepared by the media workers and their placeholders expanded, and every
field checked against the model and the memory budget.

What the request gets wrong is raised as `InvalidRequest`, carrying the
ErrorCode and the GenerateRequest field at fault as data (errors.proto), so
that the servicer fails the call with an ErrorInfo and nobody downstream
has to read the message."""

import json

from engine_worker.media_client import MediaClient, MediaRefused, PreparedItem
from engine_worker.memory import MemoryBudget
from engine_worker.messages import Request
from engine_worker.model import ModelFacts
from engine_worker.sampling import SamplingError, SamplingParams
from vllm_mlx.ipc.shared_tensors import SharedTensors
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import errors_pb2 as epb
from vllm_mlx.v1 import media_pb2 as mpb
from vllm_mlx.vision_families import FAMILIES

MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
# transformers' apply_chat_template's own parameters, and the tokenizer
# arguments it forwards: never template variables (tools and documents are:
# the template renders them).
TOKENIZER_ARGUMENTS = frozenset({
    "conversation", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "add_special_tokens", "pad_to_multiple_of", "return_attention_mask",
    "return_token_type_ids", "stride", "verbose", "split_special_tokens", "padding_side"})
MEDIA_PART_TYPES = {mpb.MEDIA_KIND_IMAGE: "image", mpb.MEDIA_KIND_VIDEO: "video"}


class InvalidRequest(ValueError):
    """A request the engine refuses: `code` (an ErrorCode) says why, `field`
    which GenerateRequest field (a path: "sampling.top_p",
    "chat.messages[2].parts[1]"; "" for none), `item` which media part."""

    def __init__(self, message: str, field: str = "",
                 code: int = epb.ERROR_CODE_INVALID_ARGUMENT, item: int | None = None):
        super().__init__(message)
        self.field = field
        self.code = code
        self.item = item


def part_field(message: int, part: int) -> str:
    return f"chat.messages[{message}].parts[{part}]"


def media_parts(request: pb.GenerateRequest) -> list[tuple[int, int, mpb.MediaSource]]:
    """(message index, part index, source) of each media part, in prompt order."""
    if request.WhichOneof("input") != "chat":
        return []
    return [(i, j, part.media) for i, m in enumerate(request.chat.messages)
            for j, part in enumerate(m.parts) if part.WhichOneof("part") == "media"]


def expand_placeholders(ids: list[int], items: list[PreparedItem]) -> list[int]:
    """Each item's placeholder token, as the chat template renders it, becomes the
    item's tokens; items of a family whose template renders none (placeholder 0)
    go before the whole prompt, in order."""
    out = [t for it in items if not it.placeholder_token_id for t in it.token_ids]
    placed = [it for it in items if it.placeholder_token_id]
    placeholders = {it.placeholder_token_id for it in placed}
    k = 0
    for t in ids:
        if t not in placeholders:
            out.append(t)
            continue
        if k >= len(placed) or placed[k].placeholder_token_id != t:
            raise InvalidRequest("the prompt's image/video placeholders do not match its "
                                 "media parts (is a placeholder token written in the text?)",
                                 "chat.messages")
        out += placed[k].token_ids
        k += 1
    if k != len(placed):
        raise InvalidRequest(f"the chat template placed {k} of the {len(placed)} media parts",
                             "chat.messages")
    return out


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    values = {f: getattr(p, f) for f in ("temperature", "top_p", "top_k", "min_p",
                                          "repetition_penalty", "presence_penalty",
                                          "frequency_penalty", "seed", "penalty_context_size")
              if p.HasField(f)}
    return SamplingParams(**{**defaults.__dict__, **values, "logit_bias": dict(p.logit_bias)})


def validate_sampling(params: SamplingParams, vocab_size: int) -> None:
    """SamplingParams.validate, refusals naming the field at fault."""
    try:
        params.validate(vocab_size)
    except SamplingError as e:
        raise InvalidRequest(str(e), f"sampling.{e.field}") from e


def _content(m: pb.ChatMessage) -> list[dict]:
    """A message's parts as the chat template's content list: text parts, and
    an {"type": "image"} or {"type": "video"} entry where each medium goes."""
    content = []
    for part in m.parts:
        if part.WhichOneof("part") == "text":
            content.append({"type": "text", "text": part.text})
        elif part.WhichOneof("part") == "media":
            content.append({"type": MEDIA_PART_TYPES.get(part.media.kind, "image")})
    return content


class RequestBuilder:
    """Builds and checks the requests of one model (its facts and tokenizer);
    `media` prepares images and videos (None: a text-only model)."""

    def __init__(self, facts: ModelFacts, tokenizer, media: MediaClient | None):
        self.facts = facts
        self.tokenizer = tokenizer
        self.media = media

    def prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        tok = self.tokenizer
        kind = request.WhichOneof("input")
        if kind == "text":
            ids = tok.encode(request.text)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if t >= self.facts.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.facts.vocab_size - 1})", "input")
        elif kind == "chat":
            ids = self.chat_ids(request.chat)
        else:
            raise InvalidRequest("one of text, token_ids or chat is required", "input")
        if not ids:
            raise InvalidRequest("the prompt is empty", "input")
        return ids

    def chat_ids(self, chat: pb.ChatInput) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("this model has no chat template; send text or token_ids",
                                 "chat", epb.ERROR_CODE_UNSUPPORTED)
        if not chat.messages:
            raise InvalidRequest("chat.messages must not be empty", "chat.messages")
        messages = []
        for i, m in enumerate(chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages[{i}].role {m.role!r} is not one of "
                                     f"{sorted(CHAT_ROLES)}", f"chat.messages[{i}].role")
            msg = {"role": m.role, "content": _content(m) if m.parts else m.content}
            if m.name:
                msg["name"] = m.name
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        kwargs_field = "chat.template_kwargs_json"
        try:
            kwargs = json.loads(chat.template_kwargs_json) if chat.template_kwargs_json else {}
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"chat.template_kwargs_json is not valid JSON: {e}",
                                 kwargs_field) from e
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat.template_kwargs_json must be a JSON object", kwargs_field)
        reserved = sorted(set(kwargs) & TOKENIZER_ARGUMENTS)
        if reserved:
            # They reach the tokenizer, not the template: return_tensors gave
            # a 500, padding to max_length 10**7 took this process to 1.2 GB.
            raise InvalidRequest(f"chat template kwargs are template variables; {reserved[0]!r} "
                                 f"is an argument of the tokenizer, not the client's to set",
                                 kwargs_field)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=True,
                add_generation_prompt=not chat.continue_final_message,
                continue_final_message=chat.continue_final_message, **kwargs)
        except Exception as e:  # the template itself refuses (roles order, ...)
            raise InvalidRequest(f"the chat template rejected the messages: {e}",
                                 "chat.messages") from e

    async def prepare_media(self, request: pb.GenerateRequest, request_id: str,
                            timeout: float | None) -> list[PreparedItem]:
        """The request's images and videos, prepared by the media workers, in
        prompt order; each comes acquired for the caller (media_client.release)."""
        parts = media_parts(request)
        if not parts:
            return []
        family = FAMILIES.get(self.facts.model_type)
        images = 0
        for k, (i, j, source) in enumerate(parts):
            # The messages keep the OpenAI names: people read them.
            where, field = f"messages[{i}].content[{j}]", part_field(i, j)
            if not self.facts.vision:
                raise InvalidRequest(f"{where}: this model takes text only; it cannot "
                                     f"read images or videos", field,
                                     epb.ERROR_CODE_UNSUPPORTED, k)
            if source.kind not in MEDIA_PART_TYPES:
                raise InvalidRequest(f"{where}: the media kind (image or video) is required",
                                     field, item=k)
            if source.WhichOneof("source") is None:
                raise InvalidRequest(f"{where}: a url or a path is required", field, item=k)
            if family is None:
                continue
            name = self.facts.model_type
            if source.kind == mpb.MEDIA_KIND_VIDEO and family.video_token is None:
                raise InvalidRequest(f"{where}: this model ({name}) takes images, not video",
                                     field, epb.ERROR_CODE_UNSUPPORTED, k)
            images += source.kind == mpb.MEDIA_KIND_IMAGE
            if family.max_images is not None and images > family.max_images:
                raise InvalidRequest(f"{where}: this model ({name}) takes at most "
                                     f"{family.max_images} image(s) in a request", field,
                                     epb.ERROR_CODE_UNSUPPORTED, k)
            if family.one_media_kind and source.kind != parts[0][2].kind:
                raise InvalidRequest(f"{where}: this model takes images or videos in one "
                                     f"request, not both", field, epb.ERROR_CODE_UNSUPPORTED, k)
        try:
            return await self.media.prepare(request_id, [s for _, _, s in parts], timeout)
        except MediaRefused as e:
            if e.index < 0:
                raise InvalidRequest(f"media: {e.reason}",
                                     code=epb.ERROR_CODE_MEDIA_REFUSED) from None
            i, j, _ = parts[e.index]
            raise InvalidRequest(f"messages[{i}].content[{j}]: {e.reason}", part_field(i, j),
                                 epb.ERROR_CODE_MEDIA_REFUSED, e.index) from None

    def build(self, request: pb.GenerateRequest, request_id: str, memory: MemoryBudget,
              media: list[PreparedItem] = ()) -> Request:
        """The core's Request; `memory` is the core's budget, `media` the
        request's prepared items (prepare_media)."""
        facts = self.facts
        prompt = self.prompt_ids(request)
        if media:
            prompt = expand_placeholders(prompt, list(media))
        context = facts.context_length
        too_long = epb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED
        if len(prompt) >= context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens, which leaves no room in the model's "
                f"context length of {context} tokens", "input", too_long)
        max_tokens = request.max_tokens or context - len(prompt)
        if len(prompt) + max_tokens > context:
            # The prompt is named, as OpenAI does: it is what the client must
            # shorten when max_tokens was left to its default.
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: "
                f"together they exceed the model's context length of {context} tokens",
                "input", too_long)
        need = memory.request_bytes(len(prompt) + max_tokens)
        if need > memory.for_requests:
            raise InvalidRequest(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) needs "
                f"{need} bytes of KV cache, more than the {memory.for_requests} bytes the "
                f"engine's memory limit of {memory.limit} leaves beside the weights and "
                f"MLX's buffer cache; lower max_tokens", "max_tokens",
                epb.ERROR_CODE_KV_BUDGET_EXCEEDED)
        sampling = sampling_from_proto(request.sampling)
        validate_sampling(sampling, facts.vocab_size)
        if request.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}",
                                 "top_logprobs")
        if request.top_logprobs and not request.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs", "top_logprobs")
        prompt_logprobs = (request.prompt_logprobs if request.HasField("prompt_logprobs")
                           else None)
        if prompt_logprobs is not None:
            if prompt_logprobs > MAX_TOP_LOGPROBS:
                raise InvalidRequest(f"prompt_logprobs must be at most {MAX_TOP_LOGPROBS}",
                                     "prompt_logprobs")
            if media:
                raise InvalidRequest("prompt_logprobs is for text prompts; this one has "
                                     "images or videos", "prompt_logprobs")
        if any(not s for s in request.stop):
            raise InvalidRequest("stop strings must not be empty", "stop")
        bad = [t for t in request.stop_token_ids if t >= facts.vocab_size]
        if bad:
            raise InvalidRequest(f"stop token id {bad[0]} is outside the vocabulary",
                                 "stop_token_ids")
        stop_ids = set(request.stop_token_ids)
        if not request.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        return Request(
            request_id=request_id, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
            stop=list(request.stop), stop_token_ids=sorted(stop_ids),
            logprobs=request.logprobs, top_logprobs=request.top_logprobs,
            include_stop=request.include_stop_in_output, prompt_logprobs=prompt_logprobs,
            media=SharedTensors([(it.segment, it.layout) for it in media]) if media else [])
