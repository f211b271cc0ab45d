"""Engine over gRPC vs the raw mlx-lm BatchGenerator, side by side.

For each model and concurrency, the raw generator (in a process of its own)
and the engine (a real engine process, driven by an asyncio gRPC client)
generate the same prompts with greedy decoding and EOS ignored, so both
produce exactly concurrency x max_tokens tokens. Rounds alternate between the
two; the table reports the median aggregate tokens/s of each and their ratio.

    python scripts/bench_engine.py --models tiny smollm2-135m --out docs/bench-engine.json
"""

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT_LEN = 32


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(PROMPT_LEN)] for _ in range(n)]


def vocab_of(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


# -- raw mlx-lm, run as `bench_engine.py raw ...` in its own process -----------

def raw(model: Path, concurrency: int, max_tokens: int) -> float:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    m, _ = load(str(model))
    gen = BatchGenerator(m, completion_batch_size=max(concurrency, 1),
                         prefill_batch_size=min(8, concurrency))
    gen.insert([[1, 2, 3], [4, 5, 6, 7]], max_tokens=[4, 4])  # warm-up, as the engine does
    while gen.next_generated():
        pass
    ps = prompts(concurrency, vocab_of(model))
    mx.synchronize()
    tic = time.perf_counter()
    gen.insert(ps, max_tokens=[max_tokens] * concurrency)
    produced = 0
    while responses := gen.next_generated():
        produced += len(responses)
    elapsed = time.perf_counter() - tic
    assert produced == concurrency * max_tokens, produced
    return produced / elapsed


# -- the engine over gRPC ----------------------------------------------------------

async def engine_run(address: str, model: Path, concurrency: int, max_tokens: int) -> float:
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    ps = prompts(concurrency, vocab_of(model))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)

        async def one(p: list[int]) -> int:
            n = 0
            async for r in stub.Generate(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=p), max_tokens=max_tokens, ignore_eos=True),
                    timeout=3600):
                n += len(r.token_ids)
            return n

        tic = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(p) for p in ps)))
        elapsed = time.perf_counter() - tic
    assert produced == concurrency * max_tokens, produced
    return produced / elapsed


def start_engine(model: Path, port: int) -> subprocess.Popen:
    from vllm_mlx.health import wait_for_serving

    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_worker", "--model", str(model), "--port", str(port),
         "--max-num-seqs", "64", "--max-queue", "1024"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_serving(f"127.0.0.1:{port}", 600, is_alive=lambda: proc.poll() is None)
    return proc


def build_model(shape: str, cache: Path) -> Path:
    import make_test_models

    out = cache / shape
    if not (out / "config.json").exists():
        make_test_models.build_text_model(out, shape=shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("raw")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--concurrency", type=int, required=True)
    r.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    ap.add_argument("--port", type=int, default=50917)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.cmd == "raw":
        print(json.dumps(raw(a.model, a.concurrency, a.max_tokens)))
        return

    results = []
    for shape in a.models:
        model = build_model(shape, a.cache)
        proc = start_engine(model, a.port)
        try:
            for c in a.concurrency:
                raw_tps, eng_tps = [], []
                for _ in range(a.rounds):
                    out = subprocess.run(
                        [sys.executable, __file__, "raw", "--model", str(model),
                         "--concurrency", str(c), "--max-tokens", str(a.max_tokens)],
                        capture_output=True, text=True, check=True)
                    raw_tps.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    eng_tps.append(asyncio.run(
                        engine_run(f"127.0.0.1:{a.port}", model, c, a.max_tokens)))
                row = dict(model=shape, concurrency=c, raw_tps=statistics.median(raw_tps),
                           engine_tps=statistics.median(eng_tps), raw_all=raw_tps,
                           engine_all=eng_tps)
                row["ratio"] = row["engine_tps"] / row["raw_tps"]
                results.append(row)
                print(f"{shape:14s} c={c:3d}  raw {row['raw_tps']:9.1f} tok/s  "
                      f"engine {row['engine_tps']:9.1f} tok/s  ratio {row['ratio']:.3f}",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait()
    if a.out:
        import mlx.core as mx

        a.out.write_text(json.dumps(dict(
            machine=platform.platform(), processor=platform.machine(),
            device=str(mx.default_device()), max_tokens=a.max_tokens,
            prompt_len=PROMPT_LEN, rounds=a.rounds, results=results), indent=2))


if __name__ == "__main__":
    main()
