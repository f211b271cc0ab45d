"""The prefix cache: time to first token on a miss vs a hit, and a multi-turn
chat with and without the cache, side by side in one run.

Two engine processes per model, one with the prefix cache and one with
`--no-prefix-cache`, driven over gRPC with token ids, greedy, EOS ignored:

- TTFT: a fresh random shared prefix of --prefix-len tokens plus a short
  question. The first request with a new prefix is a miss; a second one with
  the same prefix and another question is a hit. Median of --rounds rounds,
  after one untimed.
- TTFT after an abort: the same, but the first request's client goes away
  after its first token (the cache must have kept its prompt all the same).
- Shared prefix, concurrent: --concurrent requests at once, a fresh
  --shared-len-token prefix and a question each; TTFT p50 and max over all
  rounds.
- Chat: --turns turns, each prompt being the previous prompt + its completion
  + a new user message; total wall time and mean TTFT per turn, on both
  engines. Both engines must produce the same tokens.

--baseline-src DIR adds a third engine, with the prefix cache, run from
another source tree (`git archive main | tar -x -C DIR`), to the abort and
concurrent cases, rounds alternating between it and this one.

    vllm-mlx-bench cache --models tiny smollm2-135m --output bench-cache.json
"""

import argparse
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_mlx.bench import report
from vllm_mlx.bench.workloads import (
    default_cache,
    model_folder,
    model_name,
    ports,
    random_ids,
    start_engine,
    vocab_of,
)

QUESTION_LEN = 16
SYSTEM_PROMPT_LEN = 200
USER_MESSAGE_LEN = 30
CHAT_COMPLETION_LEN = 32
# One prefill step of 8 x 1,000 tokens (the concurrent case, without a
# shared prefill) ran past the default liveness timeout of 30 s on the busy
# 2-core CPU, and the engine's worker took the core for hung.
ENGINE_FLAGS = ["--liveness-timeout", "3600"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", "--model", nargs="+", default=["tiny", "smollm2-135m"],
                    metavar="MODEL", help="test-model shapes (tiny, smollm2-135m: built on "
                                          "first use) or model folders")
    ap.add_argument("--prefix-len", type=int, default=2000,
                    help="tokens of the shared prefix the TTFT requests start with")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed miss/hit pairs (and rounds of the concurrent case)")
    ap.add_argument("--shared-len", type=int, default=1000,
                    help="tokens of the prefix the concurrent requests share")
    ap.add_argument("--concurrent", type=int, default=8,
                    help="requests sent at once with the shared prefix")
    ap.add_argument("--baseline-src", type=Path,
                    help="a source tree whose engine is measured beside this one "
                         "(abort and concurrent cases)")
    ap.add_argument("--turns", type=int, default=10, help="turns of the chat")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="where test models are built")
    ap.add_argument("--port", type=int, default=0,
                    help="the cached engine's gRPC port (the others: the next ones); "
                         "0: free ports")


def generate(stub, prompt: list[int], max_tokens: int,
             leave_after_first: bool = False) -> tuple[float, list[int]]:
    """(seconds to the first token, all generated tokens); `leave_after_first`:
    the client cancels the call once the first token is in."""
    from vllm_mlx.v1 import engine_pb2 as pb

    tic = time.perf_counter()
    ttft, tokens = None, []
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                            max_tokens=max_tokens, ignore_eos=True),
                         timeout=3600)
    for r in call:
        if ttft is None and r.token_ids:
            ttft = time.perf_counter() - tic
        tokens += r.token_ids
        if leave_after_first and tokens:
            call.cancel()
            break
    return ttft, tokens


def miss_then_hit(stub, vocab: int, prefix_len: int, rng: random.Random,
                  abort: bool = False) -> tuple[float, float]:
    """TTFT of a request with a fresh prefix, then of one sharing it;
    `abort`: the first one's client leaves after its first token."""
    prefix = random_ids(prefix_len, vocab, rng)
    miss, _ = generate(stub, prefix + random_ids(QUESTION_LEN, vocab, rng),
                       1024 if abort else 4, leave_after_first=abort)
    hit, _ = generate(stub, prefix + random_ids(QUESTION_LEN, vocab, rng), 4)
    return miss, hit


