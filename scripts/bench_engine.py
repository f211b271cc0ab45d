"""Engine over gRPC vs the raw mlx-lm BatchGenerator, side by side.

For each model and concurrency, the raw generator (in a process of its own)
and the engine (a real engine process, driven by an asyncio gRPC client)
generate the same prompts with greedy decoding and EOS ignored, so both
produce exactly concurrency x max_tokens tokens. A third column, "core", is
the engine loop fed directly in the raw process (no gRPC, all requests
at once), to tell the loop's own cost from the rest. All processes stay up for
a whole model; for each concurrency each runs the workload once untimed
(kernels for new shapes compile on first use), then rounds alternate. The
table reports median aggregate tokens/s and ratios to raw.

    python scripts/bench_engine.py --models tiny smollm2-135m --out docs/bench-engine.json
"""

import argparse
import asyncio
import itertools
import json
import os
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


# -- raw mlx-lm and the engine loop without gRPC, in a process of their own --------
# (`bench_engine.py raw --model M`). It reads "raw C" or "core C" per line on
# stdin and answers with tokens/s, so all three can alternate while warm.
# "core" is the engine loop fed directly, all C requests at once: the
# gap between it and raw is the engine loop's own cost, the gap between it and
# the gRPC engine is transport, front end and arrival pattern.

def raw_worker(model: Path, max_tokens: int) -> None:
    import threading

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from engine_worker.loop import Loop
    from engine_worker.messages import Request
    from engine_worker.model import load_model, read_facts
    from engine_worker.sampling import SamplingParams
    from vllm_mlx.settings import EngineSettings

    m, _ = load(str(model))
    generators: dict[int, BatchGenerator] = {}
    done = threading.Event()
    queued: list[list[int]] = []  # prompts not yet sent, for later waves
    left = [0]
    ids = itertools.count()

    def core_request(p: list[int]) -> Request:
        return Request(f"{next(ids)}", p, max_tokens, SamplingParams())

    def publish(batch) -> None:
        for out in batch:
            if out.finish_reason:
                left[0] -= 1
                if queued:  # this stream's next request, as a client would send it
                    core.submit(core_request(queued.pop()))
                elif left[0] == 0:
                    done.set()

    # The core runs mlx-lm's allocator cache handling (allocator_cache_bytes=0):
    # the engine's own would apply to the raw generator in this process too.
    core = Loop(EngineSettings(model=str(model), max_num_seqs=64, prefix_cache=False,
                                 allocator_cache_bytes=0),
                  lambda s: load_model(read_facts(s.model)), publish)
    core.start()
    core.ready.wait()
    for line in sys.stdin:
        kind, c, waves, seed = line.split()
        c, waves = int(c), int(waves)
        ps = prompts(c * waves, vocab_of(model), int(seed))
        first, queued[:] = ps[:c], ps[c:]
        mx.synchronize()
        tic = time.perf_counter()
        if kind == "core":
            done.clear()
            left[0] = len(ps)
            before = {**core.stats.loop_seconds, "steps": core.stats.steps,
                      "prefill_passes": core.stats.prefill_passes}
            for p in first:
                core.submit(core_request(p))
            done.wait()
            tps = len(ps) * max_tokens / (time.perf_counter() - tic)
            after = {**core.stats.loop_seconds, "steps": core.stats.steps,
                     "prefill_passes": core.stats.prefill_passes}
            print(tps, json.dumps({k: after[k] - before[k] for k in after}), flush=True)
            continue
        # Same batch limits as the engine (64 decoded together, 8 prefilled).
        gen = generators.setdefault(c, BatchGenerator(m, completion_batch_size=64,
                                                      prefill_batch_size=8))
        gen.insert(first, max_tokens=[max_tokens] * c)
        produced = 0
        while responses := gen.next_generated():
            produced += len(responses)
            finished = sum(r.finish_reason is not None for r in responses)
            if finished and queued:
                more = [queued.pop() for _ in range(min(finished, len(queued)))]
                gen.insert(more, max_tokens=[max_tokens] * len(more))
        elapsed = time.perf_counter() - tic
        assert produced == len(ps) * max_tokens, produced
        print(produced / elapsed, flush=True)


# -- the engine over gRPC ----------------------------------------------------------

async def engine_run(address: str, model: Path, concurrency: int, max_tokens: int,
                     seed: int, waves: int = 1) -> float:
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    ps = prompts(concurrency * waves, vocab_of(model), seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)

        async def one(stream_prompts: list[list[int]]) -> int:
            n = 0
            for p in stream_prompts:  # closed loop: the next once this one is done
                async for r in stub.Generate(pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=p), max_tokens=max_tokens,
                        ignore_eos=True), timeout=3600):
                    n += len(r.token_ids)
            return n

        await channel.channel_ready()  # connecting is not part of the run
        tic = time.perf_counter()
        produced = sum(await asyncio.gather(
            *(one(ps[i::concurrency]) for i in range(concurrency))))
        elapsed = time.perf_counter() - tic
    assert produced == len(ps) * max_tokens, produced
    return produced / elapsed


