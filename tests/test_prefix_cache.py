"""The prefix cache: reusing a finished request's KV must never change what
greedy decoding produces, must stay under its byte budget, and must show in
Stats, /metrics and the admin RPC."""

import random

import httpx
import pytest

from engine_worker.loop import Loop
from engine_worker.messages import Request
from engine_worker.model import load_model, read_facts
from engine_worker.sampling import SamplingParams
from vllm_mlx.settings import EngineSettings
from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import start_engine, start_gateway, wait_until
from .test_loop import Collector, run, tokens_of


def make_engine(model, **settings) -> Loop:
    collector = Collector()
    s = EngineSettings(model=str(model), max_num_seqs=8, max_queue=64, warmup=False, **settings)
    e = Loop(s, lambda s: load_model(read_facts(s.model)), collector.publish)
    e.start()
    assert e.ready.wait(60) and e.load_error is None
    e.collector = collector
    collector.guard(e)
    return e


@pytest.fixture(scope="module")
def cached(tiny_model):
    e = make_engine(tiny_model)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def plain(tiny_model):
    e = make_engine(tiny_model, prefix_cache=False)
    yield e
    e.stop()


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 250) for _ in range(n)]


def greedy(engine, rid: str, prompt: list[int], max_tokens: int = 16) -> list[int]:
    return tokens_of(run(engine, rid, prompt, max_tokens=max_tokens))


def test_hits_are_token_for_token_exact(cached, plain):
    base = ids(200, seed=1)
    first = greedy(cached, "miss", base)
    assert first == greedy(plain, "ref-miss", base)
    hits = cached.stats.cache_hits
    cases = {
        "same prompt (longer entry, trimmed)": base,
        "exact entry (prompt + completion)": base + first,
        "partial hit, then new tokens": base + first + ids(40, seed=2),
        "divergent suffix": base[:120] + ids(60, seed=3),
    }
    for i, (name, prompt) in enumerate(cases.items()):
        want = greedy(plain, f"ref-{i}", prompt)
        reused = cached.stats.cache_tokens_reused
        assert greedy(cached, f"hit-{i}", prompt) == want, name
        assert cached.stats.cache_tokens_reused - reused >= min(120, len(prompt) - 1), name
    assert cached.stats.cache_hits - hits == len(cases)


def test_full_hit_still_prefills_one_token(cached, plain):
    prompt = ids(50, seed=4)
    greedy(cached, "full-a", prompt, max_tokens=1)  # caches exactly prompt + 1 token
    greedy(cached, "full-b", prompt + greedy(plain, "full-ref", prompt, max_tokens=1))
    # The entry now equals the whole next prompt: reuse all but its last token.
    reused = cached.stats.cache_tokens_reused
    p = prompt + greedy(plain, "full-ref2", prompt, max_tokens=1)
    assert greedy(cached, "full-c", p) == greedy(plain, "full-ref3", p)
    assert cached.stats.cache_tokens_reused - reused == len(p) - 1


def test_concurrent_requests_sharing_a_system_prompt(cached, plain):
    system = ids(300, seed=5)
    greedy(cached, "prime", system + [7, 8, 9])
    prompts = [system + ids(5 + 3 * i, seed=100 + i) for i in range(7)] + [ids(30, seed=99)]
    want = [greedy(plain, f"sys-ref-{i}", p) for i, p in enumerate(prompts)]
    hits = cached.stats.cache_hits
    for i, p in enumerate(prompts):  # all admitted together: hits and a miss in one batch
        cached.submit(Request(f"sys-{i}", p, 16, SamplingParams()))
    got = [tokens_of(cached.collector.wait(f"sys-{i}")) for i in range(len(prompts))]
    assert got == want
    assert cached.stats.cache_hits - hits >= 7


def test_eviction_under_a_small_budget(tiny_model, plain):
    # The tiny model's KV: 2 layers x (K + V) x 2 heads x 16 dims x 4 bytes = 512 B/token.
    budget = 512 * 300
    e = make_engine(tiny_model, prefix_cache_bytes=budget)
    try:
        for i in range(5):
            prompt = ids(120, seed=200 + i)
            assert greedy(e, f"ev-{i}", prompt) == greedy(plain, f"ev-ref-{i}", prompt)
            assert e.stats.cache_bytes <= budget
        assert wait_until(lambda: e.stats.cache_evictions > 0, timeout=5)
        assert 0 < e.stats.cache_bytes <= budget
        # The newest entry survived and still serves exact output.
        prompt = ids(120, seed=204) + ids(10, seed=7)
        hits = e.stats.cache_hits
        assert greedy(e, "ev-hit", prompt) == greedy(plain, "ev-hit-ref", prompt)
        assert e.stats.cache_hits == hits + 1
    finally:
        e.stop()


