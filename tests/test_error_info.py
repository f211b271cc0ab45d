"""Errors as data (proto/vllm_mlx/v1/errors.proto): every ErrorCode, attached
by a server to a failed call, reaches an OpenAI client as the right HTTP
status, error type, code and param; a direct gRPC client reads the ErrorInfo
of a real engine's refusal; and no error handling reads message text.

Codes a real engine produces from a real request are provoked that way; the
others (loading, internal, ...) come from a small grpc.aio Engine servicer
here, which fails each call as the test asks, behind a real gateway."""

import ast
import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from vllm_mlx.ipc.error_info import STATUS, abort, error_info
from vllm_mlx.ipc.grpc_server import listen
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import engine_pb2_grpc
from vllm_mlx.v1 import errors_pb2 as epb

from .conftest import ROOT, start_engine, start_gateway

INVALID, SERVER = "invalid_request_error", "server_error"


@dataclass(frozen=True)
class Case:
    """A failure the stub engine answers with, and what each endpoint must
    answer in turn. param: (chat's, completions')."""
    code: int | None            # the ErrorCode; None: no ErrorInfo (the gRPC layer's own)
    field: str
    status: int
    type: str
    openai_code: str | None
    param: tuple[str | None, str | None]
    grpc_status: grpc.StatusCode | None = None  # for code None
    item: int | None = None


CASES = {
    "invalid-argument": Case(epb.ERROR_CODE_INVALID_ARGUMENT, "sampling.temperature", 400,
                             INVALID, None, ("temperature", "temperature")),
    "invalid-logprobs": Case(epb.ERROR_CODE_INVALID_ARGUMENT, "top_logprobs", 400, INVALID,
                             None, ("top_logprobs", "logprobs")),
    "invalid-template-kwargs": Case(epb.ERROR_CODE_INVALID_ARGUMENT,
                                    "chat.template_kwargs_json", 400, INVALID, None,
                                    ("chat_template_kwargs", "chat_template_kwargs")),
    "invalid-role": Case(epb.ERROR_CODE_INVALID_ARGUMENT, "chat.messages[3].role", 400,
                         INVALID, None, ("messages[3].role", "messages[3].role")),
    "context-length": Case(epb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED, "input", 400, INVALID,
                           "context_length_exceeded", ("messages", "prompt")),
    "kv-budget": Case(epb.ERROR_CODE_KV_BUDGET_EXCEEDED, "max_tokens", 400, INVALID, None,
                      ("max_tokens", "max_tokens")),
    "unsupported": Case(epb.ERROR_CODE_UNSUPPORTED, "chat", 400, INVALID,
                        "unsupported_content", ("messages", "prompt")),
    "media-refused": Case(epb.ERROR_CODE_MEDIA_REFUSED, "chat.messages[2].parts[1]", 400,
                          INVALID, None, ("messages[2].content[1]", "messages[2].content[1]"),
                          item=1),
    "overloaded": Case(epb.ERROR_CODE_OVERLOADED, "", 429, "rate_limit_error",
                       "rate_limit_exceeded", (None, None)),
    "duplicate": Case(epb.ERROR_CODE_DUPLICATE_REQUEST_ID, "request_id", 409, INVALID,
                      "request_id_in_use", (None, None)),
    "loading": Case(epb.ERROR_CODE_LOADING, "", 503, SERVER, "engine_unavailable",
                    (None, None)),
    "media-unavailable": Case(epb.ERROR_CODE_MEDIA_UNAVAILABLE, "", 503, SERVER,
                              "engine_unavailable", (None, None)),
    "internal": Case(epb.ERROR_CODE_INTERNAL, "", 500, SERVER, "engine_error", (None, None)),
    # Without an ErrorInfo: gRPC's own refusals, by status alone.
    "grpc-too-large": Case(None, "", 400, INVALID, None, ("messages", "prompt"),
                           grpc.StatusCode.RESOURCE_EXHAUSTED),
    "grpc-unavailable": Case(None, "", 503, SERVER, "engine_unavailable", (None, None),
                             grpc.StatusCode.UNAVAILABLE),
    "grpc-deadline": Case(None, "", 504, SERVER, "timeout", (None, None),
                          grpc.StatusCode.DEADLINE_EXCEEDED),
    "grpc-unknown": Case(None, "", 500, SERVER, "engine_error", (None, None),
                         grpc.StatusCode.UNKNOWN),
}


