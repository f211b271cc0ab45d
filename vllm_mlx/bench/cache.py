"""The prefix cache: time to first token on a miss vs a hit, and a multi-turn
chat with and without the cache, side by side in one run.

Two engine processes per model, one with the prefix cache and one with
`--no-prefix-cache`, driven over gRPC with token ids, greedy, EOS ignored:

- TTFT: a fresh random shared prefix of --prefix-len tokens plus a short
  question. The first request with a new prefix is a miss; a second one with
  the same prefix and another question is a hit. Median of --rounds rounds,
  after one untimed.
- Chat: --turns turns, each prompt being the previous prompt + its completion
  + a new user message; total wall time and mean TTFT per turn, on both
  engines. Both engines must produce the same tokens.

    vllm-mlx-bench cache --models tiny smollm2-135m --output bench-cache.json
"""

import argparse
import random
import statistics
import time
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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", "--model", nargs="+", default=["tiny", "smollm2-135m"],
                    metavar="MODEL", help="test-model shapes (tiny, smollm2-135m: built on "
                                          "first use) or model folders")
    ap.add_argument("--prefix-len", type=int, default=2000,
                    help="tokens of the shared prefix the TTFT requests start with")
    ap.add_argument("--rounds", type=int, default=3, help="timed miss/hit pairs")
    ap.add_argument("--turns", type=int, default=10, help="turns of the chat")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="where test models are built")
    ap.add_argument("--port", type=int, default=0,
                    help="the cached engine's gRPC port (the other: the next); 0: free ports")


def generate(stub, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, all generated tokens)."""
    from vllm_mlx.v1 import engine_pb2 as pb

    tic = time.perf_counter()
    ttft, tokens = None, []
    for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                              max_tokens=max_tokens, ignore_eos=True),
                           timeout=3600):
        if ttft is None and r.token_ids:
            ttft = time.perf_counter() - tic
        tokens += r.token_ids
    return ttft, tokens


def bench_ttft(stub, vocab: int, prefix_len: int, rounds: int, rng: random.Random,
               desc: str) -> dict:
    from vllm_mlx.v1 import engine_pb2 as pb

    miss, hit = [], []
    stub.ClearPrefixCache(pb.ClearPrefixCacheRequest(), timeout=5)
    # The first round is untimed: shapes compile on first use.
    for _ in report.progress(range(rounds + 1), desc):
        prefix = random_ids(prefix_len, vocab, rng)
        m, _ = generate(stub, prefix + random_ids(QUESTION_LEN, vocab, rng), 4)
        h, _ = generate(stub, prefix + random_ids(QUESTION_LEN, vocab, rng), 4)
        miss.append(m)
        hit.append(h)
    miss, hit = statistics.median(miss[1:]), statistics.median(hit[1:])
    return dict(ttft_miss_s=miss, ttft_hit_s=hit, speedup=miss / hit)


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
        engines.append(start_engine(model, ports[0], []))
        engines.append(start_engine(model, ports[1], ["--no-prefix-cache"]))
        channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        cached, plain = (engine_pb2_grpc.EngineStub(c) for c in channels)
        ttft = bench_ttft(cached, vocab, a.prefix_len, a.rounds, random.Random(0),
                          f"{name} miss/hit")
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
    return dict(model=name, prefix_len=a.prefix_len, **ttft,
                chat_turns=a.turns, chat_final_len=with_cache["final_len"],
                chat_cached_s=with_cache["total_s"], chat_plain_s=without["total_s"],
                chat_cached_ttft_s=with_cache["mean_ttft_s"],
                chat_plain_ttft_s=without["mean_ttft_s"],
                chat_same_tokens=with_cache["tokens"] == without["tokens"],
                cache_hits=s.cache_hits, cache_misses=s.cache_misses,
                cache_tokens_reused=s.cache_tokens_reused, cache_bytes=s.cache_bytes)


def run(a: argparse.Namespace) -> dict:
    results = [one_model(spec, a, ports(a.port, 2)) for spec in a.models]
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
    return dict(models=a.models, prefix_len=a.prefix_len, rounds=a.rounds, turns=a.turns,
                results=results)
