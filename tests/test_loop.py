"""The engine loop in-process with the tiny model: batching must not change
what each request would get alone."""

import importlib
import threading
import time

import pytest

from engine_worker import admission
from engine_worker.loop import Loop
from engine_worker.messages import Output, Request
from engine_worker.model import load_model, read_facts
from engine_worker.sampling import SamplingParams
from vllm_mlx.settings import EngineSettings


class Collector:
    """Gathers each request's outputs as the engine publishes them."""

    def __init__(self):
        self.outputs: dict[str, list[Output]] = {}
        self.done: dict[str, threading.Event] = {}
        self.published = threading.Event()  # set after every publish

    def publish(self, batch):
        for out in batch:
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finish_reason:
                self.done.setdefault(out.request_id, threading.Event()).set()
        if len(batch):
            self.published.set()

    def wait(self, request_id, timeout=60) -> list[Output]:
        ev = self.done.setdefault(request_id, threading.Event())
        assert ev.wait(timeout), f"{request_id} did not finish"
        return self.outputs[request_id]

    def guard(self, engine: Loop) -> None:
        """Make `engine.submit` refuse a request id this collector has seen:
        `wait` would return the earlier request's outputs at once (an
        engine shared by a module's tests)."""
        submit = engine.submit

        def once(request: Request) -> None:
            assert request.request_id not in self.outputs, \
                f"{request.request_id} was used by an earlier request"
            submit(request)

        engine.submit = once


