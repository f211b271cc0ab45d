"""What the engine, gateway, cache and media benchmarks share: random prompts,
the models they run (test models built on demand, or a folder), and the
processes they start on loopback ports and read CPU time from."""

import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 32
# Test-model shapes a benchmark can name instead of a folder.
TINY_VLM = "tiny-vlm"


def random_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    # Ids from 10 up: the test models' special tokens (EOS among them) come first.
    return [rng.randrange(10, vocab) for _ in range(n)]


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of PROMPT_LEN random token ids, the same for the same seed."""
    rng = random.Random(seed)
    return [random_ids(PROMPT_LEN, vocab, rng) for _ in range(n)]


def vocab_of(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    # Vision-language configs keep the language model's under text_config.
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


# -- models --------------------------------------------------------------------------


def default_cache() -> Path:
    from vllm_mlx.model_files.model_source import default_cache_dir

    return default_cache_dir() / "bench-models"


def model_folder(spec: str, cache: Path) -> Path:
    """A test-model shape (tiny, smollm2-135m, tiny-vlm), built into `cache`
    the first time, or a model folder as it is."""
    from vllm_mlx.bench import test_models, test_vlms

    shape, bits = _quantized_shape(spec)
    if shape in test_models.SHAPES or spec == TINY_VLM:
        # Named by the builders' source too: a changed builder must not be
        # measured on a model an older one built.
        source = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                         for m in (test_models, test_vlms))).hexdigest()[:10]
        out = (cache / f"{spec}-{source}").resolve()  # absolute: transformers needs it offline
        if not out.exists():
            # Built aside and renamed: two runs at once never see half a model.
            cache.mkdir(parents=True, exist_ok=True)
            part = Path(tempfile.mkdtemp(prefix=f".{spec}-", dir=cache))
            try:
                if spec == TINY_VLM:
                    test_vlms.build_vlm_model(part)
                elif bits:
                    test_models.build_text_model(part, shape=shape, dtype="bfloat16", bits=bits)
                else:
                    test_models.build_text_model(part, shape=spec)
                part.rename(out)
            except OSError:
                if not out.exists():
                    raise
            finally:  # left when another run's got there first, or the build failed
                shutil.rmtree(part, ignore_errors=True)
        return out
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"{spec!r} is neither a test-model shape "
                         f"({', '.join([*test_models.SHAPES, TINY_VLM])}, each also as "
                         f"SHAPE-4bit or SHAPE-8bit) nor a model folder")
    return path.resolve()


def _quantized_shape(spec: str) -> tuple[str, int | None]:
    """"llama-3.2-1b-4bit" -> ("llama-3.2-1b", 4): a shape, quantized."""
    for bits in (4, 8):
        if spec.endswith(f"-{bits}bit"):
            return spec.removesuffix(f"-{bits}bit"), bits
    return spec, None


def model_name(spec: str) -> str:
    """How a model is named in tables and JSON: its shape, or its folder's name."""
    return Path(spec).name


# -- processes -----------------------------------------------------------------------


def ports(first: int, n: int) -> list[int]:
    """`first` and the n-1 ports after it, or for 0 (every benchmark's
    default: two runs at once, or a server already up, never collide) n
    distinct free loopback ports."""
    if first:
        return list(range(first, first + n))
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:  # all bound at once, so no two get the same
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _log_file():
    # Children write here, not to a pipe nobody reads (which would block them
    # once full); shown when a child fails to start.
    return tempfile.NamedTemporaryFile("w+b", prefix="vllm-mlx-bench-", suffix=".log")


def _tail(log) -> str:
    log.flush()
    return Path(log.name).read_bytes()[-4000:].decode(errors="replace")


