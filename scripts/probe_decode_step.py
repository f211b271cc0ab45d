"""What the engine's decode step (engine_worker/decode.py) saves over mlx-lm's.

Two BatchGenerators on the same model decode the same greedy batch: one with
mlx-lm's own step, one with the engine's. Rounds of steps alternate between
them; each prints the median time per step and the ratio.

    python scripts/probe_decode_step.py [--model DIR] [--batch 1 16 64]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / ".bench" / "tiny",
                    help="a model folder (scripts/make_test_models.py builds one)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()

    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from engine_worker import decode

    model, _ = load(str(a.model))

    def generator(batch: int, engine_step: bool) -> BatchGenerator:
        gen = BatchGenerator(model, completion_batch_size=64, prefill_batch_size=8)
        rng = random.Random(0)
        gen.insert([[rng.randrange(1, 200) for _ in range(32)] for _ in range(batch)],
                   max_tokens=[10**6] * batch)
        while len(gen._generation_batch) < batch:  # prefill done: decoding only
            gen.next()
        if engine_step:
            decode.install(gen._generation_batch, set())
        return gen

    for batch in a.batch:
        gens = {"mlx-lm": generator(batch, False), "engine": generator(batch, True)}
        per_step: dict[str, list[float]] = {k: [] for k in gens}
        for r in range(a.rounds):
            for name in (list(gens) if r % 2 == 0 else list(reversed(gens))):
                gen = gens[name]
                for _ in range(5):
                    gen.next()
                tic = time.perf_counter()
                for _ in range(a.steps):
                    gen.next()
                per_step[name].append((time.perf_counter() - tic) / a.steps * 1e6)
        ratios = [e / m for e, m in zip(per_step["engine"], per_step["mlx-lm"])]
        print(f"batch {batch:3d}: us per step, mlx-lm "
              f"{statistics.median(per_step['mlx-lm']):8.0f}  engine "
              f"{statistics.median(per_step['engine']):8.0f}  engine / mlx-lm, median of "
              f"rounds {statistics.median(ratios):.3f}", flush=True)
        for gen in gens.values():
            gen.close()


if __name__ == "__main__":
    main()
