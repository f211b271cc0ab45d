"""The engine's memory limit: requests that do not fit yet wait, one that
never can is refused, and nothing crashes."""

import threading

import grpc
import pytest

from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import start_engine, wait_until


def info(engine) -> pb.ModelInfo:
    return engine.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)


def test_model_info_reports_the_budget(engine):
    i = info(engine)
    # tiny: 2 layers x 2 KV heads x 16 dims x (K and V) x float32
    assert i.kv_bytes_per_token == 2 * 2 * 16 * 2 * 4
    assert 0 < i.weights_bytes < i.memory_limit_bytes


@pytest.fixture(scope="module")
def small_engine(engine, tiny_model, tmp_path_factory):
    """Room beside the weights for 1,000 tokens of KV, no prefix cache."""
    i = info(engine)
    limit = i.weights_bytes + 1000 * i.kv_bytes_per_token
    e = start_engine(tiny_model, tmp_path_factory.mktemp("mem"), "--no-prefix-cache",
                     "--max-memory", str(limit))
    yield e
    e.stop()


def test_a_request_that_can_never_fit_is_refused(small_engine):
    with pytest.raises(grpc.RpcError) as err:
        list(small_engine.stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5] * 10), max_tokens=1500), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens (1500)" in err.value.details() and "bytes" in err.value.details()


def test_requests_that_do_not_fit_together_take_turns(small_engine):
    """Two requests of 610 tokens each: one runs while the other waits."""
    results, seen = [], set()

    def run(i):
        rs = list(small_engine.stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5 + i] * 10), max_tokens=600, ignore_eos=True),
            timeout=120))
        results.append(rs[-1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    def watch():
        s = small_engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)
        seen.add((s.running, s.waiting))
        assert s.running <= 1
        return not any(t.is_alive() for t in threads)

    assert wait_until(watch, timeout=120, interval=0.05)
    assert [r.completion_tokens for r in results] == [600, 600]
    assert all(r.finish_reason == pb.FINISH_REASON_LENGTH for r in results)
    # Both may wait together for a moment, while the idle engine gathers
    # arrivals; then one runs while the other waits.
    assert (1, 1) in seen
