"""Hangs are detected and replaced: a stopped (SIGSTOP) engine core, engine
front end or gateway under `vllm-mlx-up` is killed and restarted like a
crashed one, requests in flight end with a clean error instead of waiting
out their deadline, and new ones get a 503 at once while the engine is down.

Each test prints its recovery times ("[reliability] ..."; docs/reliability.md)."""

import threading
import time

import httpx
import openai
import psutil
import pytest

from vllm_mlx.v1 import engine_pb2 as pb

from ..conftest import start_engine, wait_until
from ..test_supervisor import Up, chat
from .processes import engine_core, gone

LIVENESS_S = 3.0


def _started(model, cache) -> Up:
    u = Up("--model", str(model), "--liveness-timeout", str(LIVENESS_S), cache=cache)
    u.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving")
    return u


@pytest.fixture
def up(tiny_model, tmp_path):
    u = _started(tiny_model, tmp_path)
    yield u
    u.stop()


class Streams:
    """Streaming chats in threads; each records how it ended and when."""

    def __init__(self, up, n: int = 3):
        self.ended: list[tuple[str, float]] = []
        self.started = threading.Barrier(n + 1)
        for _ in range(n):
            threading.Thread(target=self._run, args=(up.client(),), daemon=True).start()
        self.started.wait(30)

    def _run(self, client) -> None:
        stream = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=1900,
            stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        self.started.wait(30)
        try:
            for _ in stream:
                pass
            outcome = "finished"
        except openai.APIError as e:
            outcome = f"error: {e}"
        self.ended.append((outcome, time.monotonic()))


def _serving_again(up, since: float, limit: float) -> float:
    def ok() -> bool:
        try:
            return len(chat(up.client())) > 0
        except openai.APIError:
            return False

    assert wait_until(ok, limit, interval=0.2), up.text()[-3000:]
    return time.monotonic() - since


def _check_streams(streams: Streams, since: float, limit: float) -> float:
    assert wait_until(lambda: len(streams.ended) == 3, limit), streams.ended
    assert all(outcome.startswith("error") for outcome, _ in streams.ended), streams.ended
    return max(t for _, t in streams.ended) - since


def test_a_stopped_engine_core_is_replaced(up):
    streams = Streams(up)
    core = engine_core(up.pid("engine"))
    core.suspend()
    tic = time.monotonic()
    ended = _check_streams(streams, tic, LIVENESS_S + 10)
    assert wait_until(lambda: gone(core), 10), "the stopped core was left behind"
    back = _serving_again(up, tic, 60)
    print(f"\n[reliability] SIGSTOP engine core (liveness {LIVENESS_S:.0f}s): streams "
          f"ended with an error after {ended:.1f}s, serving again after {back:.1f}s")