def bench_ttft(stub, vocab: int, prefix_len: int, rounds: int, rng: random.Random,
               desc: str) -> dict:
    from vllm_mlx.v1 import engine_pb2 as pb

    miss, hit = [], []
    stub.ClearPrefixCache(pb.ClearPrefixCacheRequest(), timeout=5)
    # The first round is untimed: shapes compile on first use.
    for _ in report.progress(range(rounds + 1), desc):
        m, h = miss_then_hit(stub, vocab, prefix_len, rng)
        miss.append(m)
        hit.append(h)
    miss, hit = statistics.median(miss[1:]), statistics.median(hit[1:])
    return dict(ttft_miss_s=miss, ttft_hit_s=hit, speedup=miss / hit)


def shared_prefix_ttfts(stub, vocab: int, shared_len: int, n: int,
                        rng: random.Random) -> list[float]:
    """TTFT of each of `n` requests sent at once with a fresh shared prefix."""
    prefix = random_ids(shared_len, vocab, rng)
    prompts = [prefix + random_ids(QUESTION_LEN, vocab, rng) for _ in range(n)]
    with ThreadPoolExecutor(n) as pool:
        return [ttft for ttft, _ in pool.map(lambda p: generate(stub, p, 4), prompts)]


def bench_abort_and_shared(stubs: dict, vocab: int, a: argparse.Namespace,
                           name: str) -> dict:
    """Per engine in `stubs` (name -> stub, each with the prefix cache):
    miss vs hit after an aborted first request, and TTFTs of the concurrent
    shared-prefix case; rounds alternate between engines, each engine's
    random prompts the same."""
    rngs = {engine: random.Random(2) for engine in stubs}
    found = {engine: dict(miss=[], hit=[], shared=[]) for engine in stubs}
    # The first round is untimed: shapes compile on first use.
    for i in report.progress(range(a.rounds + 1), f"{name} abort, shared prefix"):
        order = list(stubs) if i % 2 else list(stubs)[::-1]
        for engine in order:
            miss, hit = miss_then_hit(stubs[engine], vocab, a.prefix_len, rngs[engine],
                                      abort=True)
            ttfts = shared_prefix_ttfts(stubs[engine], vocab, a.shared_len, a.concurrent,
                                        rngs[engine])
            if i:
                found[engine]["miss"].append(miss)
                found[engine]["hit"].append(hit)
                found[engine]["shared"] += ttfts
    out = {}
    for engine, f in found.items():
        miss, hit = statistics.median(f["miss"]), statistics.median(f["hit"])
        shared = report.summary(f["shared"])
        out[engine] = dict(abort_ttft_miss_s=miss, abort_ttft_hit_s=hit,
                           abort_speedup=miss / hit, shared_ttft_p50_s=shared["p50"],
                           shared_ttft_max_s=shared["max"], shared_ttfts_s=f["shared"])
    return out


def bench_chat(stub, vocab: int, turns: int, seed: int, desc: str | None = None) -> dict:
    rng = random.Random(seed)
    prompt = random_ids(SYSTEM_PROMPT_LEN, vocab, rng)
    ttfts, said = [], []
    tic = time.perf_counter()
    for _ in report.progress(range(turns), desc) if desc else range(turns):
        prompt = prompt + random_ids(USER_MESSAGE_LEN, vocab, rng)  # the user's message
        ttft, completion = generate(stub, prompt, CHAT_COMPLETION_LEN)
        ttfts.append(ttft)
        said.append(completion)
        prompt = prompt + completion
    return dict(total_s=time.perf_counter() - tic, mean_ttft_s=statistics.mean(ttfts),
                final_len=len(prompt), tokens=said)


