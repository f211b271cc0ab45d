"""The gateway when the engine refuses, fails, hangs or dies. One engine with
room for a single running and a single waiting request, which the last
tests stop and kill."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai import OpenAI

from vllm_mlx.supervision.health import wait_for_serving
from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import ROOT, start_engine, start_gateway, wait_until

SERVED = "tiny"
CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0}
LONG = {"max_tokens": 1900, "ignore_eos": True}
REQUEST_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("failure-logs")
    engine = start_engine(tiny_model, logs, "--max-num-seqs", "1", "--max-queue", "1",
                          env={"VLLM_MLX_FAULT_INJECTION": "1"})
    gateway = start_gateway(engine.address, logs, "--served-model-name", SERVED,
                            "--request-timeout", str(REQUEST_TIMEOUT_S))
    yield engine, gateway, tiny_model, logs
    gateway.stop()
    engine.stop()


@pytest.fixture(scope="module")
def engine(stack):
    return stack[0]


@pytest.fixture(scope="module")
def gateway(stack):
    return stack[1]


def stats(engine) -> pb.Stats:
    return engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)




def test_engine_failure_is_500_envelope_without_trace(gateway):
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "max_tokens": 20},
                   headers={"X-Request-Id": "fault-1"}, timeout=30)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "injected fault" in error["message"] and "Traceback" not in r.text


def test_engine_failure_mid_stream_is_an_error_event(gateway):
    sdk = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    stream = sdk.chat.completions.create(**{**CHAT, "max_tokens": 20}, stream=True,
                                         extra_headers={"X-Request-Id": "fault-2"})
    with pytest.raises(openai.APIError, match="injected fault"):
        for _ in stream:
            pass


def test_full_queue_is_429_with_retry_after(gateway, engine):
    """One request runs, one waits, the third is refused at once. The waiting
    one's client then leaves: its place in the engine's queue is freed."""

    async def main():
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as c:
            async with c.stream("POST", "/v1/chat/completions",
                                json={**CHAT, **LONG, "stream": True}) as running:
                lines = running.aiter_lines()
                await lines.__anext__()
                waiting = asyncio.create_task(c.post("/v1/completions", json={
                    "model": SERVED, "prompt": "wait", **LONG}))
                for _ in range(200):
                    if stats(engine).waiting == 1:
                        break
                    await asyncio.sleep(0.02)
                assert stats(engine).waiting == 1
                tic = time.monotonic()
                refused = await c.post("/v1/chat/completions", json=CHAT)
                elapsed = time.monotonic() - tic
                sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x",
                                         max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    await sdk.chat.completions.create(**CHAT)
                waiting.cancel()  # the client hangs up while queued
                for _ in range(100):
                    if stats(engine).waiting == 0:
                        break
                    await asyncio.sleep(0.02)
                queue_after_leaving = stats(engine).waiting
            return refused, elapsed, queue_after_leaving

    refused, elapsed, queue_after_leaving = asyncio.run(main())
    assert refused.status_code == 429 and elapsed < 1
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert queue_after_leaving == 0
    assert wait_until(lambda: stats(engine).running == 0)


def test_hung_engine_gives_504_and_health_503(gateway, engine):
    assert wait_until(lambda: stats(engine).running == 0 and stats(engine).waiting == 0)
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
    os.kill(engine.proc.pid, signal.SIGSTOP)
    try:
        tic = time.monotonic()
        health = httpx.get(f"{gateway.url}/health", timeout=30)
        health_s = time.monotonic() - tic
        tic = time.monotonic()
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=30)
        generate_s = time.monotonic() - tic
    finally:
        os.kill(engine.proc.pid, signal.SIGCONT)
    assert health.status_code == 503 and health_s < 2
    assert "unreachable" in health.json()["error"]["message"]
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert REQUEST_TIMEOUT_S - 0.5 < generate_s < REQUEST_TIMEOUT_S + 2
    assert wait_until(lambda: httpx.get(f"{gateway.url}/health").status_code == 200)


def test_dead_engine_is_503_at_once_then_recovered(stack):
    engine, gateway, model, logs = stack
    sdk = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=30)
    assert wait_until(lambda: stats(engine).running == 0)
    stream = sdk.chat.completions.create(**CHAT | {"max_tokens": 1900}, stream=True,
                                         extra_body={"ignore_eos": True})
    next(iter(stream))
    engine.proc.kill()
    engine.proc.wait()
    tic = time.monotonic()
    with pytest.raises(openai.APIError):  # an error event ends the open stream
        for _ in stream:
            pass
    assert time.monotonic() - tic < 2

    for method, path, body in [("GET", "/health", None),
                               ("POST", "/v1/chat/completions", CHAT),
                               ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
                               ("POST", "/v1/completions", {"model": SERVED, "prompt": "x"})]:
        for _ in range(3):
            tic = time.monotonic()
            r = httpx.request(method, f"{gateway.url}{path}", json=body, timeout=30)
            assert time.monotonic() - tic < 1, path
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "engine_unavailable"
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(**CHAT)

    # A new engine on the same address is found again without a gateway restart.
    port = engine.address.rsplit(":", 1)[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_worker", "--model", str(model), "--host", "127.0.0.1",
         "--port", port], cwd=ROOT, stdout=open(logs / "engine-restarted.log", "wb"),
        stderr=subprocess.STDOUT)
    try:
        wait_for_serving(engine.address, 60, is_alive=lambda: proc.poll() is None)
        tic = time.monotonic()
        assert wait_until(lambda: httpx.get(f"{gateway.url}/health").status_code == 200, 5)
        assert time.monotonic() - tic < 2.5
        assert sdk.chat.completions.create(**CHAT).usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_gateway_log_has_no_trace(gateway):
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]
