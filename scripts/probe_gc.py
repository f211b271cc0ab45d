"""Probe: what the cyclic garbage collector costs the engine loop.

Runs the engine's scheduler in-process with the prefix cache on (its trie
holds a dict per cached token), sends waves of 64 requests, and reports the
time spent in collections by generation, with and without `gc.freeze()`
after loading, as the engine core process does.

    python scripts/probe_gc.py --model tiny --waves 10 [--freeze]
"""

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine import build_model, prompts, vocab_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--waves", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--freeze", action="store_true")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    a = ap.parse_args()

    from engine_worker.messages import Request
    from engine_worker.model import load_model, read_facts
    from engine_worker.sampling import SamplingParams
    from engine_worker.scheduler import Engine
    from vllm_mlx.settings import EngineSettings

    spent = [0.0, 0.0, 0.0]
    count = [0, 0, 0]
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[info["generation"]] += time.perf_counter() - started[0]
            count[info["generation"]] += 1

    model = build_model(a.model, a.cache)
    done, left = threading.Event(), [0]

    def publish(batch) -> None:
        for out in batch:
            if out.finish_reason:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    engine = Engine(EngineSettings(model=str(model), max_num_seqs=64),
                    lambda s: load_model(read_facts(s.model)), publish)
    engine.start()
    engine.ready.wait()
    if a.freeze:
        gc.freeze()
    gc.callbacks.append(on_gc)
    n = 0
    tic = time.perf_counter()
    for wave in range(a.waves):
        done.clear()
        left[0] = 64
        for p in prompts(64, vocab_of(model), wave + 100):
            n += 1
            engine.submit(Request(str(n), p, a.max_tokens, SamplingParams()))
        done.wait()
    elapsed = time.perf_counter() - tic
    engine.stop()
    print(f"{elapsed:.2f} s, frozen {gc.get_freeze_count()} objects, collections by "
          f"generation: {count}, ms: {[round(1000 * s, 1) for s in spent]}, "
          f"tracked objects now {len(gc.get_objects())}")


if __name__ == "__main__":
    main()