def test_every_error_code_has_a_case():
    codes = {c.code for c in CASES.values()}
    assert codes >= set(epb.ErrorCode.values()) - {epb.ERROR_CODE_UNSPECIFIED}
    assert set(STATUS) == set(epb.ErrorCode.values()) - {epb.ERROR_CODE_UNSPECIFIED}


# -- a stub engine behind a real gateway -------------------------------------------


class StubEngine(engine_pb2_grpc.EngineServicer):
    """Fails each Generate as CASES[its request id] says."""

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return pb.ModelInfo(name="stub", modalities=["text"], context_length=2048,
                            max_num_seqs=4, max_queue=4, has_chat_template=True)

    async def GetStats(self, request, context) -> pb.Stats:
        return pb.Stats()

    async def Generate(self, request: pb.GenerateRequest, context):
        case = CASES[request.request_id.rsplit("/", 1)[0]]
        message = f"stub failure: {request.request_id}"
        if case.code is None:
            await context.abort(case.grpc_status, message)
        await abort(context, case.code, message, case.field, case.item)
        yield pb.GenerateResponse()  # never reached; makes this a stream handler


@pytest.fixture(scope="module")
def stub_engine():
    """The stub on a loopback port, served by an event loop of its own."""
    loop = asyncio.new_event_loop()
    started: list = []
    ready = threading.Event()

    async def start():
        server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServicer_to_server(StubEngine(), server)
        name = pb.DESCRIPTOR.services_by_name["Engine"].full_name
        listening = await listen(server, name, "127.0.0.1", 0)
        await listening.set_serving(True)
        started.append(listening)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    assert ready.wait(30)
    listening = started[0]
    yield f"127.0.0.1:{listening.port}"
    asyncio.run_coroutine_threadsafe(listening.stop(grace=0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def stub_gateway(stub_engine, tmp_path_factory):
    gateway = start_gateway(stub_engine, tmp_path_factory.mktemp("stub-logs"),
                            "--served-model-name", "stub")
    yield gateway
    gateway.stop()


def _check(error: dict, headers: httpx.Headers, status: int, case: Case,
           param: str | None) -> None:
    assert status == case.status, error
    assert error["type"] == case.type, error
    assert error["code"] == case.openai_code, error
    assert error["param"] == param, error
    assert "stub failure" in error["message"], error
    if case.status == 429:
        assert headers["retry-after"] == "1"


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_error_through_the_openai_sdk(stub_gateway, name):
    case = CASES[name]
    sdk = openai.OpenAI(base_url=f"{stub_gateway.url}/v1", api_key="x", max_retries=0,
                        timeout=30)
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=2, extra_headers={"X-Request-Id": f"{name}/c"})
    r = info.value.response
    _check(r.json()["error"], r.headers, r.status_code, case, case.param[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_error_through_httpx(stub_gateway, name):
    case = CASES[name]
    r = httpx.post(f"{stub_gateway.url}/v1/completions", timeout=30,
                   json={"model": "stub", "prompt": "hi", "max_tokens": 2},
                   headers={"X-Request-Id": f"{name}/p"})
    _check(r.json()["error"], r.headers, r.status_code, case, case.param[1])


def test_stub_failures_leave_no_trace_in_the_gateway_log(stub_gateway):
    assert "Traceback" not in stub_gateway.log(), stub_gateway.log()[-3000:]


# -- a real engine -----------------------------------------------------------------


def _refusal(stub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    return info.value


BAD_CHAT = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x"),
                                  pb.ChatMessage(role="wizard", content="x")])


@pytest.mark.parametrize("fields, code, field", [
    (dict(text="x", sampling=pb.SamplingParams(temperature=-1)),
     epb.ERROR_CODE_INVALID_ARGUMENT, "sampling.temperature"),
    (dict(text="x", sampling=pb.SamplingParams(top_p=0)),
     epb.ERROR_CODE_INVALID_ARGUMENT, "sampling.top_p"),
    (dict(text="x", sampling=pb.SamplingParams(logit_bias={100000: 1.0})),
     epb.ERROR_CODE_INVALID_ARGUMENT, "sampling.logit_bias"),
    (dict(text="x", sampling=pb.SamplingParams(penalty_context_size=-1)),
     epb.ERROR_CODE_INVALID_ARGUMENT, "sampling.penalty_context_size"),
    (dict(text="x", logprobs=True, top_logprobs=50), epb.ERROR_CODE_INVALID_ARGUMENT,
     "top_logprobs"),
    (dict(text="x", prompt_logprobs=50), epb.ERROR_CODE_INVALID_ARGUMENT, "prompt_logprobs"),
    (dict(text="x", stop=[""]), epb.ERROR_CODE_INVALID_ARGUMENT, "stop"),
    (dict(text="x", stop_token_ids=[999999]), epb.ERROR_CODE_INVALID_ARGUMENT,
     "stop_token_ids"),
    (dict(), epb.ERROR_CODE_INVALID_ARGUMENT, "input"),
    (dict(text=""), epb.ERROR_CODE_INVALID_ARGUMENT, "input"),
    (dict(token_ids=pb.TokenIds(ids=[1, 999999])), epb.ERROR_CODE_INVALID_ARGUMENT, "input"),
    (dict(chat=BAD_CHAT), epb.ERROR_CODE_INVALID_ARGUMENT, "chat.messages[1].role"),
    (dict(chat=pb.ChatInput()), epb.ERROR_CODE_INVALID_ARGUMENT, "chat.messages"),
    (dict(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x")],
                            template_kwargs_json="{not json")),
     epb.ERROR_CODE_INVALID_ARGUMENT, "chat.template_kwargs_json"),
    (dict(token_ids=pb.TokenIds(ids=[5] * 2048)), epb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED,
     "input"),
    (dict(token_ids=pb.TokenIds(ids=[5] * 100), max_tokens=2000),
     epb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED, "input"),
])
def test_a_direct_grpc_client_reads_the_error_info(engine, fields, code, field):
    err = _refusal(engine.stub, **fields)
    assert err.code() == STATUS[code] == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == epb.ErrorInfo(code=code, field=field), err.details()


def test_temperature_below_zero_names_sampling_temperature(engine):
    """The issue's own example, read straight off the trailing metadata."""
    err = _refusal(engine.stub, text="x", sampling=pb.SamplingParams(temperature=-1))
    raw = dict(err.trailing_metadata())["vllm-mlx-error-bin"]
    info = epb.ErrorInfo.FromString(raw)
    assert info.code == epb.ERROR_CODE_INVALID_ARGUMENT
    assert info.field == "sampling.temperature" and not info.HasField("item")
    assert err.details() == "temperature must be >= 0"


def test_duplicate_request_id_over_grpc(engine):
    stream = engine.stub.Generate(pb.GenerateRequest(
        request_id="ei-dup", text="x", max_tokens=500, ignore_eos=True), timeout=60)
    next(stream)
    try:
        err = _refusal(engine.stub, request_id="ei-dup", text="y", max_tokens=5)
    finally:
        stream.cancel()
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(err) == epb.ErrorInfo(code=epb.ERROR_CODE_DUPLICATE_REQUEST_ID,
                                            field="request_id")


@pytest.fixture(scope="module")
def real_gateway(engine, tmp_path_factory):
    gateway = start_gateway(engine.address, tmp_path_factory.mktemp("real-logs"),
                            "--served-model-name", "tiny")
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", {"logit_bias": {"99999": 5}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"stop_token_ids": [99999]}, 400, "stop_token_ids", None),
    ("/v1/chat/completions", {"max_tokens": 5000}, 400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1, 999999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [5] * 2100}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
])
def test_real_engine_refusals_through_the_gateway(real_gateway, path, body, status, param,
                                                  code):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
            else {"prompt": "hi"})
    r = httpx.post(f"{real_gateway.url}{path}", timeout=30,
                   json={"model": "tiny", "max_tokens": 2, **base, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == INVALID and error["param"] == param and error["code"] == code, error


def test_real_duplicate_request_id_is_409(real_gateway):
    async def main():
        async with httpx.AsyncClient(base_url=real_gateway.url, timeout=60) as c:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1900, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=body,
                                headers={"X-Request-Id": "ei-dup-http"}) as first:
                lines = first.aiter_lines()  # referenced: dropping it hangs up
                await lines.__anext__()
                return await c.post("/v1/chat/completions", headers={
                    "X-Request-Id": "ei-dup-http"}, json={**body, "stream": False})

    r = asyncio.run(main())
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "request_id_in_use" and error["param"] is None


@pytest.fixture(scope="module")
def small_stack(engine, tiny_model, tmp_path_factory):
    """An engine with room beside the weights for 1,000 tokens of KV, and a
    gateway on it."""
    info = engine.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    logs = tmp_path_factory.mktemp("small-logs")
    small = start_engine(tiny_model, logs, "--no-prefix-cache", "--max-memory",
                         str(info.weights_bytes + 1000 * info.kv_bytes_per_token))
    gateway = start_gateway(small.address, logs, "--served-model-name", "tiny")
    yield small, gateway
    gateway.stop()
    small.stop()


def test_kv_budget_names_max_tokens(small_stack):
    small, gateway = small_stack
    err = _refusal(small.stub, token_ids=pb.TokenIds(ids=[5] * 10), max_tokens=1500)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == epb.ErrorInfo(code=epb.ERROR_CODE_KV_BUDGET_EXCEEDED,
                                            field="max_tokens")
    r = httpx.post(f"{gateway.url}/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": [5] * 10, "max_tokens": 1500})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == INVALID and error["param"] == "max_tokens", error


