"""Chat messages and their content parts, as OpenAI defines them."""

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from gateway.schema_base import RequestModel, Unsupported, at_most, limits


class TextPart(RequestModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _size(cls, v: str) -> str:
        at_most("characters", len(v), limits().max_prompt_chars)
        return v


def _check_content(v: Any) -> Any:
    """A message's content: text within max_prompt_chars, parts within
    max_content_parts (counted before the parts are validated)."""
    if isinstance(v, str):
        at_most("characters", len(v), limits().max_prompt_chars)
    elif isinstance(v, list):
        at_most("content parts", len(v), limits().max_content_parts)
    return v


class MediaURL(RequestModel):
    url: str = Field(min_length=1)
    # OpenAI's fidelity hint. Here the model's processor sets the resolution,
    # so only "auto" can be honoured; "low"/"high" are refused, not ignored.
    detail: Literal["auto"] | None = None


class ImageURLPart(RequestModel):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(RequestModel):
    type: Literal["video_url"]
    video_url: MediaURL


class ImagePathPart(RequestModel):
    """A local file, read only under the server's --allowed-local-media-path."""
    type: Literal["image"]
    image: str = Field(min_length=1)


class VideoPathPart(RequestModel):
    type: Literal["video"]
    video: str = Field(min_length=1)


class InputAudioPart(RequestModel):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(RequestModel):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(RequestModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart | ImagePathPart | VideoPathPart
                        | InputAudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class _Message(RequestModel):
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


class CalledFunction(RequestModel):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # The legacy single function_call, and audio replies, are not served.
    function_call: Unsupported = None
    audio: Unsupported = None

    @field_validator("function_call", "audio")
    @classmethod
    def _not_served(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise ValueError(f"assistant messages with {info.field_name} are not supported "
                             "by this server; use tool_calls")
        return None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage
                    | ToolMessage, Field(discriminator="role")]
