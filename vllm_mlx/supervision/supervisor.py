"""`vllm-mlx-up`: start the engine worker and the gateways (and with --chat the
browser chat UI), watch them, restart what dies, and stop them all on Ctrl-C
or SIGTERM.

Children get a lifeline (vllm_mlx.supervision.lifeline), so none outlives the supervisor
even when it is killed with SIGKILL. Each child's log lines are prefixed with
its name.
"""

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mlx.engine_args import add_engine_arguments, engine_worker_argv
from vllm_mlx.flags import HelpFormatter
from vllm_mlx.media_args import add_media_arguments, check_media_arguments, media_worker_argv
from vllm_mlx.settings import API_KEY_ENV, DEFAULT_HOST, LIVENESS_PROBE_S, ChatSettings
from vllm_mlx.supervision import lifeline
from vllm_mlx.supervision.health import answers, wait_for_serving

DEFAULT_PORT = 8000
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0
# A child that stayed up this long is healthy again: its backoff resets.
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 20.0
# A child that has not answered once since it started (importing, listening)
# gets at least this long before the liveness timeout applies.
STARTUP_GRACE_S = 120.0
OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
]


def say(message: str) -> None:
    print(f"[vllm-mlx-up] {message}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""  # where a gRPC child listens
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    health_url: str = ""  # where an HTTP child answers (the gateway)
    answered_at: float | None = None  # its last health answer since it started
    probing: bool = False

    def start(self, lifeline_fd: int) -> None:
        self.answered_at = None
        env = {**os.environ, **self.env, lifeline.ENV: str(lifeline_fd),
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, env=env, pass_fds=(lifeline_fd,),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        say(f"started {self.name} (pid {self.proc.pid})")
        threading.Thread(target=self._relay, args=(self.proc,), daemon=True).start()

    def _relay(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stdout.write(f"[{self.name}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def probe(self) -> None:
        """Note when the child answers its health check (in a thread of its
        own: a stopped child makes the check wait out its deadline)."""
        self.probing = True
        try:
            target = self.health_url or self.address
            if answers(target, timeout=2.0):
                self.answered_at = time.monotonic()
        finally:
            self.probing = False

    def hung_for(self, now: float, timeout: float) -> float | None:
        """Seconds it has gone without answering, once that passes `timeout`."""
        if self.answered_at is None:
            silent, timeout = now - self.started_at, max(timeout, STARTUP_GRACE_S)
        else:
            silent = now - self.answered_at
        return silent if silent > timeout else None


def fast_cpu_env() -> tuple[dict[str, str], str]:
    """The engine's fastest measured configuration on this machine, and what it is.

    On Linux CPUs MLX's wheel uses a reference BLAS; OpenBLAS, where installed,
    is several times faster (docs/benchmarks.md)."""
    if platform.system() != "Linux":
        return {}, "default MLX build"
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        return {}, "MLX GPU backend"
    for lib in OPENBLAS_CANDIDATES:
        if Path(lib).exists():
            preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
            return {"LD_PRELOAD": preload}, f"CPU with OpenBLAS preloaded ({lib}), float32 weights"
    return {}, ("CPU with MLX's reference BLAS, float32 weights (install libopenblas0-pthread "
                "for several times the speed)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-mlx-up", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", help="model folder, Hugging Face repo id or .gguf file "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--host", default=DEFAULT_HOST, help="HTTP address")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port")
    ap.add_argument("--gateway-workers", type=int, default=1,
                    help="gateway processes sharing the port")
    ap.add_argument("--media-workers", type=int,
                    help="media worker processes (default: 2 for a vision-language model, "
                         "else 0)")
    ap.add_argument("--mllm", action="store_true",
                    help="serve the model as vision-language (detected from its config "
                         "otherwise)")
    # Not shown in --help: its default may be a secret from the environment.
    ap.add_argument("--api-key", default=argparse.SUPPRESS,
                    help="require this key on every route but /health (or set "
                         f"{API_KEY_ENV})")
    ap.add_argument("--served-model-name", help="the model's name in the API")
    ap.add_argument("--engine-port", type=int, help="engine gRPC port (default: a free one)")
    ap.add_argument("--ready-timeout", type=float, default=1800.0,
                    help="seconds to wait for the model to load")
    ap.add_argument("--chat", action="store_true",
                    help="also serve the browser chat UI (vllm-mlx-chat) on --host, supervised "
                         "like the other processes")
    ap.add_argument("--chat-port", type=int, default=ChatSettings.port,
                    help="the chat UI's port, with --chat")
    add_engine_arguments(ap)
    add_media_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    a = ap.parse_args(argv)
    a.api_key = getattr(a, "api_key", None) or os.environ.get(API_KEY_ENV)
    check_media_arguments(ap, a)
    if a.media_workers is not None and a.media_workers < 0:
        ap.error("--media-workers must be at least 0")
    if a.gateway_workers < 1:
        ap.error("--gateway-workers must be at least 1")
    return a


class Supervisor:
    def __init__(self, args: argparse.Namespace, model_path: Path, served_name: str):
        self.args = args
        self.lifeline_read, self._lifeline_write = lifeline.make()
        self.engine_address = f"127.0.0.1:{args.engine_port or free_port()}"
        env, self.engine_config = fast_cpu_env()
        py = sys.executable
        from vllm_mlx.model_files.model_source import is_vision_model

        vision = args.mllm or is_vision_model(model_path)
        n_media = args.media_workers if args.media_workers is not None else 2 * vision
        self.media = []
        for k in range(n_media):
            address = f"127.0.0.1:{free_port()}"
            self.media.append(Child(f"media-{k}", [
                py, "-m", "media_worker", "--model", str(model_path), "--host", "127.0.0.1",
                "--port", address.rsplit(":", 1)[1], *media_worker_argv(args)],
                address=address))
        engine = [py, "-m", "engine_worker", "--model", str(model_path),
                  "--served-model-name", served_name, "--host", "127.0.0.1",
                  "--port", self.engine_address.rsplit(":", 1)[1], *engine_worker_argv(args)]
        if args.mllm:
            engine += ["--mllm"]
        for m in self.media:
            engine += ["--media-worker", m.address]
        gateway = [py, "-m", "gateway", "--engine", self.engine_address, "--host", args.host,
                   "--port", str(args.port), "--workers", str(args.gateway_workers)]
        gateway_env = {API_KEY_ENV: args.api_key} if args.api_key else {}
        self.engine = Child("engine", engine, env, address=self.engine_address)
        self.gateway = Child("gateway", gateway, gateway_env, health_url=f"{self.url()}/health")
        self.chat = []
        if args.chat:
            chat = [py, "-m", "vllm_mlx.chat", "--server-url", self.url(), "--host", args.host,
                    "--port", str(args.chat_port)]
            # Any HTTP answer counts as alive; this one is small.
            self.chat.append(Child("chat", chat, gateway_env,
                                   health_url=f"{self.url(args.chat_port)}/gradio_api/app_id"))
        self.children = [*self.media, self.engine, self.gateway, *self.chat]
        self.stopping = threading.Event()

    def url(self, port: int | None = None) -> str:
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "") else self.args.host
        return f"http://{host}:{port or self.args.port}"

    def start(self) -> None:
        say(f"engine configuration: {self.engine_config}")
        from vllm_mlx.optimizations import detect_hardware

        say(f"hardware: {detect_hardware().summary()}")
        # Media workers load only a processor: they start first and are
        # ready long before the engine has loaded its weights.
        for m in self.media:
            m.start(self.lifeline_read)
        self.engine.start(self.lifeline_read)
        self._wait_engine()
        self.gateway.start(self.lifeline_read)
        self._wait_http(self.gateway, f"{self.url()}/health")
        for chat in self.chat:  # after the gateway: it asks what the model takes in
            chat.start(self.lifeline_read)
            self._wait_http(chat, chat.health_url, timeout=120)
            say(f"chat UI: {self.url(self.args.chat_port)}")

    def _wait_engine(self) -> None:
        tic = time.monotonic()
        done = threading.Event()

        def progress() -> None:
            while not done.wait(5):
                say(f"loading the model... {time.monotonic() - tic:.0f}s")

        threading.Thread(target=progress, daemon=True).start()
        try:
            wait_for_serving(self.engine_address, self.args.ready_timeout,
                             is_alive=self.engine.alive)
        finally:
            done.set()
        say(f"engine serving after {time.monotonic() - tic:.1f}s")
        self.engine.answered_at = time.monotonic()
        for m in self.media:
            wait_for_serving(m.address, 60, is_alive=m.alive)
            m.answered_at = time.monotonic()
        if self.media:
            say(f"{len(self.media)} media workers serving")

    def _wait_http(self, child: Child, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"the {child.name} exited while starting")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        child.answered_at = time.monotonic()
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the {child.name} did not become healthy")

    def watch(self) -> None:
        """Restart children that die, or hang (no health answer for the
        liveness timeout: killed first), with exponential backoff, until
        stopped."""
        last_probe = 0.0
        for child in self.children:  # start() saw each of them healthy
            child.answered_at = time.monotonic()
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            probe = now - last_probe >= LIVENESS_PROBE_S
            last_probe = now if probe else last_probe
            for child in self.children:
                if child.alive():
                    if now - child.started_at > STABLE_AFTER_S:
                        child.backoff_s = BACKOFF_START_S
                    silent = child.hung_for(now, self.args.liveness_timeout)
                    if silent is None:
                        if probe and not child.probing:
                            threading.Thread(target=child.probe, daemon=True).start()
                        continue
                    say(f"{child.name} answered no health check for {silent:.0f}s; killing it")
                    child.proc.kill()
                    child.proc.wait()
                if child.restart_at is None:
                    code = child.proc.returncode if child.proc else None
                    say(f"{child.name} exited ({code}); restarting in {child.backoff_s:.0f}s")
                    child.restart_at = now + child.backoff_s
                    child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
                elif now >= child.restart_at:
                    child.restart_at = None
                    child.start(self.lifeline_read)

    def stop(self) -> None:
        """Gateways first, so no new request arrives and in-flight streams finish;
        then the engine; SIGKILL for whatever outlives the grace period."""
        self.stopping.set()
        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C or SIGTERM must not cut the shutdown short and
            # leave children stopping on their own.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: say("already stopping"))
        for child in (*self.chat, self.gateway, self.engine, *self.media):
            if child.alive():
                say(f"stopping {child.name}")
                child.proc.terminate()
                try:
                    child.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    say(f"{child.name} did not stop in {STOP_GRACE_S:.0f}s; killing it")
                    child.proc.kill()
                    child.proc.wait()
        say("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from vllm_mlx.model_files.model_source import ModelNotFound, resolve_for_serving

    try:
        say(f"resolving model {args.model or '(embedded default: SmolLM2-135M-Instruct)'}")
        path = resolve_for_serving(args.model, args.mllm)
    except ModelNotFound as e:
        say(f"error: {e}")
        sys.exit(2)
    name = args.served_model_name or (Path(args.model).name if args.model else
                                      "SmolLM2-135M-Instruct")
    sup = Supervisor(args, path, name)

    def on_signal(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        sup.start()
        say(f"ready: {sup.url()}/v1 serving {name}")
        # The key itself stays out of logs.
        key = " -H 'Authorization: Bearer <your API key>'" if args.api_key else ""
        say(f"try: curl {sup.url()}/v1/chat/completions -H 'Content-Type: application/json'"
            f"{key} -d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"What is the capital of France?\"}}], \"temperature\": 0}}'")
        sup.watch()
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:
        say(f"error: {e}")
        sup.stop()
        sys.exit(1)
    sup.stop()


if __name__ == "__main__":
    main()
