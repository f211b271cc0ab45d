"""The engine loop in-process with the tiny model: batching must not change
what each request would get alone."""

import queue
import threading

import pytest

from engine_worker.model import load_model, read_facts
from engine_worker.sampling import SamplingParams
from engine_worker.scheduler import Engine, Output, Request
from vllm_mlx.settings import EngineSettings


class Collector:
    """Gathers each request's outputs as the engine publishes them."""

    def __init__(self):
        self.outputs: dict[str, list[Output]] = {}
        self.done: dict[str, threading.Event] = {}
        self.q = queue.SimpleQueue()

    def publish(self, batch):
        for _, out in batch:
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finish_reason:
                self.done.setdefault(out.request_id, threading.Event()).set()

    def wait(self, request_id, timeout=60) -> list[Output]:
        ev = self.done.setdefault(request_id, threading.Event())
        assert ev.wait(timeout), f"{request_id} did not finish"
        return self.outputs[request_id]


@pytest.fixture(scope="module")
def engine(tiny_model):
    collector = Collector()
    settings = EngineSettings(model=str(tiny_model), max_num_seqs=8, max_queue=64)
    e = Engine(settings, lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    assert e.ready.wait(60) and e.load_error is None
    e.collector = collector
    yield e
    e.stop()


def tokens_of(outputs: list[Output]) -> list[int]:
    return [o.token for o in outputs if o.token is not None]


def run(engine, rid, prompt, max_tokens=24, **sampling) -> list[Output]:
    engine.submit(Request(rid, prompt, max_tokens, SamplingParams(**sampling), sink=None))
    return engine.collector.wait(rid)


PROMPTS = [[5, 17, 33, 2 + i, 99, 120 + 3 * i][: 3 + i % 4] for i in range(8)]


def test_batched_greedy_equals_unbatched(engine):
    alone = [tokens_of(run(engine, f"alone-{i}", p)) for i, p in enumerate(PROMPTS)]
    for i, p in enumerate(PROMPTS):
        engine.submit(Request(f"batch-{i}", p, 24, SamplingParams(), sink=None))
    together = [tokens_of(engine.collector.wait(f"batch-{i}")) for i in range(len(PROMPTS))]
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1, "the tiny model should not be constant"


def test_mid_decode_joins_keep_outputs(engine):
    """Requests inserted while others are decoding (the '[rope] offset' crash
    seen in other servers) get exactly their solo output."""
    alone = [tokens_of(run(engine, f"solo-{i}", p, max_tokens=40)) for i, p in enumerate(PROMPTS)]
    seen = threading.Event()
    first = engine.collector.publish

    def publish(batch):  # join new requests as soon as decoding has started
        first(batch)
        seen.set()

    engine._publish = publish
    try:
        engine.submit(Request("join-0", PROMPTS[0], 40, SamplingParams(), sink=None))
        for i, p in enumerate(PROMPTS[1:], start=1):
            seen.clear()
            assert seen.wait(10)
            engine.submit(Request(f"join-{i}", p, 40, SamplingParams(), sink=None))
        joined = [tokens_of(engine.collector.wait(f"join-{i}")) for i in range(len(PROMPTS))]
    finally:
        engine._publish = first
    assert joined == alone


def test_per_request_sampling_inside_one_batch(engine):
    """Greedy, seeded-hot and penalised requests side by side each get what
    they get alone: one sampler is not applied to the whole batch."""
    kinds = [dict(), dict(temperature=1.5, seed=7), dict(temperature=0.8, top_k=5, seed=3),
             dict(temperature=1.0, top_p=0.9, min_p=0.05, seed=11),
             dict(frequency_penalty=2.0), dict(logit_bias={42: 100.0})]
    alone = [tokens_of(run(engine, f"s-alone-{i}", PROMPTS[1], **k)) for i, k in enumerate(kinds)]
    for i, k in enumerate(kinds):
        engine.submit(Request(f"s-batch-{i}", PROMPTS[1], 24, SamplingParams(**k), sink=None))
    together = [tokens_of(engine.collector.wait(f"s-batch-{i}")) for i in range(len(kinds))]
    assert together == alone
    assert alone[5] == [42] * 24, "logit_bias +100 forces the token"
    assert alone[1] != alone[0], "seeded sampling at temperature 1.5 should leave greedy"
    assert alone[4] != alone[0], "a frequency penalty must change greedy output"


def test_same_seed_same_tokens_other_seed_differs(engine):
    a = tokens_of(run(engine, "seed-a", PROMPTS[2], temperature=2.0, seed=1))
    b = tokens_of(run(engine, "seed-b", PROMPTS[2], temperature=2.0, seed=1))
    c = tokens_of(run(engine, "seed-c", PROMPTS[2], temperature=2.0, seed=2))
    assert a == b and a != c


def test_abort_waiting_and_running(engine):
    engine.submit(Request("long", PROMPTS[3], 1000, SamplingParams(), sink=None))
    assert engine.abort("long")
    outs = engine.collector.wait("long")
    assert outs[-1].finish_reason == "abort"
    assert not engine.abort("long"), "a finished request is no longer in flight"
