"""Overload is answered, not absorbed: past the engine's capacity (running
plus waiting) a request gets a 429 with Retry-After, never a 500."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vllm_mlx.v1 import engine_pb2 as pb

from ..conftest import start_engine, start_gateway, wait_until

MAX_NUM_SEQS, MAX_QUEUE = 8, 2


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    engine = start_engine(tiny_model, logs, "--max-num-seqs", str(MAX_NUM_SEQS),
                          "--max-queue", str(MAX_QUEUE))
    gateway = start_gateway(engine.address, logs)
    yield engine, gateway
    gateway.stop()
    engine.stop()


@pytest.fixture(scope="module")
def gateway(stack):
    return stack[1]


def _burst(gateway, n: int) -> list[httpx.Response]:
    body = {"model": "default", "prompt": "hello", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=gateway.url, timeout=120) as client, \
            ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.post("/v1/completions", json=body), range(n)))


def test_a_burst_within_capacity_is_served(gateway):
    """A burst of exactly running + waiting capacity arrives while the engine
    gathers it into prefill batches: all of it waits at once. The core once
    counted only waiting requests against max_queue and failed 8 of these
    10 with a 500 "QueueFull"."""
    statuses = [r.status_code for r in _burst(gateway, MAX_NUM_SEQS + MAX_QUEUE)]
    assert statuses == [200] * (MAX_NUM_SEQS + MAX_QUEUE), statuses


def test_twice_the_capacity_gives_200s_and_429s(gateway):
    responses = _burst(gateway, 2 * (MAX_NUM_SEQS + MAX_QUEUE))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= MAX_NUM_SEQS
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"]


def test_a_request_of_many_choices_is_admitted_whole_or_not_at_all(stack):
    """Each choice is a request in the engine: a request whose choices do not
    all fit is refused before any of them starts, never after others ran."""
    engine, gateway = stack
    body = {"model": "default", "prompt": "hello", "max_tokens": 4}
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        r = client.post("/v1/completions", json={**body, "n": MAX_NUM_SEQS + MAX_QUEUE + 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        with ThreadPoolExecutor(MAX_NUM_SEQS) as pool:
            long = {**body, "max_tokens": 1500, "ignore_eos": True}
            running = [pool.submit(client.post, "/v1/completions", json=long)
                       for _ in range(MAX_NUM_SEQS)]
            assert wait_until(lambda: engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)
                              .running == MAX_NUM_SEQS, 30)
            total = engine.stub.GetStats(pb.GetStatsRequest(), timeout=5).requests_total
            tic = time.monotonic()
            r = client.post("/v1/completions", json={**body, "n": MAX_QUEUE + 1})
            assert r.status_code == 429 and time.monotonic() - tic < 1, r.text
            assert engine.stub.GetStats(pb.GetStatsRequest(), timeout=5).requests_total == total
            assert client.post("/v1/completions", json=body).status_code == 200
            assert all(f.result().status_code == 200 for f in running)
