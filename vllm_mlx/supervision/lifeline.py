"""Children of `vllm-mlx-up` end when it ends, however it ends.

The supervisor keeps the write end of one pipe and hands the read end to every
child. Nothing is ever written; when the supervisor exits, even by SIGKILL,
the kernel closes its end and each child's read returns EOF. This works on
macOS and Linux alike (PR_SET_PDEATHSIG is Linux-only).
"""

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable

ENV = "VLLM_MLX_LIFELINE_FD"
GRACE_S = 15.0


def make() -> tuple[int, int]:
    """A (read, write) pair: pass `read` to children, keep `write` open."""
    read, write = os.pipe()
    os.set_inheritable(read, True)
    return read, write


def watch() -> None:
    """In a child: stop this process gracefully (SIGTERM to itself), then for
    good after a grace period, once the supervisor is gone."""
    fd = os.environ.get(ENV)
    if not fd:
        return
    fd = int(fd)
    # Grandchildren (uvicorn's workers, the engine core) watch their own parent.
    os.environ.pop(ENV, None)

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(GRACE_S)
        os._exit(1)

    threading.Thread(target=wait, name="lifeline", daemon=True).start()


def run_until_signal(serve: Callable[[], Awaitable[None]], log_name: str) -> None:
    """Run a worker's asyncio server until SIGTERM or SIGINT cancels it: the
    shared `main` loop of the gRPC workers (engine, media)."""

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve()
        except asyncio.CancelledError:
            logging.getLogger(log_name).info("stopped by signal")

    asyncio.run(run())