def one_model(spec: str, a: argparse.Namespace, ports: list[int]) -> dict:
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    model, name = model_folder(spec, a.cache), model_name(spec)
    vocab = vocab_of(model)
    engines = []
    channels = []
    try:
        engines.append(start_engine(model, ports[0], ENGINE_FLAGS))
        engines.append(start_engine(model, ports[1], [*ENGINE_FLAGS, "--no-prefix-cache"]))
        if a.baseline_src:
            engines.append(start_engine(model, ports[2], ENGINE_FLAGS, cwd=a.baseline_src))
        channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports[:len(engines)]]
        cached, plain, *baseline = (engine_pb2_grpc.EngineStub(c) for c in channels)
        ttft = bench_ttft(cached, vocab, a.prefix_len, a.rounds, random.Random(0),
                          f"{name} miss/hit")
        stubs = {"this": cached, **({"baseline": baseline[0]} if baseline else {})}
        abort_shared = bench_abort_and_shared(stubs, vocab, a, name)
        bench_chat(cached, vocab, 2, seed=99)  # untimed warm-up of both
        bench_chat(plain, vocab, 2, seed=99)
        with_cache = bench_chat(cached, vocab, a.turns, seed=1, desc=f"{name} chat, cache")
        without = bench_chat(plain, vocab, a.turns, seed=1, desc=f"{name} chat, no cache")
        s = cached.GetStats(pb.GetStatsRequest(), timeout=5)
    finally:
        for c in channels:
            c.close()
        for e in engines:
            e.stop()
    return dict(model=name, prefix_len=a.prefix_len, **ttft, **abort_shared.pop("this"),
                baseline=abort_shared.get("baseline"),
                chat_turns=a.turns, chat_final_len=with_cache["final_len"],
                chat_cached_s=with_cache["total_s"], chat_plain_s=without["total_s"],
                chat_cached_ttft_s=with_cache["mean_ttft_s"],
                chat_plain_ttft_s=without["mean_ttft_s"],
                chat_same_tokens=with_cache["tokens"] == without["tokens"],
                cache_hits=s.cache_hits, cache_misses=s.cache_misses,
                cache_tokens_reused=s.cache_tokens_reused, cache_bytes=s.cache_bytes)


def run(a: argparse.Namespace) -> dict:
    results = [one_model(spec, a, ports(a.port, 3)) for spec in a.models]
    print(report.banner("prefix cache: time to first token, miss vs hit; a chat with and "
                        "without it"))
    print(report.table(
        [[r["model"], f"{r['ttft_miss_s'] * 1000:.0f}", f"{r['ttft_hit_s'] * 1000:.0f}",
          f"{r['speedup']:.1f}x", f"{r['chat_cached_s']:.2f}", f"{r['chat_plain_s']:.2f}",
          f"{r['chat_cached_ttft_s'] * 1000:.0f}", f"{r['chat_plain_ttft_s'] * 1000:.0f}",
          r["chat_same_tokens"]] for r in results],
        ["model", f"TTFT miss ms ({a.prefix_len} tok)", "hit ms", "speedup",
         f"{a.turns}-turn chat s, cache", "no cache", "TTFT/turn ms, cache", "no cache",
         "same tokens"]))
    rows = []
    for r in results:
        for engine, f in (("this", r), ("baseline", r["baseline"])):
            if f:
                rows.append([r["model"], engine, f"{f['abort_ttft_miss_s'] * 1000:.0f}",
                             f"{f['abort_ttft_hit_s'] * 1000:.0f}",
                             f"{f['abort_speedup']:.1f}x",
                             f"{f['shared_ttft_p50_s'] * 1000:.0f}",
                             f"{f['shared_ttft_max_s'] * 1000:.0f}"])
    print(report.banner("after an aborted first request; requests sharing a prefix at once"))
    print(report.table(rows, ["model", "engine", f"TTFT miss ms ({a.prefix_len} tok, aborted)",
                              "then hit ms", "speedup",
                              f"{a.concurrent} at once, {a.shared_len} shared: TTFT p50 ms",
                              "max ms"]))
    return dict(models=a.models, prefix_len=a.prefix_len, rounds=a.rounds, turns=a.turns,
                shared_len=a.shared_len, concurrent=a.concurrent,
                baseline_src=str(a.baseline_src) if a.baseline_src else None, results=results)