def test_untrimmable_cache_types_turn_reuse_off(tiny_model, monkeypatch, caplog):
    import engine_worker.loop as loop
    monkeypatch.setattr(loop, "can_reuse", lambda model: False)
    e = make_engine(tiny_model)
    try:
        prompt = ids(40, seed=8)
        greedy(e, "r1", prompt)
        greedy(e, "r2", prompt)
        assert e.stats.cache_hits == e.stats.cache_misses == e.stats.cache_bytes == 0
    finally:
        e.stop()
    assert "prefix cache off" in caplog.text


def vlm_engines(path):
    """The vision-language model at `path` in two engines, with and without the
    prefix cache; the cached one counts its encoder's runs (`encodes`)."""
    from tests.test_vision_scheduler import start_engine

    cached_e, plain_e = start_engine(path), start_engine(path, prefix_cache=False)
    cached_e.encodes = []
    model = cached_e.loaded.model
    start_encoding = model.start_encoding

    def counted(prompt, media, *rest):
        cached_e.encodes.append(len(media))
        return start_encoding(prompt, media, *rest)

    model.start_encoding = counted
    return cached_e, plain_e


@pytest.fixture(scope="module")
def vlm_pair(tiny_vlm):
    """The tiny Qwen2-VL in two engines (vlm_engines), and a prompter."""
    from tests.test_vision_scheduler import Prompter

    cached_e, plain_e = vlm_engines(tiny_vlm)
    yield cached_e, plain_e, Prompter(tiny_vlm)
    cached_e.stop()
    plain_e.stop()


def answer(engine, request) -> list[int]:
    from tests.test_vision_scheduler import tokens_of

    engine.submit(request)
    return tokens_of(engine.collector.wait(request.request_id))


def second_turn(cached_e, plain_e, p, image, same_tokens: bool = True
                ) -> tuple[list[dict], list[int]]:
    """Turn one (the picture and a question), then turn two carrying it and its
    answer: turn two's KV, rope delta included, comes from the cache, so the
    encoder does not run, and greedy decoding gives what the engine without
    the cache gives (`same_tokens`: unless its encoder is not repeatable).
    Turn two's messages and tokens."""
    first = [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "What is in it?"}]}]
    r1 = p.chat("turn-1", first, [image], max_tokens=16)
    reply = p.tokenizer.decode(answer(cached_e, r1))
    encodes = len(cached_e.encodes)
    second = [*first, {"role": "assistant", "content": reply},
              {"role": "user", "content": [{"type": "text", "text": "And its colours?"}]}]
    r2 = p.chat("turn-2", second, [image], max_tokens=16)
    before = cached_e.stats.cache_tokens_reused
    got = answer(cached_e, r2)
    assert len(cached_e.encodes) == encodes  # no encoder run
    assert cached_e.stats.cache_tokens_reused - before >= r2.media_spans[0][1]
    if same_tokens:
        assert got == answer(plain_e, p.chat("turn-2-plain", second, [image], max_tokens=16))
    # Asked again another way: served from turn two's own entry, itself resumed.
    again = [*second[:-1], {"role": "user", "content": "And its shapes?"}]
    reused = cached_e.stats.cache_tokens_reused
    tokens = answer(cached_e, p.chat("turn-2-again", again, [image], max_tokens=16))
    assert len(cached_e.encodes) == encodes
    assert cached_e.stats.cache_tokens_reused - reused >= r2.media_spans[0][1]
    if same_tokens:
        assert tokens == answer(plain_e, p.chat("again-plain", again, [image], max_tokens=16))
    return second, got


