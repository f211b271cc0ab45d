"""A GenerateRequest into the core's `messages.Request`: the prompt's token ids
(text, token ids, or chat messages through the chat template), its media
prepared by the media workers and their placeholders expanded, and every
field checked against the model and the memory budget.

What the request gets wrong is raised as `InvalidRequest`, carrying the
ErrorCode and the GenerateRequest field at fault as data (errors.proto), so
that the servicer fails the call with an ErrorInfo and nobody downstream
has to read the message."""

import json

import llguidance

from engine_worker import grammar, structured, tool_calls
from engine_worker.blocks import MediaSpan
from engine_worker.media_client import MediaClient, MediaRefused, PreparedItem
from engine_worker.memory import MemoryBudget
from engine_worker.messages import Request
from engine_worker.model import ModelFacts
from engine_worker.reasoning import TAGS, ReasoningSplitter, starts_thinking
from engine_worker.reply import ReplyParser
from engine_worker.sampling import SamplingError, SamplingParams
from engine_worker.text_output import TokenStream
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


def expand_placeholders(ids: list[int], items: list[PreparedItem]
                        ) -> tuple[list[int], list[MediaSpan]]:
    """Each item's placeholder token, as the chat template renders it, becomes the
    item's tokens; items of a family whose template renders none (placeholder 0)
    go before the whole prompt, in order. Also where each item's tokens lie, in
    `items`' order."""
    out: list[int] = []
    span: dict[int, MediaSpan] = {}

    def place(i: int, item: PreparedItem) -> None:
        span[i] = (len(out), len(out) + len(item.token_ids), item.content_hash)
        out.extend(item.token_ids)

    for i, it in enumerate(items):
        if not it.placeholder_token_id:
            place(i, it)
    placed = [(i, it) for i, it in enumerate(items) if it.placeholder_token_id]
    placeholders = {it.placeholder_token_id for _, it in placed}
    k = 0
    for t in ids:
        if t not in placeholders:
            out.append(t)
            continue
        if k >= len(placed) or placed[k][1].placeholder_token_id != t:
            raise InvalidRequest("the prompt's image/video placeholders do not match its "
                                 "media parts (is a placeholder token written in the text?)",
                                 "chat.messages")
        place(*placed[k])
        k += 1
    if k != len(placed):
        raise InvalidRequest(f"the chat template placed {k} of the {len(placed)} media parts",
                             "chat.messages")
    return out, [span[i] for i in range(len(items))]


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


# Prompt tokens decoded to tell whether the template left a think block open.
THINK_TAIL_TOKENS = 16


def _parallel(chat: pb.ChatInput) -> bool:
    """Whether the reply may call several tools (OpenAI's default: yes)."""
    return chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True


def _tools(chat: pb.ChatInput) -> list[dict]:
    """chat.tools_json, checked: OpenAI function tools, each with a name."""
    field = "chat.tools_json"
    try:
        tools = json.loads(chat.tools_json) if chat.tools_json else []
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"tools is not valid JSON: {e}", field) from None
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", field)
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if (not isinstance(fn, dict) or t.get("type", "function") != "function"
                or not isinstance(fn.get("name"), str) or not fn["name"]):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                 f"{{\"name\": ..., \"parameters\": ...}}}}", field)
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema object",
                                 field)
    return tools


def _tool_calls(m: pb.ChatMessage, i: int) -> list[dict]:
    """An assistant message's calls as chat templates read them (arguments
    as an object)."""
    calls = []
    for k, c in enumerate(m.tool_calls):
        try:
            args = json.loads(c.arguments) if c.arguments else {}
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"messages[{i}].tool_calls[{k}].function.arguments is not "
                                 f"valid JSON: {e}", f"chat.messages[{i}].tool_calls") from None
        calls.append({"id": c.id, "type": "function",
                      "function": {"name": c.name, "arguments": args}})
    return calls


