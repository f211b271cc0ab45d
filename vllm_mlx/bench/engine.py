"""The engine over gRPC vs raw mlx-lm's BatchGenerator, side by side.

For each model and concurrency, the raw generator (in a process of its own)
and the engine (a real engine process, driven by an asyncio gRPC client)
generate the same prompts with greedy decoding and EOS ignored, so both
produce exactly concurrency x waves x max_tokens tokens. A third column,
"core", is the engine loop fed directly in the raw process (no gRPC, all
requests at once), to tell the loop's own cost from the rest. All processes
stay up for a whole model; for each concurrency each runs the workload once
untimed (kernels for new shapes compile on first use), then rounds alternate.
Reported: median aggregate tokens/s, ratios to raw (of the medians, and the
median of each round's own ratio), the loop's time per step by phase, and
the CPU each process spent per 1,000 tokens (Linux).

    vllm-mlx-bench engine --models tiny smollm2-135m --output bench-engine.json
"""

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vllm_mlx.bench import report
from vllm_mlx.bench.workloads import (
    LOOP_COUNTS,
    PROMPT_LEN,
    child_pids,
    cpu_seconds,
    default_cache,
    engine_loop_seconds,
    model_folder,
    model_name,
    ports,
    prompts,
    start_engine,
    vocab_of,
)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", "--model", nargs="+", default=["tiny", "smollm2-135m"],
                    metavar="MODEL", help="test-model shapes (tiny, smollm2-135m: built on "
                                          "first use) or model folders")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                    help="streams generating at once")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per concurrency")
    ap.add_argument("--waves", type=int, default=1,
                    help="requests each stream sends one after another (closed loop)")
    ap.add_argument("--restarts", type=int, default=1,
                    help="run everything this many times, each with fresh raw and engine "
                         "processes, and pool the per-round ratios: a process keeps its own "
                         "speed for its life (docs/benchmarks.md)")
    ap.add_argument("--no-core", action="store_true", help="skip the in-process core column")
    ap.add_argument("--engine-flags", default="",
                    help="extra engine flags, one string (--engine-flags=\"--no-prefix-cache\")")
    ap.add_argument("--compare-flags",
                    help="flags of a second engine (engine_b), measured in the same rounds; "
                         "one string, as --engine-flags")
    ap.add_argument("--pin-cpus", default="",
                    help="Linux: CPUs (e.g. 2,3) for the decode loops, raw's process and the "
                         "engine core's, which take turns; the front end and this client get "
                         "the other CPUs")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="where test models are built")
    ap.add_argument("--port", type=int, default=0,
                    help="the first engine's gRPC port (engine_b: the next); 0: free ports")


# -- raw mlx-lm and the engine loop without gRPC, in a process of their own --------
# (`python -m vllm_mlx.bench.engine MODEL MAX_TOKENS`). It reads "raw C WAVES SEED"
# or "core C WAVES SEED" per line on stdin and answers with tokens/s, so all
# columns can alternate while warm. "core" is the engine loop fed directly,
# all C requests at once: the gap between it and raw is the engine loop's own
# cost, the gap between it and the gRPC engine is transport, front end and
# arrival pattern.


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
    print("ready", flush=True)
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
            before = _core_counters(core)
            for p in first:
                core.submit(core_request(p))
            done.wait()
            tps = len(ps) * max_tokens / (time.perf_counter() - tic)
            after = _core_counters(core)
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


def _core_counters(core) -> dict[str, float]:
    return {**core.stats.loop_seconds, "steps": core.stats.steps,
            "prefill_passes": core.stats.prefill_passes}