def test_images_key_the_cache_apart(vlm_pair):
    """The same tokens with another picture reuse nothing from the picture on;
    the same picture again reuses all of it and skips the encoder."""
    from tests.test_vision_scheduler import picture

    cached_e, plain_e, p = vlm_pair
    outs, reused = [], []
    for i, seed in enumerate((11, 12, 11)):
        r = p.request(f"apart-{i}", "Describe this picture in detail.",
                      images=[picture(80, 60, seed)])
        before = cached_e.stats.cache_tokens_reused
        outs.append(answer(cached_e, r))
        reused.append(cached_e.stats.cache_tokens_reused - before)
        assert outs[-1] == answer(plain_e, r)
        start = r.media_spans[0][0]
    assert outs[0] != outs[1] and outs[0] == outs[2]
    assert reused[1] <= start  # the text before the picture, at most
    assert reused[2] >= r.media_spans[0][1]


def test_second_turn_about_a_picture_skips_its_encoder_and_prefill(vlm_pair):
    from tests.test_vision_scheduler import picture

    cached_e, plain_e, p = vlm_pair
    image = picture(96, 72, 21)
    second, got = second_turn(cached_e, plain_e, p, image)
    encodes = len(cached_e.encodes)

    # A third turn bringing a second picture reuses up to it, encodes, and
    # still decodes as the plain engine does.
    third = [*second, {"role": "assistant", "content": p.tokenizer.decode(got)},
             {"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "And this one?"}]}]
    images = [image, picture(64, 64, 22)]
    r3 = p.chat("turn-3", third, images, max_tokens=16)
    before = cached_e.stats.cache_tokens_reused
    got = answer(cached_e, r3)
    assert len(cached_e.encodes) == encodes + 1
    assert r3.media_spans[0][1] < cached_e.stats.cache_tokens_reused - before \
        <= r3.media_spans[1][0]
    assert got == answer(plain_e, p.chat("turn-3-plain", third, images, max_tokens=16))


def test_text_requests_share_only_what_precedes_a_picture(vlm_pair):
    """A text request whose tokens match a media entry's up to the picture's
    placeholders takes none of the picture's KV, and decodes as without the cache."""
    from tests.test_vision_scheduler import picture

    cached_e, plain_e, p = vlm_pair
    system = {"role": "system", "content": "You describe pictures. " * 12}
    with_image = [system, {"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "Go."}]}]
    r = p.chat("sys-image", with_image, [picture(80, 60, 31)])
    answer(cached_e, r)
    text = p.chat("sys-text", [system, {"role": "user", "content": "Go."}])
    before = cached_e.stats.cache_tokens_reused
    got = answer(cached_e, text)
    assert 0 < cached_e.stats.cache_tokens_reused - before <= r.media_spans[0][0]
    assert got == answer(plain_e, p.chat("sys-text-plain", [system,
                                                            {"role": "user", "content": "Go."}]))


# -- a real engine process: stats, the admin RPC, the gateway ----------------------------


def generate(stub, prompt: list[int], max_tokens: int = 12) -> list[int]:
    rs = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                               max_tokens=max_tokens, ignore_eos=True),
                            timeout=60))
    assert rs[-1].finished
    return [t for r in rs for t in r.token_ids]


def stats(stub) -> pb.Stats:
    return stub.GetStats(pb.GetStatsRequest(), timeout=5)


def settled(stub, **want) -> pb.Stats:
    """Stats once the engine has published figures matching `want`."""
    box = [None]

    def ok():
        box[0] = stats(stub)
        return all(getattr(box[0], k) == v for k, v in want.items())
    assert wait_until(ok, timeout=5), (want, box[0])
    return box[0]


@pytest.fixture(scope="module")
def engine_proc(tiny_model, tmp_path_factory):
    e = start_engine(tiny_model, tmp_path_factory.mktemp("logs"), "--max-num-seqs", "8",
                     "--prefix-cache-bytes", str(64 << 20))
    yield e
    e.stop()


def test_multi_turn_chat_reuses_each_previous_turn(engine_proc):
    stub = engine_proc.stub
    prompt = ids(80, seed=10)
    before = settled(stub, running=0)
    previous = 0  # tokens the previous turn saw and said
    for turn in range(5):
        completion = generate(stub, prompt)
        if turn:
            s = settled(stub, cache_hits=before.cache_hits + 1)
            # Everything the previous turn saw and said is reused.
            assert s.cache_tokens_reused - before.cache_tokens_reused == previous
            before = s
        else:
            before = settled(stub, cache_misses=before.cache_misses + 1)
        previous = len(prompt) + len(completion)
        prompt = prompt + completion + ids(20, seed=11 + turn)  # the next user message
    assert before.cache_bytes > 0


def test_clear_prefix_cache_rpc(engine_proc):
    stub = engine_proc.stub
    prompt = ids(60, seed=20)
    generate(stub, prompt)
    assert wait_until(lambda: stats(stub).cache_bytes > 0, timeout=5)
    stub.ClearPrefixCache(pb.ClearPrefixCacheRequest(), timeout=5)
    misses = settled(stub, cache_bytes=0).cache_misses
    generate(stub, prompt)
    settled(stub, cache_misses=misses + 1)


def test_no_prefix_cache_flag(tiny_model, tmp_path):
    e = start_engine(tiny_model, tmp_path, "--no-prefix-cache", "--no-warmup")
    try:
        prompt = ids(40, seed=30)
        assert generate(e.stub, prompt) == generate(e.stub, prompt)
        s = settled(e.stub, running=0, requests_total=2)
        assert (s.cache_hits, s.cache_misses, s.cache_bytes) == (0, 0, 0)
    finally:
        e.stop()


def test_gateway_metrics_and_admin_route(engine_proc, tmp_path):
    generate(engine_proc.stub, ids(30, seed=40))
    generate(engine_proc.stub, ids(30, seed=40))
    g = start_gateway(engine_proc.address, tmp_path, env={"VLLM_MLX_API_KEY": "sekret"})
    try:
        auth = {"Authorization": "Bearer sekret"}
        with httpx.Client(base_url=g.url, timeout=30) as c:
            assert c.post("/v1/admin/clear-prefix-cache").status_code == 401
            text = c.get("/metrics", headers=auth).text
            for name in ("prefix_cache_hits_total", "prefix_cache_misses_total",
                         "prefix_cache_tokens_reused_total", "prefix_cache_evictions_total",
                         "prefix_cache_bytes", "prefix_cache_hit_rate"):
                assert f"vllm_mlx_engine_{name} " in text, name
            # Two 30-token prompts, the second all but its last token a hit.
            (rate,) = [float(line.split()[1]) for line in text.splitlines()
                       if line.startswith("vllm_mlx_engine_prefix_cache_hit_rate ")]
            assert 0 < rate < 1
            r = c.post("/v1/admin/clear-prefix-cache", headers=auth)
            assert r.status_code == 200, r.text
        settled(engine_proc.stub, cache_bytes=0)
    finally:
        g.stop()


def test_a_prompt_is_reused_after_its_client_disconnects(engine_proc, plain):
    """A client that goes away after its first token (stop pressed, a
    timeout): its prompt's KV was kept as its prefill ended, so the next
    request with the same prompt prefills only what is new."""
    stub = engine_proc.stub
    prompt, question = ids(300, seed=50), ids(12, seed=51)
    before = settled(stub, running=0)
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=1500,
                                            ignore_eos=True), timeout=60)
    assert any(r.token_ids for r in call)  # the first token, then the client leaves
    call.cancel()
    s = settled(stub, running=0, cache_misses=before.cache_misses + 1)
    assert s.generation_tokens_total - before.generation_tokens_total < 1500  # aborted
    follow = prompt + question
    assert generate(stub, follow) == greedy(plain, "disconnect-ref", follow, max_tokens=12)
    s = settled(stub, cache_hits=before.cache_hits + 1)
    # All of the first prompt but its last token, whose pass came with the first token.
    assert s.cache_tokens_reused - before.cache_tokens_reused == len(prompt) - 1


