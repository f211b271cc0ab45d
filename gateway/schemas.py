"""The OpenAI API's shapes as pydantic models: the one source of what the
gateway accepts, what it answers, and of its /openapi.json.

Requests forbid unknown fields (a typo must not be silently ignored), and
the OpenAI fields this server cannot honour are declared but refused unless
they carry their neutral value, so the error names the field.
"""

import functools
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from gateway.config import GatewaySettings

MAX_TOP_LOGPROBS = 20


@functools.cache
def limits() -> GatewaySettings:
    """The request-size caps (max_messages, ...) this gateway was started with."""
    return GatewaySettings.from_env()


def _at_most(what: str, n: int, limit: int) -> None:
    if n > limit:
        raise ValueError(f"{n} {what} are more than the {limit} this server accepts")

MAX_N = 128
# The engine's fields are 32-bit; larger values would not fit the protobuf.
MAX_TOKENS_LIMIT = 2**31 - 1
TOKEN_ID_LIMIT = 2**32 - 1


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """In /openapi.json, every optional field also takes null (see _Request)."""
    null = {"type": "null"}
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or null in prop.get("anyOf", ()):
            continue
        if "anyOf" in prop:
            prop["anyOf"].append(null)
        else:
            notes = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
            value = dict(prop)
            prop.clear()
            prop.update(notes, anyOf=[value, null])


class _Request(BaseModel):
    """Requests forbid unknown fields, and take null for any optional field
    as "not given": OpenAI's SDK sends null for a parameter passed as None."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_nullable_optionals)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required()}


class _Response(BaseModel):
    """Fields named in `_omit_none` are left out when None, as OpenAI does
    (e.g. a delta's role after the first chunk); other Nones stay as null."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        data = handler(self)
        for k in self._omit_none:
            if data.get(k, 0) is None:
                del data[k]
        return data


# -- message content ------------------------------------------------------------

class TextPart(_Request):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _size(cls, v: str) -> str:
        _at_most("characters", len(v), limits().max_prompt_chars)
        return v


def _check_content(v: Any) -> Any:
    """A message's content: text within max_prompt_chars, parts within
    max_content_parts (counted before the parts are validated)."""
    if isinstance(v, str):
        _at_most("characters", len(v), limits().max_prompt_chars)
    elif isinstance(v, list):
        _at_most("content parts", len(v), limits().max_content_parts)
    return v


class MediaURL(_Request):
    url: str = Field(min_length=1)
    # OpenAI's fidelity hint. Here the model's processor sets the resolution,
    # so only "auto" can be honoured; "low"/"high" are refused, not ignored.
    detail: Literal["auto"] | None = None


class ImageURLPart(_Request):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(_Request):
    type: Literal["video_url"]
    video_url: MediaURL


class ImagePathPart(_Request):
    """A local file, read only under the server's --allowed-local-media-path."""
    type: Literal["image"]
    image: str = Field(min_length=1)


class VideoPathPart(_Request):
    type: Literal["video"]
    video: str = Field(min_length=1)


class InputAudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Request):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Request):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart | ImagePathPart | VideoPathPart
                        | InputAudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


# Fields of OpenAI's API this server refuses: accepted by the model (so the
# 400 names them) but left out of /openapi.json, which documents what works.
Unsupported = SkipJsonSchema[Any]


class _Message(_Request):
    @field_validator("content", mode="before", check_fields=False)
    @classmethod
    def _content_size(cls, v: Any) -> Any:
        return _check_content(v)


class SystemMessage(_Message):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    # Replaying tool calls needs the tool-calling issue (and a proto field).
    tool_calls: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _not_yet(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise ValueError(f"assistant messages with {info.field_name} are not supported "
                             "by this server yet")
        return None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage
                    | ToolMessage, Field(discriminator="role")]


class StreamOptions(_Request):
    include_usage: bool = False
    # Accepted for compatibility; every chunk is sent as soon as it exists.
    include_obfuscation: bool | None = None


# -- the fields both endpoints share ---------------------------------------------

Stop = str | list[str] | None

