"""What keeping a finished batch's KV costs the decode loop: PrefixCache.insert
of 64 requests of 160 tokens (one batch ending together), on top of a cache
that already holds `--held` such batches, and the objects the collector then
tracks.

    python scripts/probe_prefix_insert.py [--held 20] [--batches 10]
"""

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from engine_worker.prefix_cache import PrefixCache

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--held", type=int, default=20)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=160)
    a = ap.parse_args()
    rng = random.Random(0)
    keys = mx.zeros((1, 4, a.tokens, 16))

    def batch() -> list:
        out = []
        for _ in range(a.rows):
            cache = []
            for _ in range(2):
                c = KVCache()
                c.keys, c.values, c.offset = keys, keys, a.tokens
                cache.append(c)
            out.append(([rng.randrange(10, 50_000) for _ in range(a.tokens)], cache))
        return out

    pc = PrefixCache(1 << 40)
    for _ in range(a.held):
        pc.insert(batch())
    batches = [batch() for _ in range(a.batches)]
    gc.collect()
    tracked = len(gc.get_objects())
    tic = time.perf_counter()
    for b in batches:
        pc.insert(b)
    per_batch = (time.perf_counter() - tic) / a.batches
    print(f"insert of {a.rows} x {a.tokens} tokens: {per_batch * 1e3:.2f} ms; "
          f"objects the collector tracks per cached request: "
          f"{(len(gc.get_objects()) - tracked) / (a.rows * a.batches):.1f}")


if __name__ == "__main__":
    main()
