"""The OpenAI requests this gateway serves, as pydantic models: the one
source of what it accepts and of its /openapi.json (responses.py holds what
it answers). OpenAI fields this server cannot honour are declared but refused
unless they carry their neutral value, so the error names the field.
"""

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.chat_messages import Message
from gateway.schema_base import (
    MAX_N,
    MAX_TOKENS_LIMIT,
    MAX_TOP_LOGPROBS,
    TOKEN_ID_LIMIT,
    RequestModel,
    Unsupported,
    at_most,
    limits,
)


class StreamOptions(RequestModel):
    include_usage: bool = False
    # Accepted for compatibility; every chunk is sent as soon as it exists.
    include_obfuscation: bool | None = None


# -- the fields both endpoints share ---------------------------------------------

Stop = str | list[str] | None

# OpenAI fields the server cannot honour yet, and the values that ask for
# nothing (so a client that sends the neutral value is not refused).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none",),
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


class SamplingFields(RequestModel):
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
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the text")
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
        at_most("stop strings", len(stops), limits().max_stop_strings)
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


# -- structured output and tools -----------------------------------------------------

class JSONSchemaFormat(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # "schema" is a BaseModel attribute; the alias keeps OpenAI's name.
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Enforced either way: the output always follows the schema.
    strict: bool | None = None


class TextFormat(RequestModel):
    type: Literal["text"]


class JSONObjectFormat(RequestModel):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat,
                           Field(discriminator="type")]


class StructuredOutputs(RequestModel):
    """vLLM's extension (`structured_outputs` in the body): exactly one of
    these constrains the output."""
    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice "
                             "and grammar")
        return self


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # enforced when the grammar is (tool_choice)


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# -- POST /v1/chat/completions ---------------------------------------------------

class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_count(cls, v: Any) -> Any:
        if isinstance(v, list):  # counted before each message is validated
            at_most("messages", len(v), limits().max_messages)
        return v

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
    parallel_tool_calls: bool | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Frames sampled from each video: per second, and at most this many
    # (the server's defaults when unset; its caps always apply).
    video_fps: float | None = Field(None, gt=0)
    video_max_frames: int | None = Field(None, ge=1)

    functions: Unsupported = None
    function_call: Unsupported = None
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
        "functions", "function_call", "modalities",
        "service_tier", "audio", "prediction", "reasoning_effort",
        "verbosity", "web_search_options", "moderation", "prompt_cache_options",
        "prompt_cache_retention")(_refuse_unless_neutral)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    @model_validator(mode="after")
    def _tools_and_formats(self) -> "ChatCompletionRequest":
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) or choice == "required":
            if not self.tools:
                raise ValueError("tool_choice requires tools")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                    t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not "
                                 f"among the tools")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        fmt = self.response_format
        if self.structured_outputs and fmt is not None and fmt.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self


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
                at_most("characters" if isinstance(p, str) else "tokens", len(p),
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