def test_a_stopped_engine_front_end_is_replaced(up):
    streams = Streams(up)
    front = psutil.Process(up.pid("engine"))
    core = engine_core(front.pid)
    mark = len(up.lines)
    front.suspend()
    tic = time.monotonic()
    ended = _check_streams(streams, tic, 15)
    # While it is down, new requests fail at once (until it is replaced).
    with httpx.Client(timeout=30) as http:
        t = time.monotonic()
        r = http.post(f"{up.base_url}/chat/completions", json={
            "model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        fast = time.monotonic() - t
    if r.status_code == 503:
        assert fast < 1.5, fast
    up.wait_for(r"engine answered no health check", after=mark, timeout=LIVENESS_S + 10)
    assert wait_until(lambda: gone(front) and gone(core), 15)
    back = _serving_again(up, tic, 60)
    print(f"\n[reliability] SIGSTOP engine front end (liveness {LIVENESS_S:.0f}s): streams "
          f"ended with an error after {ended:.1f}s, new request {r.status_code} in "
          f"{fast * 1000:.0f} ms, serving again after {back:.1f}s")


@pytest.mark.parametrize("fault", ["suspend", "kill"])
def test_a_stopped_or_killed_gateway_is_replaced(up, fault):
    streams = Streams(up)
    gateway = psutil.Process(up.pid("gateway"))
    mark = len(up.lines)
    getattr(gateway, fault)()
    tic = time.monotonic()
    if fault == "suspend":
        up.wait_for(r"gateway answered no health check", after=mark, timeout=LIVENESS_S + 10)
    assert up.pid("gateway", after=mark) != gateway.pid
    ended = _check_streams(streams, tic, LIVENESS_S + 10)  # their connections went with it
    back = _serving_again(up, tic, 60)
    assert wait_until(lambda: gone(gateway), 10)
    print(f"\n[reliability] {fault} gateway (liveness {LIVENESS_S:.0f}s): streams ended "
          f"with an error after {ended:.1f}s, serving again after {back:.1f}s")


def test_a_long_prefill_is_not_taken_for_a_hang(smollm2_folder, tmp_path):
    """A prompt whose prefill takes several times the liveness timeout (the
    real SmolLM2's, bfloat16 on a CPU: about 70 ms a token) is prefilled in
    passes that each fit in it, and the core reports after each: the request
    finishes and the core lives. Before, its one pass of the whole prompt got
    the core killed as hung."""
    liveness = 5.0
    e = start_engine(smollm2_folder, tmp_path, "--liveness-timeout", str(liveness))
    try:
        prompt = [(37 * i) % 40000 + 100 for i in range(200)]
        tic = time.monotonic()
        replies = list(e.stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt), max_tokens=2), timeout=300))
        took = time.monotonic() - tic
        assert replies[-1].finished and replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert e.proc.poll() is None and "no progress" not in e.log()
    finally:
        e.stop()
    if took < 2 * liveness:
        pytest.skip(f"the prefill took {took:.1f} s here: too fast to show anything")


def test_liveness_flag_reaches_the_engine(up):
    assert f"--liveness-timeout {LIVENESS_S}" in " ".join(
        psutil.Process(up.pid("engine")).cmdline())


def test_a_killed_engine_core_is_replaced(up):
    streams = Streams(up)
    core = engine_core(up.pid("engine"))
    core.kill()
    tic = time.monotonic()
    ended = _check_streams(streams, tic, 10)
    back = _serving_again(up, tic, 60)
    print(f"\n[reliability] kill -9 engine core: streams ended with an error after "
          f"{ended:.1f}s, serving again after {back:.1f}s")


@pytest.fixture
def vlm_up(tiny_vlm, tmp_path):
    u = _started(tiny_vlm, tmp_path)
    yield u
    u.stop()


@pytest.mark.parametrize("fault", ["kill", "suspend"])
def test_a_media_worker_fault_under_image_load(vlm_up, fault):
    """Image requests keep being answered while one of the two media workers
    is killed or stopped; a stopped one is replaced after the liveness
    timeout, and none is left behind."""
    from ..test_multimodal_e2e import noise_png, png_url

    images = [png_url(noise_png(64, 48, seed=k)) for k in range(8)]
    client = vlm_up.client()

    def ask(k: int) -> str:
        # ignore_eos: an answer always runs to max_tokens ("length"); sampled
        # freely, the tiny model ends on EOS now and then.
        r = client.chat.completions.create(model="default", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[k]}},
                                         {"type": "text", "text": "What is it?"}]}],
            extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason

    assert ask(0) == "length"
    mark = len(vlm_up.lines)
    worker = psutil.Process(vlm_up.pid("media-0"))
    getattr(worker, fault)()
    tic = time.monotonic()
    outcomes = []
    for k in range(1, 8):
        try:
            outcomes.append(ask(k))
        except openai.APIError as e:
            outcomes.append(f"error {e}")
    took = time.monotonic() - tic
    if fault == "suspend":
        vlm_up.wait_for(r"media-0 answered no health check", after=mark, timeout=LIVENESS_S + 10)
    assert wait_until(lambda: gone(worker), 15)
    new = vlm_up.pid("media-0", after=mark)
    assert new != worker.pid
    try:
        assert ask(0) == "length"
    except openai.APIError:
        raise AssertionError(vlm_up.text()[-6000:]) from None
    print(f"\n[reliability] {fault} a media worker under image requests: "
          f"{outcomes.count('length')}/7 answered in {took:.1f}s; errors: "
          f"{[o for o in outcomes if o != 'length']}")
    assert outcomes.count("length") >= 5, outcomes
