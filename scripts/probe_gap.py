# ruff: noqa: B023  (the closures run inside the loop iteration that makes them)
"""Probe: why BatchGenerator.next() was slower inside the engine process
(docs/benchmarks.md, "Where the engine's extra step time went").

One run per model, c=64, rounds alternating between:
  raw          mlx-lm BatchGenerator, all inserted at once (local process)
  core0        scheduler Engine in the local process, all submitted at once
  coreK/wW     same, K submitted per decode step (arrival trickle), window W ms
  pipe         core_main in a spawned process driven over its Pipe, all at once
  grpcW        the real engine over gRPC, admit window W ms
For each: tok/s, loop breakdown, and prefill passes (count, sizes) from hooks.
Per-thread CPU and run-queue wait (/proc schedstat) for the gRPC runs, and
nvidia-smi's compute apps during one.

    python scripts/probe_gap.py --models tiny smollm2-135m --concurrency 64 16 4 1 \
        --base DIR_WITH_OLD_ENGINE --cache /tmp/bench --out /tmp/probe/probe.json
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine import build_model, engine_run, loop_seconds, prompts, vocab_of  # noqa: E402

MAX_TOKENS = 128


def read_hook_log(path: str, offset: int) -> tuple[dict, int]:
    try:
        with open(path) as f:
            f.seek(offset)
            text = f.read()
            offset = f.tell()
    except FileNotFoundError:
        return {}, offset
    prompt_sizes, inserts = [], []
    for line in text.splitlines():
        kind, *vals = line.split()
        if kind == "P":
            prompt_sizes.append(int(vals[0]))
        elif kind == "I":
            inserts.append(int(vals[0]))
    return {"prompt_passes": len(prompt_sizes), "prompt_sizes": prompt_sizes,
            "inserts": inserts}, offset


# -- local process: raw and in-process core ------------------------------------------

def local_worker(model: Path) -> None:
    import mlx.core as mx
    import probe_hooks
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from engine_worker.messages import Request
    from engine_worker.model import load_model, read_facts
    from engine_worker.sampling import SamplingParams
    from engine_worker.scheduler import Engine
    from vllm_mlx.settings import EngineSettings

    log = os.environ["PROBE_LOG"]
    probe_hooks.install(log)
    offset = 0
    m, _ = load(str(model))
    gens: dict[int, BatchGenerator] = {}
    done, left, steps = threading.Event(), [0], [0]
    step_cv = threading.Condition()

    def publish(batch) -> None:
        with step_cv:
            steps[0] += 1
            step_cv.notify_all()
        for out in batch:
            if out.finish_reason:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    settings = EngineSettings(model=str(model), max_num_seqs=64, prefix_cache=False)
    core = Engine(settings, lambda s: load_model(read_facts(s.model)), publish)
    core.start()
    core.ready.wait()
    n = 0
    for line in sys.stdin:
        kind, c, seed, per_step, window = line.split()
        c, per_step = int(c), int(per_step)
        ps = prompts(c, vocab_of(model), int(seed))
        _, offset = read_hook_log(log, offset)
        mx.synchronize()
        extra = {}
        tic = time.perf_counter()
        if kind == "core":
            settings.admit_window_s = float(window) / 1000
            n += 1
            done.clear()
            left[0] = c
            before = {**core.stats.loop_seconds, "steps": core.stats.steps}
            reqs = [Request(f"{n}-{i}", p, MAX_TOKENS, SamplingParams())
                    for i, p in enumerate(ps)]
            if per_step <= 0:
                for r in reqs:
                    core.submit(r)
            else:
                for i in range(0, c, per_step):
                    with step_cv:
                        s0 = steps[0]
                        for r in reqs[i:i + per_step]:
                            core.submit(r)
                        if i + per_step < c:
                            step_cv.wait_for(lambda s0=s0: steps[0] > s0, timeout=5)
            done.wait()
            elapsed = time.perf_counter() - tic
            after = {**core.stats.loop_seconds, "steps": core.stats.steps}
            extra["loop"] = {k: after[k] - before[k] for k in after}
        else:
            gen = gens.setdefault(c, BatchGenerator(m, completion_batch_size=64,
                                                    prefill_batch_size=8))
            gen.insert(ps, max_tokens=[MAX_TOKENS] * c)
            while gen.next_generated():
                pass
            elapsed = time.perf_counter() - tic
        hooks, offset = read_hook_log(log, offset)
        print(json.dumps({"tps": c * MAX_TOKENS / elapsed, **extra, **hooks}), flush=True)


# -- pipe: core_main in a spawned process, no gRPC -------------------------------------

class PipeCore:
    def __init__(self, model: Path, log: str):
        from engine_worker.core import core_main
        from engine_worker.model import read_facts
        from vllm_mlx.settings import EngineSettings

        os.environ["PROBE_LOG"] = log
        os.environ["PYTHONPATH"] = f"{ROOT / 'scripts' / 'probe_site'}:" \
            + os.environ.get("PYTHONPATH", "")
        self.log, self.offset = log, 0
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        settings = EngineSettings(model=str(model), max_num_seqs=64, prefix_cache=False,
                                  max_queue=1024, admit_window_s=0.0)
        self.proc = ctx.Process(target=core_main, args=(child, settings, read_facts(str(model))),
                                daemon=True)
        self.proc.start()
        child.close()
        del os.environ["PROBE_LOG"]
        while True:
            kind, *rest = self.conn.recv()
            if kind == "ready":
                assert rest[0] is None, rest
                break
        self.stats = None
        self.n = 0

    def run(self, c: int, seed: int, model: Path) -> dict:
        from engine_worker.messages import Request
        from engine_worker.sampling import SamplingParams

        _, self.offset = read_hook_log(self.log, self.offset)
        self.drain_stats()
        before = self.stats
        self.n += 1
        ps = prompts(c, vocab_of(model), seed)
        reqs = [Request(f"p{self.n}-{i}", p, MAX_TOKENS, SamplingParams())
                for i, p in enumerate(ps)]
        tic = time.perf_counter()
        for r in reqs:
            self.conn.send(("add", r))
        left = c
        while left:
            kind, outs, stats = self.conn.recv()
            if stats:
                self.stats = stats
            left -= sum(1 for o in outs if o[2])
        elapsed = time.perf_counter() - tic
        # the idle tick right after the last step carries fresh stats
        deadline = time.time() + 2
        while time.time() < deadline:
            kind, outs, stats = self.conn.recv()
            if stats and not outs:
                self.stats = stats
                break
        hooks, self.offset = read_hook_log(self.log, self.offset)
        loop = {k: self.stats["loop_seconds"][k] - before["loop_seconds"][k]
                for k in before["loop_seconds"]}
        loop["steps"] = self.stats["steps"] - before["steps"]
        return {"tps": c * MAX_TOKENS / elapsed, "loop": loop, **hooks}

    def drain_stats(self) -> None:
        while self.stats is None or self.conn.poll(0):
            kind, outs, stats = self.conn.recv()
            if stats:
                self.stats = stats

    def close(self) -> None:
        self.conn.send(("stop", None))
        self.proc.join(10)


# -- per-thread CPU -----------------------------------------------------------------

def threads_of(pid: int) -> dict[str, tuple]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            sched = open(f"/proc/{pid}/task/{tid}/schedstat").read()
            run_ns, wait_ns, slices = map(int, sched.split())
            status = open(f"/proc/{pid}/task/{tid}/status").read()
            vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
            invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            cpu = int(stat[36])  # processor last run on
            name = f"{tid}:{comm}{':main' if int(tid) == pid else ''}"
            out[name] = (run_ns, wait_ns, slices, vol, invol, cpu)
        except (OSError, IndexError, ValueError):
            pass
    return out


def thread_delta(before: dict, after: dict, elapsed: float) -> list:
    rows = []
    for k, a in after.items():
        b = before.get(k, (0, 0, 0, 0, 0, 0))
        run, wait = (a[0] - b[0]) / 1e6, (a[1] - b[1]) / 1e6
        if run > 1:
            rows.append({"thread": k, "run_ms": round(run, 1), "runq_wait_ms": round(wait, 2),
                         "cpu_share": round(run / 1e3 / elapsed, 3),
                         "vol_cs": a[3] - b[3], "invol_cs": a[4] - b[4], "last_cpu": a[5]})
    return sorted(rows, key=lambda r: -r["run_ms"])


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def start_engine(model: Path, port: int, flags: list[str], log: str, err: Path,
                 code: Path) -> subprocess.Popen:
    from vllm_mlx.health import wait_for_serving

    path = os.environ.get("PYTHONPATH", "").replace(str(ROOT), str(code))
    site = ROOT / "scripts" / "probe_site"  # its sitecustomize logs prefill passes
    env = {**os.environ, "PROBE_LOG": log, "PYTHONPATH": f"{site}:{code}:{path}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_worker", "--model", str(model), "--port", str(port),
         "--max-num-seqs", "64", "--max-queue", "1024", "--no-prefix-cache", *flags],
        cwd=code, stdout=subprocess.DEVNULL, stderr=open(err, "w"), env=env)
    wait_for_serving(f"127.0.0.1:{port}", 600, is_alive=lambda: proc.poll() is None)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", nargs="?", default="main")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64])
    ap.add_argument("--base", type=Path, help="code dir of the engine before the change")
    ap.add_argument("--pipe", action="store_true")
    ap.add_argument("--no-grpc", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    ap.add_argument("--out", type=Path, default=Path("probe.json"))
    ap.add_argument("--windows", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--trickle", type=int, nargs="*", default=[])
    a = ap.parse_args()
    if a.cmd == "local":
        local_worker(a.model)
        return
    logdir = a.out.parent
    results = []
    seed = [100]

    def next_seed() -> int:
        seed[0] += 1
        return seed[0]

    smi_done = [False]
    for shape in a.models:
        model = build_model(shape, a.cache)
        local_log = str(logdir / f"hooks-local-{shape}.log")
        local = subprocess.Popen([sys.executable, __file__, "local", "--model", str(model)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PROBE_LOG": local_log})
        pipe = PipeCore(model, str(logdir / f"hooks-pipe-{shape}.log")) if a.pipe else None
        engines = {}
        specs = [] if a.no_grpc else [(f"grpc{w:g}", ROOT, ["--admit-window-ms", str(w)])
                                      for w in a.windows]
        if a.base:
            specs.insert(0, ("grpcbase", a.base, []))
        for i, (name, code, flags) in enumerate(specs):
            log = str(logdir / f"hooks-{name}-{shape}.log")
            engines[name] = (start_engine(model, 50917 + i, flags, log,
                                          logdir / f"{name}-{shape}.err", code),
                             f"127.0.0.1:{50917 + i}", log, [0])

        def local_run(kind: str, c: int, per_step: int = 0, window: float = 0.0) -> dict:
            local.stdin.write(f"{kind} {c} {next_seed()} {per_step} {window}\n")
            local.stdin.flush()
            return json.loads(local.stdout.readline())

        def grpc_run(name: str, c: int, probe_threads: bool) -> dict:
            proc, address, log, off = engines[name]
            _, off[0] = read_hook_log(log, off[0])
            before = loop_seconds(address)
            fe = proc.pid
            core_pid = next((k for k in children(fe)
                             if "resource_tracker" not in open(f"/proc/{k}/cmdline").read()), None)
            pids = {"frontend": fe, "core": core_pid, "client": os.getpid()}
            t0 = {n: threads_of(p) for n, p in pids.items() if p}
            smi = {}
            if not smi_done[0]:
                def run_smi():
                    time.sleep(0.1)
                    smi["apps"] = subprocess.run(
                        ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                         "--format=csv"], capture_output=True, text=True).stdout
                th = threading.Thread(target=run_smi)
                th.start()
            tic = time.perf_counter()
            tps = asyncio.run(engine_run(address, model, c, MAX_TOKENS, next_seed()))
            elapsed = time.perf_counter() - tic
            if not smi_done[0]:
                th.join()
                smi_done[0] = True
                smi["pids"] = {**pids, "local": local.pid}
            t1 = {n: threads_of(p) for n, p in pids.items() if p}
            after = loop_seconds(address)
            hooks, off[0] = read_hook_log(log, off[0])
            loop = {k: after[k] - before.get(k, 0.0) for k in after}
            row = {"tps": tps, "loop": loop, **hooks}
            if probe_threads:
                row["threads"] = {n: thread_delta(t0[n], t1[n], elapsed) for n in t1}
            if smi:
                row["nvidia_smi"] = smi
            return row

        kinds = ["raw", "core"] + [f"core{k}w{w:g}" for k in a.trickle for w in a.windows] \
            + (["pipe"] if pipe else []) + list(engines)

        def one(kind: str, c: int, probe_threads: bool = False) -> dict:
            if kind == "raw":
                return local_run("raw", c)
            if kind == "core":
                return local_run("core", c)
            if kind.startswith("core"):
                k, w = kind[4:].split("w")
                return local_run("core", c, int(k), float(w))
            if kind == "pipe":
                return pipe.run(c, next_seed(), model)
            return grpc_run(kind, c, probe_threads)

        try:
          for c in a.concurrency:
            for kind in kinds:  # untimed: compile kernels for these shapes
                one(kind, c)
            runs: dict[str, list] = {k: [] for k in kinds}
            for r in range(a.rounds):
                for kind in kinds:
                    runs[kind].append(one(kind, c, probe_threads=(r == 0 and c == 64)))
            raw = statistics.median(x["tps"] for x in runs["raw"])
            for kind, rs in runs.items():
                tps = statistics.median(x["tps"] for x in rs)
                line = f"{shape:13s} c={c:2d} {kind:9s} {tps:9.1f} tok/s ({tps / raw:.3f})"
                lp = [x["loop"] for x in rs if "loop" in x]
                if lp:
                    steps = sum(x["steps"] for x in lp)
                    line += f"  steps {steps / len(lp):.0f}  " + " ".join(
                        f"{k} {1e6 * sum(x[k] for x in lp) / steps:.0f}"
                        for k in ("admit", "step", "handle", "publish"))
                pp = [x.get("prompt_passes") for x in rs]
                line += f"  prefill passes {pp}  sizes {rs[-1].get('prompt_sizes')}" \
                        f"  inserts {rs[-1].get('inserts')}"
                print(line, flush=True)
                results.append({"model": shape, "concurrency": c, "kind": kind, "tps": tps,
                                "ratio": tps / raw, "runs": rs})
            a.out.write_text(json.dumps(results, indent=1))
        finally:
            local.kill()
            if pipe:
                pipe.close()
            for proc, *_ in engines.values():
                proc.terminate()
                proc.wait()
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
