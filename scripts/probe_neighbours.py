"""Probe: does CPU work in other processes slow the raw decode loop?

The engine over gRPC always has busy neighbours (its front end, the client);
the raw generator in bench_engine.py runs alone. This times the raw mlx-lm
BatchGenerator (bench_engine.py's raw worker) alone and beside K spinning
processes, rounds interleaved, and prints each condition's median tokens/s
as a ratio to "alone".

    python scripts/probe_neighbours.py --models tiny smollm2-135m --concurrency 64 16 \
        --spinners 1 2 4 --rounds 5 --out /tmp/neighbours.json
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine import build_model  # noqa: E402

SPIN = {
    # pure interpreter work, like an event loop parsing and packing messages
    "python": "while True: pass",
    # streaming through memory, to load caches and memory bandwidth
    "memory": "import numpy as np\na = np.ones(1 << 25)\nb = np.empty_like(a)\n"
              "while True: np.copyto(b, a)",
}


def start_spinners(kind: str, k: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN[kind]]) for _ in range(k)]
    time.sleep(0.3)  # running, not starting up
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--spinners", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--kinds", nargs="+", default=list(SPIN), choices=list(SPIN))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    seeds = itertools.count(1)
    conditions = [("alone", 0)] + [(k, n) for k in a.kinds for n in a.spinners]
    results = []
    for shape in a.models:
        model = build_model(shape, a.cache)
        raw = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "bench_engine.py"), "raw", "--model",
             str(model), "--max-tokens", str(a.max_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def raw_round(c: int, raw: subprocess.Popen = raw) -> float:
            raw.stdin.write(f"raw {c} 1 {next(seeds)}\n")
            raw.stdin.flush()
            return float(raw.stdout.readline().split()[0])

        try:
            for c in a.concurrency:
                raw_round(c)  # kernels compile on first use
                runs: dict[str, list[float]] = {f"{k}x{n}": [] for k, n in conditions}
                for _ in range(a.rounds):
                    for kind, n in conditions:
                        spinners = start_spinners(kind, n) if n else []
                        try:
                            runs[f"{kind}x{n}"].append(raw_round(c))
                        finally:
                            for p in spinners:
                                p.kill()
                                p.wait()
                base = statistics.median(runs["alonex0"])
                row = dict(model=shape, concurrency=c, runs=runs,
                           ratio={k: statistics.median(v) / base for k, v in runs.items()})
                results.append(row)
                print(f"{shape} c={c} alone {base:.0f} tok/s  " + "  ".join(
                    f"{k} {r:.2f}" for k, r in row["ratio"].items()), flush=True)
        finally:
            raw.kill()
    if a.out:
        a.out.write_text(json.dumps(dict(cpus=os.cpu_count(), results=results), indent=2))


if __name__ == "__main__":
    main()
