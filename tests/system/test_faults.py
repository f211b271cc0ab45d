"""Faults of whole processes, as an operator meets them: a process killed
with SIGKILL leaves nothing behind."""

import os
import signal
import threading

import psutil
import pytest

from vllm_mlx.supervision.supervisor import OPENBLAS_CANDIDATES
from vllm_mlx.v1 import engine_pb2 as pb

from ..conftest import start_engine, wait_until
from .processes import engine_core, gone


def openblas_env() -> dict[str, str]:
    """As vllm-mlx-up starts the engine on a Linux CPU: with OpenBLAS
    preloaded, whose thread shutdown is where an orphaned core hung."""
    found = [p for p in OPENBLAS_CANDIDATES if os.path.exists(p)]
    return {"LD_PRELOAD": found[0]} if found else {}


@pytest.mark.parametrize("model", ["tiny_model", "smollm2_folder"])
def test_a_killed_front_end_leaves_no_engine_core(model, request, tmp_path):
    """kill -9 of the engine worker while streams decode: its core (which
    ignores SIGTERM and once hung at exit in OpenBLAS) ends within seconds
    instead of holding a copy of the model forever."""
    # Fault injection: the core also gets an exit hook that never returns, as
    # a library's did in the acceptance run (its hang did not reproduce here).
    engine = start_engine(request.getfixturevalue(model), tmp_path,
                          env={**openblas_env(), "VLLM_MLX_FAULT_INJECTION": "1"})
    front = psutil.Process(engine.proc.pid)
    core = engine_core(front.pid)

    def stream() -> None:
        req = pb.GenerateRequest(text="hello", max_tokens=1500, ignore_eos=True)
        try:
            for _ in engine.stub.Generate(req, timeout=60):
                pass
        except Exception:
            pass  # the front end dies under it

    readers = [threading.Thread(target=stream, daemon=True) for _ in range(4)]
    for r in readers:
        r.start()
    assert wait_until(lambda: engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)
                      .generation_tokens_total > 50, timeout=30)
    os.kill(front.pid, signal.SIGKILL)
    engine.proc.wait(timeout=10)
    try:
        assert wait_until(lambda: gone(core), timeout=20), \
            f"the engine core (pid {core.pid}) outlived its front end"
    finally:
        if not gone(core):
            core.kill()
        engine.channel.close()