def loop_seconds(address: str) -> dict[str, float]:
    """The engine loop's time by phase since start, plus its step count."""
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        s = engine_pb2_grpc.EngineStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    return {**s.loop_seconds, "steps": float(s.steps), "prefill_passes": float(s.prefill_passes)}


def cpu_seconds(front_end_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the engine's front end, its core process and
    this client, where /proc can tell (Linux); the client's own everywhere."""
    mine = os.times()
    out = {"client": mine.user + mine.system}
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    try:
        out["front_end"] = of(front_end_pid)
        out["core"] = sum(of(pid) for pid in core_pids(front_end_pid))
    except OSError:
        pass
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (Linux: sched_setaffinity per task,
    since it applies to one thread and threads that exist keep theirs)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def core_pids(front_end_pid: int) -> list[int]:
    children = Path(f"/proc/{front_end_pid}/task/{front_end_pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def start_engine(model: Path, port: int, flags: list[str]) -> subprocess.Popen:
    from vllm_mlx.supervision.health import wait_for_serving

    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_worker", "--model", str(model), "--port", str(port),
         "--max-num-seqs", "64", "--max-queue", "1024", *flags],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_serving(f"127.0.0.1:{port}", 600, is_alive=lambda: proc.poll() is None)
    return proc


def pooled(results: list[dict]) -> list[dict]:
    """Per model and concurrency, the median of every round's ratio to raw
    from all restarts."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in results:
        cells.setdefault((row["model"], row["concurrency"]), []).append(row)
    out = []
    for (model, c), rows in cells.items():
        kinds = [k[:-4] for k in rows[0] if k.endswith("_all") and k != "raw_all"]
        ratios = {k: [x / r for row in rows for x, r in zip(row[f"{k}_all"], row["raw_all"])]
                  for k in kinds}
        out.append(dict(model=model, concurrency=c, pairs=len(ratios[kinds[0]]),
                        paired_ratio={k: statistics.median(v) for k, v in ratios.items()}))
    return out


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
    r.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--waves", type=int, default=1,
                    help="requests each stream sends one after another (closed loop)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    ap.add_argument("--port", type=int, default=50917)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--engine-flags", default="", help="extra engine flags, one string")
    ap.add_argument("--pin-cpus", default="",
                    help="Linux: CPUs (e.g. 2,3) for the decode loops, raw's process and the "
                         "engine core's, which take turns; the front end and this client get "
                         "the other CPUs")
    ap.add_argument("--no-core", action="store_true", help="skip the in-process core column")
    ap.add_argument("--compare-flags",
                    help="flags of a second engine (engine_b), measured in the same rounds")
    ap.add_argument("--restarts", type=int, default=1,
                    help="run everything this many times, each with fresh raw and engine "
                         "processes, and pool the per-round ratios: a process keeps its own "
                         "speed for its life (docs/benchmarks.md)")
    a = ap.parse_args()
    if a.cmd == "raw":
        raw_worker(a.model, a.max_tokens)
        return

    results = []
    seeds = itertools.count(1)
    # The engine with --engine-flags, and with --compare-flags a second one
    # (engine_b) in the same rounds: configurations compared side by side.
    flags = {"engine": a.engine_flags.split()}
    loops = {int(c) for c in a.pin_cpus.split(",")} if a.pin_cpus else set()
    others = os.sched_getaffinity(0) - loops if loops else set()
    if a.compare_flags is not None:
        flags["engine_b"] = a.compare_flags.split()

    def save() -> None:
        # After every row, so that a run cut short keeps what it measured.
        if not a.out:
            return
        import mlx.core as mx

        a.out.write_text(json.dumps(dict(
            machine=platform.platform(), processor=platform.machine(),
            device=str(mx.default_device()), max_tokens=a.max_tokens,
            prompt_len=PROMPT_LEN, rounds=a.rounds, waves=a.waves, restarts=a.restarts,
            engine_flags=a.engine_flags, compare_flags=a.compare_flags, pin_cpus=a.pin_cpus,
            results=results, pooled=pooled(results)), indent=2))

    for restart, shape in itertools.product(range(a.restarts), a.models):
        model = build_model(shape, a.cache)
        engines = {name: (start_engine(model, a.port + k, f), f"127.0.0.1:{a.port + k}")
                   for k, (name, f) in enumerate(flags.items())}
        raw_proc = subprocess.Popen(
            [sys.executable, __file__, "raw", "--model", str(model), "--max-tokens",
             str(a.max_tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def pin_all(raw_proc: subprocess.Popen = raw_proc, engines: dict = engines) -> None:
            pin(raw_proc.pid, loops)
            for proc, _ in engines.values():
                pin(proc.pid, others)
                for pid in core_pids(proc.pid):
                    pin(pid, loops)
            os.sched_setaffinity(0, others)

        def local_round(kind: str, c: int, raw_proc: subprocess.Popen = raw_proc,
                        loop: dict | None = None) -> float:
            # Every run gets prompts of its own: a repeated prompt would hit
            # the engine's prefix cache and skip its prefill.
            raw_proc.stdin.write(f"{kind} {c} {a.waves} {next(seeds)}\n")
            raw_proc.stdin.flush()
            tps, *spent = raw_proc.stdout.readline().split(maxsplit=1)
            if loop is not None and spent:
                for k, v in json.loads(spent[0]).items():
                    loop[k] = loop.get(k, 0.0) + v
            return float(tps)

        def engine_round(name: str, c: int, engines: dict = engines, model: Path = model,
                         loop: dict | None = None, cpu: dict | None = None) -> float:
            proc, address = engines[name]
            before, cpu_before = loop_seconds(address), cpu_seconds(proc.pid)
            tps = asyncio.run(engine_run(address, model, c, a.max_tokens, next(seeds),
                                         a.waves))
            for k, v in loop_seconds(address).items():
                loop[k] = loop.get(k, 0.0) + v - before.get(k, 0.0)
            for k, v in cpu_seconds(proc.pid).items():
                cpu[k] = cpu.get(k, 0.0) + v - cpu_before.get(k, 0.0)
            return tps

        try:
            for c in a.concurrency:
                kinds = ["raw", *([] if a.no_core else ["core"]), *flags]
                loop: dict[str, dict[str, float]] = {k: {} for k in kinds}
                cpu: dict[str, dict[str, float]] = {k: {} for k in flags}
                runs: dict[str, list[float]] = {k: [] for k in kinds}

                def one(kind: str, c: int = c, loop: dict = loop, cpu: dict = cpu) -> float:
                    if kind in flags:
                        return engine_round(kind, c, loop=loop[kind], cpu=cpu[kind])
                    return local_round(kind, c, loop=loop[kind])

                # One untimed run each: kernels for new shapes compile on first use.
                for kind in kinds:
                    one(kind)
                if loops:  # threads started since (MLX's, the reader's) too
                    pin_all()
                for k in kinds:
                    loop[k].clear()
                for k in flags:
                    cpu[k].clear()
                for i in range(a.rounds):
                    # Every other round in reverse order, so that a drift
                    # within a round falls on both sides alike.
                    for kind in kinds if i % 2 == 0 else kinds[::-1]:
                        runs[kind].append(one(kind))
                row = dict(model=shape, concurrency=c, restart=restart,
                           **{f"{k}_tps": statistics.median(v) for k, v in runs.items()},
                           **{f"{k}_all": v for k, v in runs.items()})
                tokens = a.rounds * c * a.waves * a.max_tokens
                lines = [f"{shape:14s} c={c:3d}  raw {row['raw_tps']:9.1f} tok/s"]
                for k in kinds[1:]:
                    row[f"{k}_ratio"] = row[f"{k}_tps"] / row["raw_tps"]
                    # Rounds next to each other share the machine's state of the moment.
                    row[f"{k}_paired_ratio"] = statistics.median(
                        e / r for e, r in zip(runs[k], runs["raw"]))
                    spent = dict(loop[k])
                    steps = spent.pop("steps", 0.0) or 1.0
                    row[f"{k}_loop_steps"] = steps / a.rounds
                    row[f"{k}_prefill_passes"] = spent.pop("prefill_passes", 0.0) / a.rounds
                    row[f"{k}_loop_us_per_step"] = {n: 1e6 * v / steps for n, v in spent.items()}
                    lines.append(
                        f"  {k:8s} {row[f'{k}_tps']:9.1f} tok/s, / raw {row[f'{k}_ratio']:.3f},"
                        f" paired {row[f'{k}_paired_ratio']:.3f}; {steps / a.rounds:.0f} steps,"
                        f" {row[f'{k}_prefill_passes']:.1f} prefill passes; us per step: "
                        + "  ".join(f"{n} {v:.0f}"
                                    for n, v in row[f"{k}_loop_us_per_step"].items()))
                    if k in flags:
                        row[f"{k}_cpu_ms_per_1k_tokens"] = {n: 1e6 * v / tokens
                                                            for n, v in cpu[k].items()}
                        lines.append("           CPU ms per 1,000 tokens: " + "  ".join(
                            f"{n} {v:.0f}" for n, v in row[f"{k}_cpu_ms_per_1k_tokens"].items()))
                row["ratio"], row["paired_ratio"] = row["engine_ratio"], row["engine_paired_ratio"]
                results.append(row)
                save()
                print("\n".join(lines), flush=True)
        finally:
            raw_proc.kill()
            for proc, _ in engines.values():
                proc.terminate()
                proc.wait()
    if a.restarts > 1:
        print("pooled over restarts, median of per-round ratios to raw:")
        for p in pooled(results):
            print(f"{p['model']:14s} c={p['concurrency']:3d}  " + "  ".join(
                f"{k} {v:.3f} ({p['pairs']} pairs)" for k, v in p["paired_ratio"].items()))

if __name__ == "__main__":
    main()