class Child:
    """A started process and its log, stopped by `stop` (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.log = _log_file()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return _tail(self.log)

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_engine(model: Path, port: int, flags: list[str], cwd: Path | None = None) -> Child:
    """An engine process (64 decoded together, a queue long enough for any
    benchmark's burst), once it reports SERVING. `cwd`: a source tree whose
    engine it runs instead of this one."""
    from vllm_mlx.supervision.health import wait_for_serving

    child = Child([sys.executable, "-m", "engine_worker", "--model", str(model),
                   "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "64",
                   "--max-queue", "1024", *flags], cwd=cwd)
    try:
        wait_for_serving(f"127.0.0.1:{port}", 600, is_alive=child.alive)
    except (RuntimeError, TimeoutError) as e:
        out = child.output()
        child.stop()
        raise SystemExit(f"the engine did not start ({e}):\n{out}") from None
    return child


def _server_env() -> dict[str, str]:
    # A key or a metrics folder from the caller's shell would change what is measured.
    return {k: v for k, v in os.environ.items()
            if k not in ("VLLM_MLX_API_KEY", "PROMETHEUS_MULTIPROC_DIR")}


def start_gateway(engine_address: str, port: int, workers: int = 1) -> Child:
    """A gateway process (`python -m gateway`), once its /health says 200."""
    import httpx

    child = Child([sys.executable, "-m", "gateway", "--engine", engine_address,
                   "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                   "--log-level", "warning"], env=_server_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.alive():
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return child
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    out = child.output()
    child.stop()
    raise SystemExit(f"the gateway did not start:\n{out}")


class Stack:
    """The whole stack, `vllm-mlx-up` (gateway, engine, media workers), once
    it says ready; `media` holds the media workers' addresses."""

    def __init__(self, model: Path, port: int, engine_port: int, flags: list[str] = ()):
        self.url = f"http://127.0.0.1:{port}"
        self.engine_address = f"127.0.0.1:{engine_port}"
        self.child = Child([sys.executable, "-m", "vllm_mlx.supervision.supervisor",
                            "--model", str(model), "--port", str(port),
                            "--engine-port", str(engine_port), *flags], env=_server_env())
        deadline = time.monotonic() + 300
        while "ready:" not in (out := self.child.output()):
            if not self.child.alive() or time.monotonic() > deadline:
                self.child.stop()
                raise SystemExit(f"the stack did not start:\n{out}")
            time.sleep(0.2)
        self.media = re.findall(r"\[media-\d+\] .* listening on (\S+),", out)

    def stop(self) -> None:
        self.child.stop(60)


# -- CPU time (Linux: /proc) ---------------------------------------------------------


def has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def _stat(pid: int) -> list[str]:
    # After the command name, which may hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (the engine's core, uvicorn's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(_stat(int(stat.parent.name))[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and the processes it started."""
    total = 0.0
    for p in [pid, *child_pids(pid)]:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


# Where the engine's loop iterations are counted as slow (bounds of its step
# histogram, engine_worker/stats.py), in ms; text gaps are counted against the
# same bounds. 2.5 ms matters beside a ~1 ms GPU step: such an iteration plus
# the way to the client is a gap over 5 ms.
SLOW_MS = (2.5, 5, 10)


def over(ms: float) -> str:
    """The name of a count of things over `ms` milliseconds."""
    return f"over_{ms:g}ms".replace(".", "_")


# engine_loop_seconds' figures that are counts; the rest are seconds.
LOOP_COUNTS = ("steps", "prefill_passes", *(f"steps_{over(ms)}" for ms in SLOW_MS),
               *(f"front_end_lags_{over(ms)}" for ms in SLOW_MS))


def count_over(bounds, counts, seconds: float) -> float:
    """Of a histogram's per-bucket counts (the last past every bound), how
    many were over `seconds` (one of its bounds)."""
    return float(sum(count for bound, count in zip([0.0, *bounds], counts) if bound >= seconds))


def engine_loop_seconds(address: str) -> dict[str, float]:
    """The engine loop's time by phase since it started, its steps, its
    prefill passes, its steps that took over each of SLOW_MS, and the front
    end's event-loop lags over each of SLOW_MS (GetStats)."""
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        s = engine_pb2_grpc.EngineStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    return {**s.loop_seconds, "steps": float(s.steps),
            "prefill_passes": float(s.prefill_passes),
            **{f"steps_{over(ms)}": count_over(s.step_seconds_bounds, s.step_seconds_counts,
                                               ms / 1e3) for ms in SLOW_MS},
            **{f"front_end_lags_{over(ms)}": count_over(
                s.event_loop_lag_seconds_bounds, s.event_loop_lag_seconds_counts, ms / 1e3)
               for ms in SLOW_MS}}


def gateway_lags(url: str) -> dict[str, float]:
    """The gateway's event-loop lags over each of SLOW_MS since it started
    (its /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "vllm_mlx_gateway_event_loop_lag_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    total = buckets.get(float("inf"), 0.0)
    return {f"gateway_lags_{over(ms)}": total - buckets.get(ms / 1e3, total) for ms in SLOW_MS}

