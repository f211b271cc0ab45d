"""What every OpenAI model of the gateway shares: requests forbid unknown
fields (a typo must not be silently ignored) and take null as "not given";
responses leave out the Nones OpenAI leaves out; and the request-size caps
the gateway was started with.
"""

import functools
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
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


def at_most(what: str, n: int, limit: int) -> None:
    if n > limit:
        raise ValueError(f"{n} {what} are more than the {limit} this server accepts")

MAX_N = 128
# The engine's fields are 32-bit; larger values would not fit the protobuf.
MAX_TOKENS_LIMIT = 2**31 - 1
TOKEN_ID_LIMIT = 2**32 - 1


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """In /openapi.json, every optional field also takes null (see RequestModel)."""
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


class RequestModel(BaseModel):
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


class ResponseModel(BaseModel):
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


# Fields of OpenAI's API this server refuses: accepted by the model (so the
# 400 names them) but left out of /openapi.json, which documents what works.
Unsupported = SkipJsonSchema[Any]