def test_a_long_prompt_is_kept_as_its_prefill_goes_and_survives_an_abort(tiny_model, plain):
    """Prefilled 64 tokens a step, a prompt's KV is kept each time it has
    doubled: aborted after its second step, the 128 tokens prefilled so far
    serve the next prompt that shares them, exactly."""
    collector, passes = Collector(), []

    def after_step(prompt_responses, responses):
        if prompt_responses:
            passes.append(len(passes))
            if len(passes) == 2:
                e.abort("long")

    s = EngineSettings(model=str(tiny_model), max_num_seqs=8, warmup=False, prefill_step_size=64)
    e = Loop(s, lambda s: load_model(read_facts(s.model)), collector.publish,
             after_step=after_step)
    e.start()
    try:
        assert e.ready.wait(60) and e.load_error is None
        e.collector = collector
        prompt = ids(300, seed=55)
        assert run(e, "long", prompt, max_tokens=4)[-1].finish_reason == "abort"
        assert tokens_of(e.collector.outputs["long"]) == []  # still prefilling
        follow = prompt[:250] + ids(10, seed=56)
        assert greedy(e, "follow", follow) == greedy(plain, "follow-ref", follow)
        assert (e.stats.cache_hits, e.stats.cache_tokens_reused) == (1, 128)
    finally:
        e.stop()