# OpenAI fields the server cannot honour yet, and the values that ask for
# nothing (so a client that sends the neutral value is not refused).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "moderation": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "suffix": ("",),
}


def _refuse_unless_neutral(v: Any, info: ValidationInfo) -> Any:
    if v is None or any(v == n for n in _NEUTRAL[info.field_name]):
        return None
    raise ValueError(f"{info.field_name} is not supported by this server")


class SamplingFields(_Request):
    model: str = Field(description="the served model name, an alias, or `default`")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKENS_LIMIT,
                              description="-1 or 0 disables it")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    stop: Stop = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=TOKEN_ID_LIMIT)]] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=MAX_N)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]+$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Identifies the end user in the gateway's log; generation ignores it.
    user: str | None = None
    safety_identifier: str | None = None
    # A routing hint for OpenAI's cache; the prefix cache here needs none.
    prompt_cache_key: str | None = None
    # OpenAI's stored completions: nothing is stored here, so both are
    # accepted and have no effect (docs say so).
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    # vLLM's extension: the prompt tokens' log-probabilities, with this many
    # alternatives each, from the prompt's own prefill pass.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Stop) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        _at_most("stop strings", len(stops), limits().max_stop_strings)
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.strip().isdigit() or int(key) > TOKEN_ID_LIMIT:
                raise ValueError(f"logit_bias key {key!r} is not a token id")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def stop_list(self) -> list[str]:
        return self.stop or []  # the validator made it a list

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# -- POST /v1/chat/completions ---------------------------------------------------

class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_count(cls, v: Any) -> Any:
        if isinstance(v, list):  # counted before each message is validated
            _at_most("messages", len(v), limits().max_messages)
        return v

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
    parallel_tool_calls: bool | None = None  # meaningless without tools
    # Frames sampled from each video: per second, and at most this many
    # (the server's defaults when unset; its caps always apply).
    video_fps: float | None = Field(None, gt=0)
    video_max_frames: int | None = Field(None, ge=1)

    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    response_format: Unsupported = None
    modalities: Unsupported = None
    service_tier: Unsupported = None
    audio: Unsupported = None
    prediction: Unsupported = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None
    web_search_options: Unsupported = None
    moderation: Unsupported = None
    prompt_cache_options: Unsupported = None
    prompt_cache_retention: Unsupported = None

    refuse_unsupported = field_validator(
        "tools", "tool_choice", "functions", "function_call", "response_format", "modalities",
        "service_tier", "audio", "prediction", "reasoning_effort",
        "verbosity", "web_search_options", "moderation", "prompt_cache_options",
        "prompt_cache_retention")(_refuse_unless_neutral)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v


# -- POST /v1/completions --------------------------------------------------------

Prompt = str | list[str] | list[Annotated[int, Field(ge=0, le=TOKEN_ID_LIMIT)]] | list[
    list[Annotated[int, Field(ge=0, le=TOKEN_ID_LIMIT)]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    # OpenAI's default for the legacy endpoint.
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Unsupported = None

    refuse_unsupported = field_validator("suffix")(_refuse_unless_neutral)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_size(cls, v: Any) -> Any:
        one = isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], int))
        for p in [v] if one else v if isinstance(v, list) else []:
            if isinstance(p, str | list):
                _at_most("characters" if isinstance(p, str) else "tokens", len(p),
                         limits().max_prompt_chars)
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("the prompt must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        # Ranking candidates by likelihood is not implemented; best_of == n
        # asks for nothing more than n.
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported by this server")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# -- responses -------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class PromptLogprob(_Response):
    """vLLM's shape for one candidate of one prompt position."""
    logprob: float
    rank: int | None
    decoded_token: str


# One entry per prompt token: null for the first (nothing predicts it), then
# the prompt token and the top alternatives by token id.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletion(_Response):
    _omit_none = frozenset({"prompt_logprobs"})
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatDelta(_Response):
    _omit_none = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    _omit_none = frozenset({"usage", "prompt_logprobs"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # in the first chunk, when asked for


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    _omit_none = frozenset({"prompt_logprobs"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(_Response):
    """Also each chunk of a streamed completion, as OpenAI sends them."""
    _omit_none = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm-mlx"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