# -- nothing reads error text --------------------------------------------------------

# Where failed calls are handled: none may import re.
ERROR_HANDLERS = ["gateway/errors.py", "gateway/engine_client.py",
                  "engine_worker/media_client.py", "engine_worker/server.py",
                  "engine_worker/request_builder.py", "media_worker/server.py",
                  "vllm_mlx/ipc/error_info.py"]
TEXT_INSPECTORS = {"startswith", "endswith", "partition", "rpartition", "split", "find",
                   "index", "search", "match", "fullmatch", "findall"}


def _modules() -> list[Path]:
    return sorted(p for d in ("gateway", "engine_worker") for p in (ROOT / d).glob("*.py"))


def _imports_re(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name == "re" for a in n.names)
               or isinstance(n, ast.ImportFrom) and n.module == "re" for n in ast.walk(tree))


def _reads_error_text(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether `fn` gets a failed call's message: calls .details(), or takes
    it as a parameter named `details`."""
    return any(a.arg == "details" for a in fn.args.args) or any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        and n.func.attr == "details" for n in ast.walk(fn))


def text_inspections(source: str) -> list[tuple[int, str]]:
    """(line, function) of each place where a function that gets a failed
    call's message searches text: re, `"..." in`, startswith, partition, ..."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or \
                not _reads_error_text(fn):
            continue
        for n in ast.walk(fn):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and (n.func.attr in TEXT_INSPECTORS
                         or isinstance(n.func.value, ast.Name) and n.func.value.id == "re")):
                found.append((n.lineno, fn.name))
            if (isinstance(n, ast.Compare)
                    and any(isinstance(op, ast.In | ast.NotIn) for op in n.ops)
                    and isinstance(n.left, ast.Constant) and isinstance(n.left.value, str)):
                found.append((n.lineno, fn.name))
    return found


@pytest.mark.parametrize("path", ERROR_HANDLERS)
def test_error_handlers_do_not_import_re(path):
    assert not _imports_re(ast.parse((ROOT / path).read_text())), path


def test_no_function_inspects_a_grpc_error_message():
    """A function that gets a failed call's details() may pass them on (into
    a message for people) but never search them."""
    offenders = [(str(path.relative_to(ROOT)), *where) for path in _modules()
                 for where in text_inspections(path.read_text())]
    assert not offenders, offenders
