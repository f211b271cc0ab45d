"""Load: 256 concurrent streams through a real gateway and engine, a tenth of
them abandoned at random; every stream that completes is well-formed (JSON
events, usage, [DONE]), nothing answers 5xx, and the engine's gauges return
to zero."""

import asyncio
import json
import random

import httpx
import pytest

from vllm_mlx.v1 import engine_pb2 as pb

from ..conftest import start_engine, start_gateway, wait_until

STREAMS, MAX_TOKENS = 256, 24


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    engine = start_engine(tiny_model, logs, "--max-num-seqs", "64", "--max-queue", "256")
    gateway = start_gateway(engine.address, logs)
    yield engine, gateway
    gateway.stop()
    engine.stop()


async def _stream(client: httpx.AsyncClient, i: int, leave_after: int | None) -> dict:
    body = {"model": "default", "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Stream number {i}"}]}
    events, text = [], ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": (await r.aread())[:300]}
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                return {"status": 200, "bad line": line[:300], "events": events[-3:]}
            events.append(line[6:])
            if leave_after is not None and len(events) >= leave_after:
                return {"status": 200, "left": True}
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        assert "error" not in c, c
        for choice in c["choices"]:
            text += choice["delta"].get("content") or ""
    return {"status": 200, "done": events[-1] == "[DONE]", "usage": chunks[-1]["usage"],
            "finish": [ch["finish_reason"] for c in chunks for ch in c["choices"]
                       if ch.get("finish_reason")], "text": text}


def test_256_streams_with_a_tenth_abandoned(stack):
    engine, gateway = stack
    rng = random.Random(7)
    leave = {i: rng.randint(1, 6) for i in rng.sample(range(STREAMS), STREAMS // 10)}

    async def run():
        limits = httpx.Limits(max_connections=STREAMS + 16)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as c:
            return await asyncio.gather(*[_stream(c, i, leave.get(i)) for i in range(STREAMS)])

    results = asyncio.run(run())
    assert [r["status"] for r in results] == [200] * STREAMS, \
        [r for r in results if r["status"] != 200][:3]
    completed = [r for r in results if not r.get("left")]
    assert len(completed) == STREAMS - len(leave)
    for r in completed:
        assert "bad line" not in r, r
        assert r["done"] and r["finish"] == ["length"], r
        u = r["usage"]
        assert u["completion_tokens"] == MAX_TOKENS and u["prompt_tokens"] > 0
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]

    def idle() -> bool:
        s = engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)
        return s.running == s.waiting == s.in_flight == 0

    assert wait_until(idle, 10)
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'status="5' not in metrics
