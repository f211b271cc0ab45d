"""Every error the gateway answers with, in OpenAI's envelope, from one place.

Code anywhere in the gateway raises `APIError` (or lets FastAPI raise its
validation errors); the handlers installed by `install_handlers` are the only
code that turns an exception into an HTTP body. Streams that already sent
their headers put the same envelope in a `data:` event (`sse_error`).
A failed engine call becomes one by its ErrorInfo (errors.proto), through
the tables ENGINE_ERRORS (what went wrong) and ENGINE_FIELDS (which field):
never by reading the engine's message.
"""

import functools
import logging
from typing import Any, get_args

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_mlx.ipc.error_info import error_info
from vllm_mlx.v1 import errors_pb2 as epb

log = logging.getLogger("gateway")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# Seconds a client should wait after a 429: the queue drains at the pace of
# whole requests, so "soon" is the best the gateway can say.
RETRY_AFTER_S = 1


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
    """Tells the client when to retry (Retry-After), unless told otherwise."""
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, param, code,
                         {"Retry-After": str(RETRY_AFTER_S)} if headers is None else headers)


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


# What the engine's ErrorCode (errors.proto) is to an OpenAI client: the
# error class (HTTP status, type, code) and, where the class's code does not
# say enough, a code of its own, plus the words the engine's message follows.
ENGINE_ERRORS: dict[int, tuple[type[APIError], str | None, str]] = {
    epb.ERROR_CODE_INVALID_ARGUMENT: (InvalidRequest, None, ""),
    epb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: (InvalidRequest, "context_length_exceeded", ""),
    epb.ERROR_CODE_KV_BUDGET_EXCEEDED: (InvalidRequest, None, ""),
    epb.ERROR_CODE_UNSUPPORTED: (InvalidRequest, "unsupported_content", ""),
    epb.ERROR_CODE_MEDIA_REFUSED: (InvalidRequest, None, ""),
    epb.ERROR_CODE_OVERLOADED: (RateLimited, None, ""),
    epb.ERROR_CODE_DUPLICATE_REQUEST_ID: (Conflict, None, ""),
    epb.ERROR_CODE_LOADING: (EngineUnavailable, None, "the engine is unavailable: "),
    epb.ERROR_CODE_MEDIA_UNAVAILABLE: (EngineUnavailable, None, "the engine is unavailable: "),
    epb.ERROR_CODE_INTERNAL: (EngineFailed, None, "the engine failed the request (INTERNAL): "),
}

# Failures without an ErrorInfo, by gRPC status: the gRPC layer's own (a
# message over the size cap, a deadline, a connection gone), never the engine's
# code. What is not here is a 500.
GRPC_ERRORS: dict[grpc.StatusCode, tuple[type[APIError], str]] = {
    # The size cap: the only RESOURCE_EXHAUSTED gRPC raises by itself.
    grpc.StatusCode.RESOURCE_EXHAUSTED: (InvalidRequest, "the request is too large for the "
                                                         "engine: "),
    grpc.StatusCode.UNAVAILABLE: (EngineUnavailable, "the engine is unavailable: "),
    grpc.StatusCode.CANCELLED: (EngineUnavailable, "the engine is unavailable: "),
    grpc.StatusCode.DEADLINE_EXCEEDED: (EngineTimeout, "the engine did not answer in time: "),
}

# GenerateRequest fields (ErrorInfo.field) as the OpenAI request names them;
# {prompt} and {logprobs} stand for the endpoint's own ("messages" and
# "top_logprobs" for chat, "prompt" and "logprobs" for completions). A
# "sampling." path is the SamplingParams field's own name, a
# "chat.messages[i]..." path is mapped by openai_param.
ENGINE_FIELDS: dict[str, str | None] = {
    "input": "{prompt}",
    "chat": "{prompt}",
    "chat.messages": "messages",
    "chat.template_kwargs_json": "chat_template_kwargs",
    "chat.continue_final_message": "continue_final_message",
    "chat.add_generation_prompt": "add_generation_prompt",
    "chat.tools_json": "tools",
    "chat.tool_choice": "tool_choice",
    "chat.parallel_tool_calls": "parallel_tool_calls",
    "structured_output": "response_format",
    "structured_output.json_schema": "response_format",
    "structured_output.json_object": "response_format",
    "structured_output.regex": "structured_outputs",
    "structured_output.choice": "structured_outputs",
    "structured_output.grammar": "structured_outputs",
    "max_tokens": "max_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "logprobs": "{logprobs}",
    "top_logprobs": "{logprobs}",
    "prompt_logprobs": "prompt_logprobs",
    "ignore_eos": "ignore_eos",
    "include_stop_in_output": "include_stop_str_in_output",
    "echo": "echo",
    "request_id": None,  # the gateway's own, from X-Request-Id
}
# Parts of a message (translate.py keeps every content part, in order, once
# any is an image or video) are the OpenAI message's content list.
_MESSAGE_FIELDS = {"parts": "content"}


def openai_param(field: str, prompt_field: str, logprobs_field: str) -> str | None:
    """The OpenAI request field for an ErrorInfo.field path."""
    if not field:
        return None
    if field in ENGINE_FIELDS:
        param = ENGINE_FIELDS[field]
        return None if param is None else param.format(prompt=prompt_field,
                                                       logprobs=logprobs_field)
    head, _, rest = field.partition(".")
    if head == "sampling" and rest:
        return rest
    if head == "chat" and rest.startswith("messages["):
        out = []
        for step in rest.split("."):
            name, bracket, index = step.partition("[")
            out.append(_MESSAGE_FIELDS.get(name, name) + bracket + index)
        return ".".join(out)
    return None


def from_grpc(e: grpc.RpcError, prompt_field: str = "prompt",
              logprobs_field: str = "logprobs") -> APIError:
    """The HTTP error for a failed engine call: by its ErrorInfo when the
    engine attached one, else by the gRPC status alone."""
    code, details = e.code(), e.details() or ""
    info = error_info(e)
    if info is not None and info.code in ENGINE_ERRORS:
        kind, openai_code, lead = ENGINE_ERRORS[info.code]
        if kind is EngineFailed:
            log.error("the engine failed a request: %s", details)
        return kind(lead + details, param=openai_param(info.field, prompt_field, logprobs_field),
                    code=openai_code)
    if code in GRPC_ERRORS:
        kind, lead = GRPC_ERRORS[code]
        param = prompt_field if kind is InvalidRequest else None
        return kind(lead + details, param=param)
    log.error("engine call failed: %s %s", code, details)
    return EngineFailed(f"the engine failed the request ({code.name}): {details}")


_PRIMITIVES = {"str", "int", "float", "bool", "constrained-int", "constrained-float"}


@functools.cache
def _union_tags() -> frozenset[str]:
    """The discriminator values of the list-item unions (message roles,
    content part types): pydantic puts the one it tried after the index."""
    from gateway.chat_messages import AssistantPart, ContentPart, Message
    tags: set[str] = set()
    for union in (Message, ContentPart, AssistantPart):
        for member in get_args(get_args(union)[0]):
            for name in ("role", "type"):
                field = member.model_fields.get(name)
                if field is not None:
                    tags.update(get_args(field.annotation))
    return frozenset(tags)


def _param(loc: tuple) -> str | None:
    """`messages[0].content` for pydantic's ("body", "messages", 0, "user", "content", "str")."""
    out = ""
    prev: object = None
    for p in loc:
        if p == "body" and prev is None:
            pass
        elif isinstance(p, int):
            out += f"[{p}]"
        elif "[" in p or p in _PRIMITIVES or isinstance(prev, int) and p in _union_tags():
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