def test_requests_sharing_a_prefix_that_arrive_together_prefill_it_once(engine_proc, plain):
    """8 requests at once, a 1,000-token prefix and a question each: one
    prefills the prefix, the other 7 wait for its KV and reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    stub = engine_proc.stub
    prefix = ids(1000, seed=60)
    prompts = [prefix + ids(16, seed=61 + i) for i in range(8)]
    want = [greedy(plain, f"shared-ref-{i}", p, max_tokens=12) for i, p in enumerate(prompts)]
    before = settled(stub, running=0)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: generate(stub, p), prompts))
    assert got == want
    s = settled(stub, running=0, cache_hits=before.cache_hits + 7)
    assert s.cache_misses - before.cache_misses == 1
    assert s.cache_tokens_reused - before.cache_tokens_reused >= 7 * len(prefix)


def test_eviction_takes_the_least_recently_used(tiny_model, tmp_path, plain):
    """Entries A, B, C; a request reuses part of A (and adds an entry of its
    own); then D no longer fits beside them: B, now the least recently used,
    goes, not A, the oldest."""
    # The tiny model's KV: 512 bytes a token; an entry: 100 prompt + 12 new tokens.
    e = start_engine(tiny_model, tmp_path, "--prefix-cache-bytes", str(512 * 500), "--no-warmup")
    try:
        a, b, c, d = (ids(100, seed=70 + i) for i in range(4))
        for prompt in (a, b, c):
            generate(e.stub, prompt)
        generate(e.stub, a[:80] + ids(20, seed=75))  # uses A's first 80 tokens
        s = settled(e.stub, running=0, cache_hits=1, cache_evictions=0)
        generate(e.stub, d)
        s = settled(e.stub, running=0, cache_evictions=1)
        for prompt, reused in ((a, len(a)), (b, 0)):
            follow = prompt + ids(8, seed=79)
            assert generate(e.stub, follow) == greedy(plain, f"lru-ref-{reused}", follow, 12)
            before, s = s, settled(e.stub, running=0, requests_total=s.requests_total + 1)
            assert s.cache_tokens_reused - before.cache_tokens_reused == reused
    finally:
        e.stop()


def test_kept_kv_holds_only_its_own_bytes(tiny_model):
    """A finished request's KV leaves the batch as a lazy copy of its rows;
    kept unevaluated, it held the whole batch's buffers alive (12x the bytes
    the cache counted), out of reach of the memory budget."""
    import mlx.core as mx

    engine = make_engine(tiny_model)
    try:
        rng = random.Random(3)

        def one_round(tag: str) -> None:
            for i in range(8):
                engine.submit(Request(f"{tag}-{i}", [rng.randrange(10, 500) for _ in range(24)],
                                      32, SamplingParams()))
            for i in range(8):
                engine.collector.wait(f"{tag}-{i}")

        one_round("warm")
        # The finished rows' copies are evaluated once the engine is idle
        # too, so that no batch's whole KV outlives it.
        # (An idle pass of the loop has begun once its idle time grows.)
        idle = engine.stats.loop_seconds["idle"]
        assert wait_until(lambda: engine.stats.loop_seconds["idle"] > idle, timeout=10)
        mx.synchronize()
        active, kept = mx.get_active_memory(), engine.stats.cache_bytes
        for r in range(4):
            one_round(f"r{r}")
        mx.synchronize()
        grown, kept_more = mx.get_active_memory() - active, engine.stats.cache_bytes - kept
        assert kept_more > 0
        assert grown < 2 * kept_more + (1 << 20), (grown, kept_more)
    finally:
        engine.stop()


def test_a_few_shared_tokens_are_not_worth_a_copy(cached, plain):
    """Using a cached prefix copies the whole entry: a prompt that shares
    fewer than MIN_REUSE_TOKENS with one prefills from scratch (a miss)."""
    from engine_worker.prefix_cache import MIN_REUSE_TOKENS

    base = ids(60, seed=40)
    greedy(cached, "few-a", base)
    for shared in (MIN_REUSE_TOKENS - 1, MIN_REUSE_TOKENS):
        prompt = base[:shared] + ids(30, seed=41 + shared)
        hits, reused = cached.stats.cache_hits, cached.stats.cache_tokens_reused
        assert greedy(cached, f"few-{shared}", prompt) == greedy(plain, f"few-ref-{shared}",
                                                                  prompt)
        got = (cached.stats.cache_hits - hits, cached.stats.cache_tokens_reused - reused)
        assert got == ((0, 0) if shared < MIN_REUSE_TOKENS else (1, shared)), shared


def test_finished_rows_are_cached_from_one_copy_per_layer(cached, plain, monkeypatch):
    """Requests of different prompt lengths prefilled in one pass, then
    decoded in one batch, ending two together, then one, then the last: the
    prompts' KV as their pass ends and each time the finished rows are
    gathered in one copy per layer (gather_rows), and each row must still
    be exactly its own KV, padding excluded."""
    from engine_worker import batch

    gathered = []

    def counted(kv, rows):
        gathered.append(len(rows))
        return gather(kv, rows)

    gather = batch.gather_rows
    monkeypatch.setattr(batch, "gather_rows", counted)
    prompts = [ids(n, seed=60 + n) for n in (30, 45, 61, 77)]
    lengths = [12, 12, 20, 30]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        cached.submit(Request(f"together-{i}", p, n, SamplingParams()))
    firsts = [tokens_of(cached.collector.wait(f"together-{i}")) for i in range(len(prompts))]
    assert gathered == [4, 2, 1, 1]  # the 4 prompts, then the finished rows
    for i, (p, first) in enumerate(zip(prompts, firsts)):
        follow = p + first + ids(9, seed=80 + i)
        reused = cached.stats.cache_tokens_reused
        assert greedy(cached, f"together-next-{i}", follow) == greedy(
            plain, f"together-ref-{i}", follow), i
        assert cached.stats.cache_tokens_reused - reused == len(p) + len(first), i


def test_the_index_finds_the_longest_shared_prefix_and_drops_what_it_extends():
    """PrefixCache on its own, with KV that records its token ids: a fetch
    returns exactly the KV of the longest prefix it shares with an entry,
    an entry that a new one extends is dropped, and the oldest go first."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from engine_worker.prefix_cache import PrefixCache

    def kv(tokens):
        c = KVCache()
        c.update_and_fetch(*(mx.array(tokens, mx.float32).reshape(1, 1, -1, 1),) * 2)
        return [c]

    def fetched(pc, prompt):
        cache, n = pc.fetch(prompt)
        if cache is None:
            return n
        keys = cache[0].keys[..., :cache[0].offset, :]
        assert keys.reshape(-1).astype(mx.int32).tolist() == prompt[:n]
        return n

    a, b = ids(40, seed=90), None
    b = a[:20] + ids(30, seed=91)
    pc = PrefixCache(1 << 30)
    pc.insert([(a, kv(a), None, ()), (b, kv(b), None, ())])
    assert fetched(pc, a[:35] + [1, 2]) == 35
    assert fetched(pc, b + [3]) == len(b)
    assert fetched(pc, a[:18] + [4] * 20) == 18   # one block, then token by token
    assert fetched(pc, a[:15] + [5] * 20) == 0     # less than a block: a miss
    assert fetched(pc, a) == len(a) - 1            # one token is always left
    c = a + ids(10, seed=92)
    pc.insert([(c, kv(c), None, ())])
    assert len(pc) == 2                            # c extends a: a is gone
    assert fetched(pc, c + [6]) == len(c)
    pc.max_bytes = pc.nbytes - 1
    pc.insert([])
    assert len(pc) == 1 and pc.evictions == 1      # b, the oldest, went first
    assert fetched(pc, b + [3]) == 20                # what it shares with c
    pc.clear()
    assert (len(pc), pc.nbytes) == (0, 0)
