"""Overload is answered, not absorbed: past the engine's capacity (running
plus waiting) a request gets a 429 with Retry-After, never a 500."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..conftest import start_engine, start_gateway

MAX_NUM_SEQS, MAX_QUEUE = 8, 2


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    engine = start_engine(tiny_model, logs, "--max-num-seqs", str(MAX_NUM_SEQS),
                          "--max-queue", str(MAX_QUEUE))
    gateway = start_gateway(engine.address, logs)
    yield gateway
    gateway.stop()
    engine.stop()


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
