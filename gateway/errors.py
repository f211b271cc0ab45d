"""Every error the gateway answers with, in OpenAI's envelope, from one place.

Code anywhere in the gateway raises `APIError` (or lets FastAPI raise its
validation errors); the handlers installed by `install_handlers` are the only
code that turns an exception into an HTTP body. Streams that already sent
their headers put the same envelope in a `data:` event (`sse_error`).
"""

import logging
import re
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gateway")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    status = 500
    type = SERVER_ERROR
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        # Messages may quote client input; a lone surrogate in it would make
        # the JSON body unencodable.
        self.message = _printable(message)
        self.param = None if param is None else _printable(param)
        if code is not None:
            self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class InvalidRequest(APIError):
    status = 400
    type = INVALID_REQUEST


class Unauthorized(APIError):
    status = 401
    type = INVALID_REQUEST
    code = "invalid_api_key"


class NotFound(APIError):
    status = 404
    type = INVALID_REQUEST
    code = "not_found"


class Conflict(APIError):
    status = 409
    type = INVALID_REQUEST
    code = "request_id_in_use"


class ClientClosed(APIError):
    """The client went away; nobody reads this answer, the metrics do."""
    status = 499
    type = INVALID_REQUEST
    code = "client_closed_request"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class EngineFailed(APIError):
    """The engine failed this one request (FINISH_REASON_ERROR or ABORT)."""
    status = 500
    code = "engine_error"


class EngineUnavailable(APIError):
    status = 503
    code = "engine_unavailable"


class EngineTimeout(APIError):
    status = 504
    code = "timeout"


# Seconds a client should wait after a 429: the queue drains at the pace of
# whole requests, so "soon" is the best the gateway can say.
RETRY_AFTER_S = 1

# Engine INVALID_ARGUMENT details name what is wrong in the engine's own
# words; these map them back to the OpenAI field the client sent.
_ENGINE_PARAMS: list[tuple[str, str]] = [
    (r"^(messages\[\d+\]\.content\[\d+\]):", r"\1"),  # a media part the engine refused
    (r"bytes of KV cache", "max_tokens"),
    (r"context length|prompt is empty|^token id|larger than max", "{prompt}"),
    (r"stop token id", "stop_token_ids"),
    (r"^stop", "stop"),
    (r"template_kwargs", "chat_template_kwargs"),
    (r"chat|template|messages|role", "messages"),
    (r"^top_logprobs|logprobs", "{logprobs}"),
    (r"^(temperature|top_p|top_k|min_p|repetition_penalty|presence_penalty|"
     r"frequency_penalty|logit_bias|seed)", r"\1"),
]


def engine_param(details: str, prompt_field: str, logprobs_field: str) -> str | None:
    for pattern, param in _ENGINE_PARAMS:
        m = re.search(pattern, details)
        if m:
            return m.expand(param).format(prompt=prompt_field, logprobs=logprobs_field)
    return None


def from_grpc(e: grpc.RpcError, prompt_field: str = "prompt",
              logprobs_field: str = "logprobs") -> APIError:
    """The HTTP error for a failed engine call."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details, param=engine_param(details, prompt_field, logprobs_field))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in details:  # gRPC's message size cap, not the queue
            return InvalidRequest(f"the request is too large for the engine: {details}",
                                  param=prompt_field)
        return RateLimited(details or "the engine is overloaded; retry later",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return Conflict(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return EngineTimeout(f"the engine did not answer in time: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return EngineUnavailable(f"the engine is unavailable: {details}")
    log.error("engine call failed: %s %s", code, details)
    return EngineFailed(f"the engine failed the request ({code.name}): {details}")


_PRIMITIVES = {"str", "int", "float", "bool", "constrained-int", "constrained-float"}


def _param(loc: tuple) -> str | None:
    """`messages[0].content` for pydantic's ("body", "messages", 0, "user", "content", "str")."""
    out = ""
    prev: object = None
    for p in loc:
        if p == "body" and prev is None:
            pass
        elif isinstance(p, int):
            out += f"[{p}]"
        elif "[" in p or p in _PRIMITIVES or isinstance(prev, int) and not isinstance(p, int):
            # The union member pydantic tried, or a discriminator tag right
            # after a list index: neither is a field the client wrote.
            pass
        else:
            out += f".{p}" if out else p
        prev = p
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """One 400 for FastAPI's list of validation errors, naming the field."""
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return InvalidRequest(f"the body is not valid JSON: {ctx.get('error', 'decode error')}",
                              code="invalid_json")
    for err in errors:
        if err.get("type") == "extra_forbidden":
            name = _param(tuple(err.get("loc", ())))
            return InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return InvalidRequest("a JSON body is required", code="invalid_json")
    # A union's members each report a failure: prefer one that got past the
    # type check (a bound, a missing field), then the deepest.
    ranked = sorted(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"),
                                           -len(e.get("loc", ()))))
    messages: list[str] = []
    params = []
    for err in ranked:
        where = _param(tuple(err.get("loc", ())))
        if err.get("type", "").startswith("union_tag") and where:
            # The discriminator (a message's role, a part's type) is the field.
            where += "." + str((err.get("ctx") or {}).get("discriminator", "")).strip("'")
        params.append(where)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        # Our validators' messages already start with the field's name.
        named = where and msg.startswith(where.rsplit(".", 1)[-1].split("[")[0])
        line = f"{where}: {msg}" if where and not named else msg
        if line not in messages:
            messages.append(line)
    shown = "; ".join(messages[:3]) + (f" (and {len(messages) - 3} more)"
                                        if len(messages) > 3 else "")
    return InvalidRequest(shown, param=params[0])


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def sse_error(e: APIError) -> bytes:
    """The error event a stream ends with once its 200 is already sent;
    the OpenAI SDKs raise it as an APIError."""
    import json

    return b"data: " + json.dumps(e.body()).encode() + b"\n\n"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = APIError(str(e.detail), code={404: "not_found", 405: "method_not_allowed"}
                        .get(e.status_code))
        kind.status = e.status_code
        kind.type = INVALID_REQUEST if e.status_code < 500 else SERVER_ERROR
        kind.headers = dict(e.headers or {})
        return error_response(kind)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        # The trace goes to the log, never into the body.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError("internal error in the gateway", code="internal_error"))