class RawProcess:
    """The raw generator and the in-process core, driven over stdin/stdout."""

    def __init__(self, model: Path, max_tokens: int):
        # stderr stays the terminal's: what goes wrong there is seen at once.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_mlx.bench.engine", str(model), str(max_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise SystemExit("the raw generator's process did not start")

    def run(self, kind: str, c: int, waves: int, seed: int,
            loop: dict[str, float]) -> float:
        """tokens/s of one run; adds the core's loop time to `loop`."""
        self.proc.stdin.write(f"{kind} {c} {waves} {seed}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise SystemExit(f"the raw generator's process exited ({self.proc.wait()})")
        tps, *spent = answer.split(maxsplit=1)
        if spent:
            for k, v in json.loads(spent[0]).items():
                loop[k] = loop.get(k, 0.0) + v
        return float(tps)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- the engine over gRPC ----------------------------------------------------------


async def engine_run(address: str, model: Path, concurrency: int, max_tokens: int,
                     seed: int, waves: int = 1) -> float:
    """Aggregate tokens/s of `concurrency` streams, each sending `waves`
    requests one after another."""
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


def engine_cpu_seconds(front_end_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the engine's front end, its core process and
    this client, where /proc can tell (Linux); the client's own everywhere."""
    mine = os.times()
    out = {"client": mine.user + mine.system}
    try:
        out["front_end"] = cpu_seconds(front_end_pid)
        out["core"] = sum(cpu_seconds(pid) for pid in child_pids(front_end_pid))
    except OSError:
        pass
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (Linux: sched_setaffinity per task,
    since it applies to one thread and threads that exist keep theirs)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


class Engine:
    """An engine process under test, and what its runs cost it."""

    def __init__(self, model: Path, port: int, flags: list[str]):
        self.model, self.address = model, f"127.0.0.1:{port}"
        self.child = start_engine(model, port, flags)

    def run(self, c: int, a: argparse.Namespace, seed: int, loop: dict[str, float],
            cpu: dict[str, float]) -> float:
        before, cpu_before = engine_loop_seconds(self.address), engine_cpu_seconds(self.child.pid)
        tps = asyncio.run(engine_run(self.address, self.model, c, a.max_tokens, seed, a.waves))
        for k, v in engine_loop_seconds(self.address).items():
            loop[k] = loop.get(k, 0.0) + v - before.get(k, 0.0)
        for k, v in engine_cpu_seconds(self.child.pid).items():
            cpu[k] = cpu.get(k, 0.0) + v - cpu_before.get(k, 0.0)
        return tps


# -- the runs ------------------------------------------------------------------------


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


def run(a: argparse.Namespace) -> dict:
    import mlx.core as mx

    # The engine with --engine-flags, and with --compare-flags a second one
    # (engine_b) in the same rounds: configurations compared side by side.
    flags = {"engine": a.engine_flags.split()}
    if a.compare_flags is not None:
        flags["engine_b"] = a.compare_flags.split()
    engine_ports = dict(zip(flags, ports(a.port, len(flags))))
    loops = {int(c) for c in a.pin_cpus.split(",")} if a.pin_cpus else set()
    others = os.sched_getaffinity(0) - loops if loops else set()
    kinds = ["raw", *([] if a.no_core else ["core"]), *flags]
    seeds = itertools.count(1)
    results: list[dict] = []
    try:
        for restart, spec in itertools.product(range(a.restarts), a.models):
            model_runs(a, spec, restart, flags, engine_ports, kinds, seeds, loops, others, results)
    except KeyboardInterrupt:
        # A run cut short keeps what it measured: --output still gets it.
        print("interrupted: reporting the rows measured so far", file=sys.stderr)
    print_results(results, kinds, flags, a.restarts)
    return dict(device=str(mx.default_device()), models=a.models, concurrency=a.concurrency,
                max_tokens=a.max_tokens, prompt_len=PROMPT_LEN, rounds=a.rounds,
                waves=a.waves, restarts=a.restarts, core=not a.no_core,
                engine_flags=a.engine_flags, compare_flags=a.compare_flags,
                pin_cpus=a.pin_cpus, results=results, pooled=pooled(results))


def model_runs(a: argparse.Namespace, spec: str, restart: int, flags: dict[str, list[str]],
               engine_ports: dict[str, int], kinds: list[str], seeds, loops: set[int],
               others: set[int], results: list[dict]) -> None:
    """Fresh engine and raw processes for one model, each concurrency in
    turn; a row appended to `results` as each is done."""
    model = model_folder(spec, a.cache)
    engines: dict[str, Engine] = {}
    raw = None
    try:
        for name, f in flags.items():
            engines[name] = Engine(model, engine_ports[name], f)
        raw = RawProcess(model, a.max_tokens)
        for c in a.concurrency:
            results.append(one_concurrency(a, model_name(spec), restart, c, kinds, raw,
                                           engines, seeds, loops, others))
    finally:
        if raw is not None:
            raw.stop()
        for e in engines.values():
            e.child.stop()


def one_concurrency(a: argparse.Namespace, name: str, restart: int, c: int, kinds: list[str],
                    raw: RawProcess, engines: dict[str, Engine], seeds, loops: set[int],
                    others: set[int]) -> dict:
    """One untimed run of each column, then `a.rounds` rounds; one table row."""
    loop: dict[str, dict[str, float]] = {k: {} for k in kinds}
    cpu: dict[str, dict[str, float]] = {k: {} for k in engines}
    runs: dict[str, list[float]] = {k: [] for k in kinds}

    def one(kind: str) -> float:
        # Every run gets prompts of its own: a repeated prompt would hit the
        # engine's prefix cache and skip its prefill.
        if kind in engines:
            return engines[kind].run(c, a, next(seeds), loop[kind], cpu[kind])
        return raw.run(kind, c, a.waves, next(seeds), loop[kind])

    desc = f"{name} c={c}" + (f" restart {restart + 1}" if a.restarts > 1 else "")
    for i in report.progress(range(a.rounds + 1), desc):
        if i == 0:
            for kind in kinds:  # untimed: kernels for new shapes compile on first use
                one(kind)
            if loops:  # threads started since (MLX's, the reader's) too
                pin_all(raw, engines, loops, others)
            for d in (*loop.values(), *cpu.values()):
                d.clear()
            continue
        # Every other round in reverse order, so that a drift within a round
        # falls on both sides alike.
        for kind in kinds if i % 2 == 1 else kinds[::-1]:
            runs[kind].append(one(kind))
    row = dict(model=name, concurrency=c, restart=restart,
               **{f"{k}_tps": statistics.median(v) for k, v in runs.items()},
               **{f"{k}_all": v for k, v in runs.items()})
    tokens = a.rounds * c * a.waves * a.max_tokens
    for k in kinds[1:]:
        row[f"{k}_ratio"] = row[f"{k}_tps"] / row["raw_tps"]
        # Rounds next to each other share the machine's state of the moment.
        row[f"{k}_paired_ratio"] = statistics.median(
            e / r for e, r in zip(runs[k], runs["raw"]))
        spent = dict(loop[k])
        steps = spent.pop("steps", 0.0) or 1.0
        row[f"{k}_loop_steps"] = steps / a.rounds
        row[f"{k}_prefill_passes"] = spent.pop("prefill_passes", 0.0) / a.rounds
        row[f"{k}_steps_over_10ms"] = spent.pop("steps_over_10ms", 0.0) / a.rounds
        for key in LOOP_COUNTS:
            spent.pop(key, None)
        row[f"{k}_loop_us_per_step"] = {n: 1e6 * v / steps for n, v in spent.items()}
        if k in engines:
            row[f"{k}_cpu_ms_per_1k_tokens"] = {n: 1e6 * v / tokens for n, v in cpu[k].items()}
    row["ratio"], row["paired_ratio"] = row["engine_ratio"], row["engine_paired_ratio"]
    return row


def pin_all(raw: RawProcess, engines: dict[str, Engine], loops: set[int],
            others: set[int]) -> None:
    pin(raw.proc.pid, loops)
    for e in engines.values():
        pin(e.child.pid, others)
        for pid in child_pids(e.child.pid):
            pin(pid, loops)
    os.sched_setaffinity(0, others)


def print_results(results: list[dict], kinds: list[str], flags: dict, restarts: int) -> None:
    print(report.banner("engine over gRPC vs raw mlx-lm, median tokens/s"))
    header = ["model", "conc", *(["restart"] if restarts > 1 else []), "raw tok/s"]
    for k in kinds[1:]:
        header += [f"{k} tok/s", f"{k}/raw", "paired"]
    rows = []
    for r in results:
        row = [r["model"], r["concurrency"], *([r["restart"]] if restarts > 1 else []),
               f"{r['raw_tps']:.1f}"]
        for k in kinds[1:]:
            row += [f"{r[f'{k}_tps']:.1f}", f"{r[f'{k}_ratio']:.3f}",
                    f"{r[f'{k}_paired_ratio']:.3f}"]
        rows.append(row)
    print(report.table(rows, header))
    print("\nengine loop per round: steps, prefill passes, microseconds per step by phase")
    rows = [[r["model"], r["concurrency"], k, f"{r[f'{k}_loop_steps']:.0f}",
             f"{r[f'{k}_prefill_passes']:.1f}",
             "  ".join(f"{n} {v:.0f}" for n, v in sorted(r[f"{k}_loop_us_per_step"].items()))]
            for r in results for k in kinds[1:]]
    print(report.table(rows, ["model", "conc", "column", "steps", "prefills", "us per step"]))
    cpu_rows = [[r["model"], r["concurrency"], k, "  ".join(
                 f"{n} {v:.0f}" for n, v in r[f"{k}_cpu_ms_per_1k_tokens"].items())]
                for r in results for k in flags]
    print("\nCPU ms per 1,000 tokens")
    print(report.table(cpu_rows, ["model", "conc", "column", "by process"]))
    if restarts > 1:
        print("\npooled over restarts, median of per-round ratios to raw")
        print(report.table(
            [[p["model"], p["concurrency"], p["pairs"],
              *(f"{v:.3f}" for v in p["paired_ratio"].values())] for p in pooled(results)],
            ["model", "conc", "pairs", *(f"{k}/raw" for k in kinds[1:])]))


if __name__ == "__main__":
    raw_worker(Path(sys.argv[1]), int(sys.argv[2]))
