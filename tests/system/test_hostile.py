"""Hostile clients against a real gateway: idle half-sent requests by the
thousand, huge headers and bodies, stalled bodies. The service keeps
answering everyone else, and nothing is read that will be refused."""

import multiprocessing as mp
import socket
import time

import httpx
import psutil
import pytest

from ..conftest import start_engine, start_gateway, wait_until

HEADER_TIMEOUT_S = 4.0
ATTACKER = "127.0.0.2"  # loopback too; the well-behaved client is 127.0.0.1
PER_HOLDER = 1900


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    engine = start_engine(tiny_model, logs)
    gateway = start_gateway(engine.address, logs, "--header-timeout", str(HEADER_TIMEOUT_S),
                            "--body-timeout", "3", "--max-body-bytes", str(8 << 20),
                            "--max-connections", "3000", "--max-connections-per-client", "512",
                            "--max-messages", "8")
    yield gateway
    gateway.stop()
    engine.stop()


def _hold_half_sent(port: int, n: int, ready, done) -> None:
    """In a process of its own (file descriptors): open n connections from
    ATTACKER, each with half a request, and hold them until told."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        try:
            s.bind((ATTACKER, 0))
            s.connect(("127.0.0.1", port))
            s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
        except OSError:
            s.close()
            continue
        socks.append(s)
    ready.set()
    done.wait(300)
    for s in socks:
        s.close()


def test_idle_half_sent_connections_do_not_starve_others(gateway, request):
    """20,000 in the long run (--idle-connections), 2,000 by default: /health
    and a real request from another client still answer at once, and the
    held connections are answered 408 and closed after the header timeout."""
    total = request.config.getoption("idle_connections")
    port = int(gateway.url.rsplit(":", 1)[1])
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    holders = []
    # Importing mlx_lm (as conftest does) sets this process's open-file
    # limit to 2048, and spawned children inherit it: hold PER_HOLDER each.
    for k in range(0, total, PER_HOLDER):
        ready = ctx.Event()
        p = ctx.Process(target=_hold_half_sent,
                        args=(port, min(PER_HOLDER, total - k), ready, done))
        p.start()
        holders.append((p, ready))
    try:
        for _, ready in holders:
            assert ready.wait(240)
        gw = psutil.Process(gateway.proc.pid)
        open_now = len(gw.net_connections(kind="tcp"))
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            tic = time.monotonic()
            assert http.get("/health").status_code == 200
            r = http.post("/v1/completions", json={"model": "default", "prompt": "hi",
                                                   "max_tokens": 4})
            took = time.monotonic() - tic
        assert r.status_code == 200 and took < 5, (r.status_code, took)
        assert open_now < 3000 + 100, open_now  # the cap held
        # The held ones are answered and closed once the header timeout passes.
        assert wait_until(lambda: len(gw.net_connections(kind="tcp")) < 50,
                          HEADER_TIMEOUT_S + 30, interval=0.5)
        print(f"\n[reliability] {total} half-sent connections from one client: gateway held "
              f"{open_now}, /health + a 4-token completion took {took * 1000:.0f} ms")
    finally:
        done.set()
        for p, _ in holders:
            p.join(30)


def test_a_huge_declared_body_is_refused_before_it_is_read(gateway):
    gw = psutil.Process(gateway.proc.pid)
    before = gw.memory_info().rss
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])),
                                  timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")
        s.sendall(b"{" + b" " * 65536)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code": "body_too_large"' in answer
    assert gw.memory_info().rss - before < 20 << 20


def test_a_chunked_body_over_the_limit_is_cut_off(gateway):
    def chunks():
        for _ in range(20):
            yield b"x" * (1 << 20)

    r = httpx.post(f"{gateway.url}/v1/completions", content=chunks(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_huge_headers_are_refused(gateway):
    r = httpx.get(f"{gateway.url}/health", headers={"X-Big": "a" * 200_000}, timeout=10)
    assert r.status_code == 431


def test_a_stalled_body_times_out(gateway):
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])),
                                  timeout=20) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        tic = time.monotonic()
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 2.5 < time.monotonic() - tic < 10


def test_request_size_caps_are_set_by_flags_and_checked_before_the_items(gateway):
    """--max-messages 8 here: nine are refused; 100,000 (3 MB of JSON) are
    refused by their count, before each message is validated."""
    def post(n: int) -> tuple[httpx.Response, float]:
        tic = time.monotonic()
        r = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, json={
            "model": "default", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hello"}] * n})
        return r, time.monotonic() - tic

    assert post(8)[0].status_code == 200
    r, _ = post(9)
    assert r.status_code == 400 and "more than the 8" in r.json()["error"]["message"]
    r, took = post(100_000)
    assert r.status_code == 400 and took < 2, took


def test_malformed_and_oversized_grpc_messages(tiny_model, tmp_path):
    """Bytes that are no GenerateRequest, and a message over the engine's
    96 MiB cap, are refused; the engine serves on."""
    import grpc

    from vllm_mlx.settings import MAX_GRPC_MESSAGE_BYTES
    from vllm_mlx.v1 import engine_pb2 as pb

    engine = start_engine(tiny_model, tmp_path)
    try:
        with grpc.insecure_channel(engine.address, options=[
                ("grpc.max_send_message_length", -1)]) as channel:
            raw = channel.unary_stream("/vllm_mlx.v1.Engine/Generate")
            for garbage in (b"\xff\xff\xff\xff", b"\x12\x05abc", b"\x0a" + b"\xff" * 64):
                with pytest.raises(grpc.RpcError) as info:
                    list(raw(garbage, timeout=10))
                # grpc.aio's own answer to bytes it cannot parse
                assert info.value.code() == grpc.StatusCode.UNKNOWN
                assert "Error parsing message" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                list(raw(pb.GenerateRequest(text="x" * (MAX_GRPC_MESSAGE_BYTES + 1024))
                         .SerializeToString(), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = list(engine.stub.Generate(pb.GenerateRequest(text="hi", max_tokens=3),
                                          timeout=30))
        assert reply[-1].finished and reply[-1].completion_tokens == 3
    finally:
        engine.stop()