class RequestBuilder:
    """Builds and checks the requests of one model (its facts and tokenizer);
    `media` prepares images and videos (None: a text-only model).
    `tool_call_parser` ("auto": from the chat template) and
    `reasoning_parser` say how the model's replies are read."""

    def __init__(self, facts: ModelFacts, tokenizer, media: MediaClient | None,
                 tool_call_parser: str = "auto", reasoning_parser: str | None = None):
        self.facts = facts
        self.tokenizer = tokenizer
        self.media = media
        template = getattr(tokenizer, "chat_template", None)
        self.tool_format = (tool_calls.detect(template if isinstance(template, str) else None)
                            if tool_call_parser == "auto" else tool_calls.FORMATS[tool_call_parser])
        self.reasoning = reasoning_parser
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None
        self._special_ids: dict[str, int] = {}
        # What the text leaves out by default (skip_special_tokens), and the
        # parsers' markup that is a single token of this model.
        self._skipped = frozenset(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        markup = TAGS.markup.union(*(fmt.markup for fmt in tool_calls.FORMATS.values()))
        self._markup_ids = {m: vocab[m] for m in markup if m in vocab}

    def _grammar_tools(self) -> tuple[llguidance.LLTokenizer, dict[str, int]]:
        """llguidance's tokenizer (built at the first constrained request) and
        the markup strings that are special tokens of this model."""
        if self._grammar_tokenizer is None:
            llg = grammar.make_tokenizer(self.tokenizer, self.facts.vocab_size)
            self._special_ids = {m: i for m, i in self._markup_ids.items()
                                 if llg.is_special_token(i)}
            self._grammar_tokenizer = llg
        return self._grammar_tokenizer, self._special_ids

    def token_stream(self, request: pb.GenerateRequest, r: Request,
                     reply: ReplyParser | None) -> TokenStream:
        """What turns the request's tokens into its client's text. Special
        tokens are left out unless it asked to keep them, except the markup
        its reply parser reads."""
        # Text and token-id prompts, and a continued final message, are
        # continued by the output; a chat reply starts a text of its own.
        continues = request.WhichOneof("input") != "chat" or request.chat.continue_final_message
        skipped = self._skipped
        if request.HasField("skip_special_tokens") and not request.skip_special_tokens:
            skipped = frozenset()
        elif reply is not None:
            skipped -= {self._markup_ids[m] for m in reply.markup if m in self._markup_ids}
        return TokenStream(self.tokenizer, r.stop, r.include_stop,
                           context=r.prompt if continues else None, skipped=skipped)

    def _thinking(self, request: pb.GenerateRequest, prompt: list[int]) -> bool | None:
        """None without a reasoning parser (or for a prompt that is not a
        chat); else whether the output starts inside a think block."""
        if self.reasoning is None or request.WhichOneof("input") != "chat":
            return None
        return starts_thinking(self.tokenizer.decode(prompt[-THINK_TAIL_TOKENS:]))

    def reply_parser(self, request: pb.GenerateRequest, r: Request) -> ReplyParser | None:
        """What splits this request's text into content, reasoning and tool
        calls; None when it is all content."""
        thinking = self._thinking(request, r.prompt)
        chat = request.chat if request.WhichOneof("input") == "chat" else None
        parse_tools = (chat is not None and chat.tools_json and self.tool_format is not None
                       and chat.tool_choice.mode != pb.ToolChoice.MODE_NONE)
        if thinking is None and not parse_tools:
            return None
        return ReplyParser(
            ReasoningSplitter(thinking) if thinking is not None else None,
            tool_calls.ToolCallParser(self.tool_format, _parallel(chat)) if parse_tools
            else None)

    def _grammar(self, request: pb.GenerateRequest, prompt: list[int]) -> str:
        """The grammar the output must follow ("" : none), checked."""
        try:
            constraint = structured.from_structured_output(request.structured_output)
            chat = request.chat if request.WhichOneof("input") == "chat" else None
            if chat is not None and chat.tool_choice.mode in (pb.ToolChoice.MODE_REQUIRED,
                                                              pb.ToolChoice.MODE_FUNCTION):
                if constraint is not None:
                    raise structured.GrammarError(
                        "chat.tool_choice", "tool_choice \"required\" or a named function "
                        "cannot be combined with a response format")
                if not chat.tools_json:
                    raise structured.GrammarError("chat.tool_choice",
                                                  "tool_choice needs tools")
                _, special = self._grammar_tools()
                constraint = structured.from_tool_choice(
                    _tools(chat), chat.tool_choice, _parallel(chat), self.tool_format, special)
            if constraint is None:
                return ""
            if request.ignore_eos:
                raise structured.GrammarError(
                    "ignore_eos", "ignore_eos cannot be combined with constrained output: "
                                  "the output ends where its grammar does")
            llg, special = self._grammar_tools()
            text = structured.grammar(constraint, self._thinking(request, prompt), TAGS,
                                      special)
            structured.check(text, llg, constraint.field)
            return text
        except structured.GrammarError as e:
            raise InvalidRequest(str(e), e.field) from None

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
            if m.tool_calls:
                msg["tool_calls"] = _tool_calls(m, i)
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
        tools = _tools(chat)
        if tools and chat.tool_choice.mode != pb.ToolChoice.MODE_NONE:
            kwargs["tools"] = tools
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
        prompt, spans = self.prompt_ids(request), []
        if media:
            prompt, spans = expand_placeholders(prompt, list(media))
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
        rule = self._grammar(request, prompt)
        return Request(
            request_id=request_id, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
            stop=list(request.stop), stop_token_ids=sorted(stop_ids),
            logprobs=request.logprobs, top_logprobs=request.top_logprobs,
            include_stop=request.include_stop_in_output, prompt_logprobs=prompt_logprobs,
            media=SharedTensors([(it.segment, it.layout) for it in media]) if media else [],
            media_spans=spans,
            grammar=rule)
