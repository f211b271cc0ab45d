"""Prefix cache: time to first token on a miss vs a hit, and a multi-turn chat
with and without the cache, side by side in one run.

Two engine processes per model, one with the prefix cache and one with
`--no-prefix-cache`, driven over gRPC with token ids, greedy, EOS ignored:

- TTFT: a fresh random shared prefix of --prefix-len tokens plus a short
  question. The first request with a new prefix is a miss; a second one with
  the same prefix and another question is a hit. Median of --rounds rounds.
- Chat: --turns turns, each prompt being the previous prompt + its completion
  + a new user message; total wall time and mean TTFT per turn, on both engines.
  Both engines must produce the same tokens.

    python scripts/bench_prefix_cache.py --models tiny smollm2-135m
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import grpc  # noqa: E402
from bench_engine import build_model, start_engine  # noqa: E402

from vllm_mlx.v1 import engine_pb2 as pb  # noqa: E402
from vllm_mlx.v1 import engine_pb2_grpc  # noqa: E402


def random_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def generate(stub, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, all generated tokens)."""
    tic = time.perf_counter()
    ttft, tokens = None, []
    for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                              max_tokens=max_tokens, ignore_eos=True),
                           timeout=3600):
        if ttft is None and r.token_ids:
            ttft = time.perf_counter() - tic
        tokens += r.token_ids
    return ttft, tokens


def bench_ttft(stub, vocab: int, prefix_len: int, rounds: int, rng: random.Random) -> dict:
    miss, hit = [], []
    stub.ClearPrefixCache(pb.ClearPrefixCacheRequest(), timeout=5)
    for _ in range(rounds + 1):  # the first round is untimed: shapes compile on first use
        prefix = random_ids(prefix_len, vocab, rng)
        m, _ = generate(stub, prefix + random_ids(16, vocab, rng), 4)
        h, _ = generate(stub, prefix + random_ids(16, vocab, rng), 4)
        miss.append(m)
        hit.append(h)
    miss, hit = statistics.median(miss[1:]), statistics.median(hit[1:])
    return dict(ttft_miss_s=miss, ttft_hit_s=hit, speedup=miss / hit)


def bench_chat(stub, vocab: int, turns: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompt = random_ids(200, vocab, rng)  # the system prompt
    ttfts, said = [], []
    tic = time.perf_counter()
    for _ in range(turns):
        prompt = prompt + random_ids(30, vocab, rng)  # the user's message
        ttft, completion = generate(stub, prompt, 32)
        ttfts.append(ttft)
        said.append(completion)
        prompt = prompt + completion
    return dict(total_s=time.perf_counter() - tic, mean_ttft_s=statistics.mean(ttfts),
                final_len=len(prompt), tokens=said)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--prefix-len", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    ap.add_argument("--port", type=int, default=50937)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    results = []
    for shape in a.models:
        model = build_model(shape, a.cache)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        procs = [start_engine(model, a.port, []),
                 start_engine(model, a.port + 1, ["--no-prefix-cache"])]
        channels = [grpc.insecure_channel(f"127.0.0.1:{a.port + i}") for i in range(2)]
        cached, plain = (engine_pb2_grpc.EngineStub(c) for c in channels)
        try:
            ttft = bench_ttft(cached, vocab, a.prefix_len, a.rounds, random.Random(0))
            bench_chat(cached, vocab, 2, seed=99)  # untimed warm-up of both
            bench_chat(plain, vocab, 2, seed=99)
            with_cache = bench_chat(cached, vocab, a.turns, seed=1)
            without = bench_chat(plain, vocab, a.turns, seed=1)
            s = cached.GetStats(pb.GetStatsRequest(), timeout=5)
        finally:
            for c in channels:
                c.close()
            for p in procs:
                p.terminate()
                p.wait()
        row = dict(model=shape, prefix_len=a.prefix_len, **ttft,
                   chat_turns=a.turns, chat_final_len=with_cache["final_len"],
                   chat_cached_s=with_cache["total_s"], chat_plain_s=without["total_s"],
                   chat_cached_ttft_s=with_cache["mean_ttft_s"],
                   chat_plain_ttft_s=without["mean_ttft_s"],
                   chat_same_tokens=with_cache["tokens"] == without["tokens"],
                   cache_hits=s.cache_hits, cache_misses=s.cache_misses,
                   cache_tokens_reused=s.cache_tokens_reused, cache_bytes=s.cache_bytes)
        results.append(row)
        print(json.dumps(row), flush=True)

    print()
    print(f"| model | TTFT miss ({a.prefix_len} tok) | TTFT hit | speedup | "
          f"{a.turns}-turn chat, cache | no cache | mean TTFT/turn, cache | no cache "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['ttft_miss_s'] * 1000:.0f} ms | {r['ttft_hit_s'] * 1000:.0f} ms"
              f" | {r['speedup']:.1f}x | {r['chat_cached_s']:.2f} s | {r['chat_plain_s']:.2f} s"
              f" | {r['chat_cached_ttft_s'] * 1000:.0f} ms | {r['chat_plain_ttft_s'] * 1000:.0f} ms"
              f" | {r['chat_same_tokens']} |")
    if a.out:
        import platform

        a.out.write_text(json.dumps(dict(machine=platform.platform(), results=results),
                                    indent=2))


if __name__ == "__main__":
    main()