@pytest.fixture(scope="module")
def engine(tiny_model):
    collector = Collector()
    settings = EngineSettings(model=str(tiny_model), max_num_seqs=8, max_queue=64)
    e = Loop(settings, lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    assert e.ready.wait(60) and e.load_error is None
    e.collector = collector
    collector.guard(e)
    yield e
    e.stop()


def tokens_of(outputs: list[Output]) -> list[int]:
    return [o.token for o in outputs if o.token is not None]


def run(engine, rid, prompt, max_tokens=24, **sampling) -> list[Output]:
    engine.submit(Request(rid, prompt, max_tokens, SamplingParams(**sampling)))
    return engine.collector.wait(rid)


PROMPTS = [[5, 17, 33, 2 + i, 99, 120 + 3 * i][: 3 + i % 4] for i in range(8)]


def test_batched_greedy_equals_unbatched(engine):
    alone = [tokens_of(run(engine, f"alone-{i}", p)) for i, p in enumerate(PROMPTS)]
    for i, p in enumerate(PROMPTS):
        engine.submit(Request(f"batch-{i}", p, 24, SamplingParams()))
    together = [tokens_of(engine.collector.wait(f"batch-{i}")) for i in range(len(PROMPTS))]
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1, "the tiny model should not be constant"


def _mlx_lm_reference(model_path, prompts, params) -> list[tuple[list[int], list[float]]]:
    """Each prompt's tokens and their log-probabilities from mlx-lm's own
    BatchGenerator, all prompts in one batch."""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from engine_worker.sampling import make_processors, make_sampler

    model, _ = load(str(model_path))
    gen = BatchGenerator(model)
    uids = gen.insert(prompts, max_tokens=[24] * len(prompts),
                      samplers=[make_sampler(p) for p in params],
                      logits_processors=[make_processors(p, len(q))
                                         for p, q in zip(params, prompts)])
    got = {uid: ([], []) for uid in uids}
    while responses := gen.next_generated():
        for r in responses:
            got[r.uid][0].append(r.token)
            got[r.uid][1].append(r.logprobs[r.token].item())
    gen.close()
    return [got[uid] for uid in uids]


@pytest.mark.parametrize("kinds, wants_logprobs", [
    ([{}] * 4, [False] * 4),  # all greedy, no logprobs: the argmax of raw logits
    ([{}, dict(temperature=1.5, seed=7), dict(frequency_penalty=2.0), {}],
     [True, False, True, False]),
])
def test_the_decode_step_gives_what_mlx_lms_gives(engine, tiny_model, kinds, wants_logprobs):
    """The engine's own decode step (mlx_compat.py) skips work no request asked
    for; every row still gets the tokens, and the log-probabilities where
    asked, that mlx-lm's step gives it."""
    params = [SamplingParams(**k) for k in kinds]
    prompts = PROMPTS[:len(kinds)]
    reference = _mlx_lm_reference(tiny_model, prompts, params)
    tag = "".join("l" if w else "-" for w in wants_logprobs)
    for i, (p, w) in enumerate(zip(params, wants_logprobs)):
        engine.submit(Request(f"step-{tag}-{i}", prompts[i], 24, p, logprobs=w,
                              top_logprobs=2 if w else 0))
    for i, (tokens, logprobs) in enumerate(reference):
        outs = [o for o in engine.collector.wait(f"step-{tag}-{i}") if o.token is not None]
        assert [o.token for o in outs] == tokens
        if wants_logprobs[i]:
            assert [o.logprob.logprob for o in outs] == pytest.approx(logprobs, abs=1e-4)
            assert all(o.logprob.top[0][1] >= o.logprob.logprob for o in outs)
        else:
            assert all(o.logprob is None for o in outs)


def test_mid_decode_joins_keep_outputs(engine):
    """Requests inserted while others are decoding (the '[rope] offset' crash
    seen in other servers) get exactly their solo output."""
    alone = [tokens_of(run(engine, f"solo-{i}", p, max_tokens=40)) for i, p in enumerate(PROMPTS)]
    seen = engine.collector.published  # join new requests as soon as decoding has started
    engine.submit(Request("join-0", PROMPTS[0], 40, SamplingParams()))
    for i, p in enumerate(PROMPTS[1:], start=1):
        seen.clear()
        assert seen.wait(10)
        engine.submit(Request(f"join-{i}", p, 40, SamplingParams()))
    joined = [tokens_of(engine.collector.wait(f"join-{i}")) for i in range(len(PROMPTS))]
    assert joined == alone


def test_requests_joining_a_decoding_batch_are_primed(engine, monkeypatch):
    """A request whose prompt pass ends while others decode joins with its
    prompt's last token as its input: the batch's next step computes its
    first token (no forward pass of its own, which every stream waited
    for), and it gets exactly what it gets alone: sampled, penalised, with
    log-probabilities, a stop token as its first, one token long."""
    from mlx_lm.generate import GenerationBatch

    from engine_worker import mlx_compat

    def requests(tag):
        kinds = [dict(), dict(temperature=1.5, seed=7), dict(frequency_penalty=2.0),
                 dict(logit_bias={42: 100.0})]
        rs = [Request(f"{tag}-{i}", PROMPTS[2], 16, SamplingParams(**k))
              for i, k in enumerate(kinds)]
        rs.append(Request(f"{tag}-lp", PROMPTS[2], 16, SamplingParams(), logprobs=True,
                          top_logprobs=3))
        rs.append(Request(f"{tag}-one", PROMPTS[3], 1, SamplingParams()))
        rs.append(Request(f"{tag}-stop", PROMPTS[2], 16, SamplingParams(logit_bias={42: 100.0}),
                          stop_token_ids=[42]))
        return rs

    def outcome(outputs):
        return ([(o.token, o.finish_reason) for o in outputs],
                [(o.logprob.logprob, o.logprob.top) for o in outputs if o.logprob])

    alone = {r.request_id.rsplit("-", 1)[1]: outcome(run_request(engine, r))
             for r in requests("primed-alone")}
    own_steps, primed = [], []
    step, prime = GenerationBatch._step, mlx_compat._primed
    monkeypatch.setattr(GenerationBatch, "_step",
                        lambda self: own_steps.append(len(self.uids)) or step(self))
    monkeypatch.setattr(mlx_compat, "_primed",
                        lambda group, *a: primed.append(len(group.uids)) or prime(group, *a))
    engine.submit(Request("primed-decoding", PROMPTS[0], 400, SamplingParams()))
    seen = engine.collector.published
    seen.clear()
    assert seen.wait(10)  # it decodes
    joining = requests("primed-join")
    for r in joining:
        engine.submit(r)
    joined = {r.request_id.rsplit("-", 1)[1]: outcome(engine.collector.wait(r.request_id))
              for r in joining}
    engine.abort("primed-decoding")
    engine.collector.wait("primed-decoding")
    assert joined == alone
    # Only the request that found the batch idle ran a step of its own.
    assert sum(primed) == len(joining) and own_steps == [1]
    assert alone["stop"][0] == [(42, "stop")] and len(alone["one"][0]) == 1
    assert len(alone["lp"][1]) == 16 and len(alone["lp"][1][0][1]) == 3


def run_request(engine, request) -> list[Output]:
    engine.submit(request)
    return engine.collector.wait(request.request_id)


def test_per_request_sampling_inside_one_batch(engine):
    """Greedy, seeded-hot and penalised requests side by side each get what
    they get alone: one sampler is not applied to the whole batch."""
    kinds = [dict(), dict(temperature=1.5, seed=7), dict(temperature=0.8, top_k=5, seed=3),
             dict(temperature=1.0, top_p=0.9, min_p=0.05, seed=11),
             dict(frequency_penalty=2.0), dict(logit_bias={42: 100.0})]
    alone = [tokens_of(run(engine, f"s-alone-{i}", PROMPTS[1], **k)) for i, k in enumerate(kinds)]
    for i, k in enumerate(kinds):
        engine.submit(Request(f"s-batch-{i}", PROMPTS[1], 24, SamplingParams(**k)))
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
    engine.submit(Request("long", PROMPTS[3], 1000, SamplingParams()))
    assert engine.abort("long")
    outs = engine.collector.wait("long")
    assert outs[-1].finish_reason == "abort"
    assert not engine.abort("long"), "a finished request is no longer in flight"


def _recorded_passes(monkeypatch, measure) -> list[int]:
    """A list that gets `measure(chunks)` of every prefill pass mlx-lm runs
    (chunks: the pass's part of each prompt)."""
    gen_module = importlib.import_module("mlx_lm.generate")
    prompt = gen_module.PromptProcessingBatch.prompt
    measured: list[int] = []

    def recorded(self, tokens):
        if tokens:
            measured.append(measure(tokens))
        return prompt(self, tokens)

    monkeypatch.setattr(gen_module.PromptProcessingBatch, "prompt", recorded)
    return measured


def _recorded_pass_widths(monkeypatch) -> list[int]:
    """A list that gets the widest prompt chunk of every prefill pass."""
    return _recorded_passes(monkeypatch, lambda chunks: max(len(c) for c in chunks))


def _started(tiny_model, **settings) -> Loop:
    collector = Collector()
    e = Loop(EngineSettings(model=str(tiny_model), warmup=False, prefix_cache=False, **settings),
             lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    e.collector = collector
    assert e.ready.wait(60) and e.load_error is None
    return e


def test_a_prompt_arriving_mid_decode_prefills_in_small_chunks(tiny_model, monkeypatch):
    """While other requests decode, a long prompt prefills at most
    prefill_chunk_while_decoding tokens a step (their streams never wait for
    the whole of it); alone, it prefills in one pass. Its tokens are the
    same either way."""
    widths = _recorded_pass_widths(monkeypatch)
    e = _started(tiny_model, prefill_step_size=64, prefill_chunk_while_decoding=8)
    collector = e.collector
    try:
        long_prompt = [(7 * i) % 200 + 3 for i in range(41)]
        alone = tokens_of(run(e, "alone", long_prompt, max_tokens=8))
        assert widths == [40]  # all but its last token, in one pass
        widths.clear()
        e.submit(Request("decoding", [5, 17, 33], 200, SamplingParams()))
        collector.published.clear()
        assert collector.published.wait(10)  # it decodes
        widths.clear()
        beside = tokens_of(run(e, "beside", long_prompt, max_tokens=8))
        assert e.abort("decoding")
        collector.wait("decoding")
    finally:
        e.stop()
    assert beside == alone
    assert widths == [8] * 5, widths


def test_prompt_passes_are_cut_to_fit_the_liveness_timeout(tiny_model, monkeypatch):
    """The core reports nothing during a prompt pass, so once the engine has
    measured its prefill speed, a pass takes at most a 16th of the
    liveness timeout (here 2 ms of 32: fewer than 300 tokens of the tiny model on
    any machine), never under batch.MIN_CHUNK tokens; the tokens are the same."""
    from engine_worker.batch import MIN_CHUNK

    prompts = [[(k * i) % 200 + 3 for i in range(301)] for k in (7, 11)]
    e = _started(tiny_model)
    try:
        alone = tokens_of(run(e, "alone", prompts[1], max_tokens=8))
    finally:
        e.stop()
    widths = _recorded_pass_widths(monkeypatch)
    e = _started(tiny_model, liveness_timeout_s=0.032)
    try:
        run(e, "first", prompts[0], max_tokens=2)  # one pass: nothing measured yet
        assert widths == [300]
        widths.clear()
        cut = tokens_of(run(e, "measured", prompts[1], max_tokens=8))
    finally:
        e.stop()
    assert cut == alone
    assert len(widths) > 1 and sum(widths) == 300, widths
    assert all(w >= MIN_CHUNK for w in widths[:-1]), widths


def _recorded_prefill_sizes(monkeypatch) -> list[int]:
    """A list that gets the number of prompts of every prefill pass mlx-lm runs."""
    return _recorded_passes(monkeypatch, len)


def _prefill_sizes(engine_settings, tiny_model, monkeypatch, feed) -> list[int]:
    """Run a fresh engine; `feed(engine, prompt_responses, responses)` is
    called after every batch step (on the engine thread, so what it submits
    is seen at a known point). Returns the sizes of the prefill passes."""
    sizes = _recorded_prefill_sizes(monkeypatch)
    collector = Collector()
    e = Loop(EngineSettings(model=str(tiny_model), warmup=False, **engine_settings),
             lambda s: load_model(read_facts(s.model)), collector.publish,
             after_step=lambda prompt_responses, responses: feed(e, prompt_responses, responses))
    e.start()
    try:
        assert e.ready.wait(60) and e.load_error is None
        e.submit(Request("first", [5, 17, 33, 40], 48, SamplingParams()))
        collector.wait("first")
        for rid in list(collector.done):
            collector.wait(rid)
    finally:
        e.stop()
    return sizes


def test_burst_prefills_in_whole_batches(tiny_model, monkeypatch):
    """A burst landing just as a prompt moves from prefill to decoding joins
    a step later, in step with the generator: 8 + 8, not 7, 1, 7, 1, 1
    (each pass costs about as much whatever its size)."""
    burst = [Request(f"burst-{i}", p + [7, 8], 8, SamplingParams())
             for i, p in enumerate(PROMPTS * 2)]

    def feed(e, prompt_responses, responses):
        if burst and any(p.end_of_segment and not p.end_of_prompt for p in prompt_responses):
            for r in burst:
                e.submit(r)
            burst.clear()

    sizes = _prefill_sizes(dict(max_num_seqs=32, max_queue=64), tiny_model, monkeypatch, feed)
    assert sizes == [1, 8, 8]


@pytest.mark.parametrize("window,expected", [(0.0, [1, 2, 2, 2, 2]), (60.0, [1, 8])])
def test_trickle_waits_for_a_whole_prefill_batch(tiny_model, monkeypatch, window, expected):
    """Requests arriving two per step while a batch decodes are held, within
    admit_window_s, until a whole prefill batch has gathered."""
    trickle = [Request(f"trickle-{i}", p, 8, SamplingParams())
               for i, p in enumerate(PROMPTS)]

    def feed(e, prompt_responses, responses):
        if trickle and responses:  # "first" is decoding
            for _ in range(2):
                e.submit(trickle.pop(0))

    sizes = _prefill_sizes(dict(max_num_seqs=32, max_queue=64, admit_window_s=window),
                           tiny_model, monkeypatch, feed)
    assert sizes == expected


def _burst(e: Loop, collector: Collector, tag: str) -> None:
    """One request per prompt: the first arrives alone (the engine has taken
    it in), the rest follow at once; returns when all have finished."""
    rs = [Request(f"{tag}-{i}", p, 4, SamplingParams()) for i, p in enumerate(PROMPTS)]
    e.submit(rs[0])
    while not e.stats.waiting + e.stats.running:  # the loop has taken it in
        time.sleep(0)
    for r in rs[1:]:
        e.submit(r)
    for r in rs:
        collector.wait(r.request_id)


def test_an_idle_engine_gathers_a_burst_within_the_window(tiny_model, monkeypatch):
    """With admit_window_s, a burst reaching an idle engine prefills as one
    batch: the engine waits until a gap with no new arrival instead of
    starting a pass for the first request alone."""
    sizes = _recorded_prefill_sizes(monkeypatch)
    # A gap this machine's scheduling cannot exceed between two submits.
    monkeypatch.setattr(admission, "IDLE_GATHER_GAP_S", 0.05)
    collector = Collector()
    e = Loop(EngineSettings(model=str(tiny_model), warmup=False, admit_window_s=60.0),
             lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    try:
        assert e.ready.wait(60) and e.load_error is None
        _burst(e, collector, "idle")
    finally:
        e.stop()
    assert sizes == [8]


def test_every_burst_is_gathered_not_only_the_first(tiny_model, monkeypatch):
    """A hold that ended with its burst admitted must not linger: the next
    burst, once the window has passed, is gathered too, not cut after its
    first arrival."""
    sizes = _recorded_prefill_sizes(monkeypatch)
    monkeypatch.setattr(admission, "IDLE_GATHER_GAP_S", 0.05)
    window = 0.2
    collector = Collector()
    e = Loop(EngineSettings(model=str(tiny_model), warmup=False, admit_window_s=window),
             lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    try:
        assert e.ready.wait(60) and e.load_error is None
        for tag in ("first", "second", "third"):
            _burst(e, collector, tag)
            time.sleep(window * 1.5)
    finally:
        e.stop()
    assert sizes == [8, 8, 8]


def test_a_lone_user_is_not_held_but_a_burst_after_it_is_gathered(tiny_model, monkeypatch):
    """An idle engine holds a first arrival for IDLE_GATHER_GAP_S in case a
    burst follows; once a busy spell ran one request at a time, the next lone
    arrival starts at once. A burst after that is taken in as it comes, and
    the one after it is gathered again."""
    sizes = _recorded_prefill_sizes(monkeypatch)
    gap = 0.5
    monkeypatch.setattr(admission, "IDLE_GATHER_GAP_S", gap)
    collector = Collector()
    e = Loop(EngineSettings(model=str(tiny_model), warmup=False, admit_window_s=60.0),
             lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()

    def timed(rid: str) -> float:
        tic = time.monotonic()
        e.submit(Request(rid, PROMPTS[0], 4, SamplingParams()))
        collector.wait(rid)
        return time.monotonic() - tic

    try:
        assert e.ready.wait(60) and e.load_error is None
        first, second, third = timed("lone-0"), timed("lone-1"), timed("lone-2")
        sizes.clear()
        _burst(e, collector, "after-lone")
        after_lone = list(sizes)
        sizes.clear()
        _burst(e, collector, "again")
    finally:
        e.stop()
    assert first >= gap, "the first arrival is held in case a burst follows"
    assert second < gap / 2 and third < gap / 2, (second, third)
    assert after_lone[0] == 1 and sum(after_lone) == 8, after_lone
    assert sizes == [8]


def test_prefill_passes_leave_freed_buffers_for_reuse(tiny_model, monkeypatch):
    """mlx-lm empties MLX's buffer cache after every prefill pass, which on
    CUDA waits for the device and makes the next steps allocate again; the
    engine keeps the freed buffers, up to its allocator cache limit."""
    import mlx.core as mx

    gen_module = importlib.import_module("mlx_lm.generate")
    prompt = gen_module.PromptProcessingBatch.prompt
    cached_after_pass: list[int] = []

    def measured(self, tokens):
        prompt(self, tokens)
        if tokens:
            cached_after_pass.append(mx.get_cache_memory())

    monkeypatch.setattr(gen_module.PromptProcessingBatch, "prompt", measured)
    limit = 64 * 2**20
    collector = Collector()
    e = Loop(EngineSettings(model=str(tiny_model), warmup=False, prefix_cache=False,
                            allocator_cache_bytes=limit),
             lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    previous = None
    try:
        assert e.ready.wait(60) and e.load_error is None
        e.submit(Request("long", [7 + i % 200 for i in range(300)], 2, SamplingParams()))
        collector.wait("long")
        previous = mx.set_cache_limit(limit)
    finally:
        e.stop()
        if previous is not None:
            mx.set_cache_limit(previous)
    assert previous == limit, "the engine sets MLX's cache limit"
    # Emptied, the cache holds only what was freed after the emptying: the
    # pass's token ids (1.2 KB here). Kept, it holds the pass's activations,
    # at least one hidden state of its 300 tokens (tiny: 64 float32 wide).
    one_hidden_state = 300 * 64 * 4
    assert cached_after_pass and min(cached_after_pass) >= one_hidden_state, cached_after_pass


def test_outputs_cross_the_pipe_in_order():
    """A step's outputs go to the front end as columns (StepOutputs); every
    output, plain or not, comes back equal and in its place after pickling."""
    import pickle

    from engine_worker.messages import StepOutputs, TokenLogprob

    step = [Output("a", 5), Output("b", None, "abort"), Output("c", 7),
            Output("d", 8, None, TokenLogprob(8, -0.5, [(8, -0.5)])), Output("a", 6),
            Output("e", 9, "length"), Output("f", None, "error", error="boom")]

    def built(outs: list[Output]) -> StepOutputs:
        built = StepOutputs()
        for out in outs:
            built.add(out)
        assert len(built) == len(outs)
        return built

    def crossed(outs: list[Output]) -> list[Output]:
        wire = pickle.loads(pickle.dumps(built(outs).to_wire()))
        return list(StepOutputs.from_wire(*wire))

    for n in range(len(step) + 1):
        assert crossed(step[:n]) == step[:n]
        assert crossed(step[n:]) == step[n:]
    whole = built(step)
    assert (whole.ids, whole.tokens) == (["a", "c", "a"], [5, 7, 6])


def test_prompt_logprobs_from_chunked_padded_prefill(tiny_model):
    """Prompt log-probabilities come from the prompt pass itself, also when
    a prompt is cut into chunks (prefill_step_size) and shorter prompts of
    the batch are padded; a cached prefix is not reused for them."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    collector = Collector()
    settings = EngineSettings(model=str(tiny_model), max_num_seqs=8, prefill_step_size=4,
                              warmup=False)
    e = Loop(settings, lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    assert e.ready.wait(60) and e.load_error is None
    e.collector = collector
    try:
        prompts = [list(range(20, 20 + n)) for n in (3, 11, 6, 17)]
        run(e, "warm", prompts[3][:12])  # its KV now sits in the prefix cache
        for i, p in enumerate(prompts):
            e.submit(Request(f"pl-{i}", p, 2, SamplingParams(), prompt_logprobs=2))
        for i, p in enumerate(prompts):
            outs = e.collector.wait(f"pl-{i}")
            scored = [o for o in outs if o.prompt_logprobs is not None]
            assert len(scored) == 1 and scored[0].token is not None  # with the first token
            got = scored[0].prompt_logprobs
            logits = model(mx.array([p]))[0]
            ref = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            assert [g.token_id for g in got] == p[1:]
            assert [g.logprob for g in got] == pytest.approx(
                [ref[j, p[j + 1]].item() for j in range(len(p) - 1)], abs=1e-4)
            for j, g in enumerate(got):
                assert g.rank == 1 + int((ref[j] > ref[j, p[j + 1]]).sum().item())
                assert [t for t, _ in g.top] == mx.argsort(-ref[j])[:2].tolist()
    finally:
        e.stop()
