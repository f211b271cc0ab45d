"""The engine core: a process of its own that owns the model and every MLX call.

The gRPC front end (server.py) starts it and talks to it over one pipe:
requests and aborts go in; once per decode step, that step's outputs and the
engine's stats come out. Keeping gRPC in another process means its per-request
work never holds the GIL that the decode loop needs, whatever the load; on an
H100 the split left the engine's speed where it was
(docs/benchmarks.md): it is kept for that isolation.
"""

import atexit
import logging
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection

from engine_worker.loop import Loop
from engine_worker.messages import DuplicateRequest, Output, QueueFull, Request, StepOutputs
from engine_worker.model import ModelFacts, load_model
from vllm_mlx.ipc.shared_tensors import SharedTensors, take
from vllm_mlx.settings import EngineSettings, fault_injection, freeze_startup_objects

log = logging.getLogger("engine")

# Once the front end is gone, the step in flight may finish and the failures
# be sent; then the process ends whatever else is still running.
ORPHAN_GRACE_S = 5.0


def _exit_now(code: int) -> None:
    """End the process without running atexit hooks or joining library
    threads: after its front end was killed, the core hung at exit in
    OpenBLAS's thread shutdown, ignoring SIGTERM and holding a model's worth
    of memory (4 of 5 trials). Nothing here needs the interpreter's cleanup:
    the pipe is gone and shared memory is the front end's to free."""
    logging.shutdown()
    os._exit(code)


def core_main(conn: Connection, settings: EngineSettings, facts: ModelFacts) -> None:
    # The front end stops the core through the pipe (or by closing it when it
    # dies); a Ctrl-C sent to the whole process group must not kill it mid-step.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if fault_injection():  # tests: a library exit hook that never returns, as OpenBLAS's did
        atexit.register(threading.Event().wait)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    send_lock = threading.Lock()  # the reader thread answers refusals too

    def send(message: tuple) -> None:
        # Plain pickle: Connection.send's own pickler (with its per-call
        # reducer table) took 8 of a step's 23 us on an H200 (docs/benchmarks.md).
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with send_lock:
            conn.send_bytes(data)

    last_stats = [0.0]

    def publish(outputs: StepOutputs) -> None:
        # Stats ride along at most ten times a second (and on every idle tick,
        # when there are no outputs): they are for humans and dashboards.
        now = time.monotonic()
        stats = None
        if not outputs or now - last_stats[0] > 0.1:
            last_stats[0] = now
            stats = loop.stats.SerializeToString()
        send(("outputs", *outputs.to_wire(), stats))

    def refuse(r: Request, e: Exception) -> None:
        refusal = StepOutputs()
        reason = "rejected" if isinstance(e, QueueFull) else "error"
        refusal.add(Output(r.request_id, None, reason, error=f"{type(e).__name__}: {e}"))
        send(("outputs", *refusal.to_wire(), None))

    def on_ready(error: BaseException | None) -> None:
        if error is None:
            freeze_startup_objects()
        send(("ready", None if error is None else f"{type(error).__name__}: {error}",
              loop.memory))

    loop = Loop(settings, lambda s: load_model(facts), publish, on_ready)

    def read_requests() -> None:
        try:
            while True:
                kind, item = conn.recv()
                if kind == "add":
                    try:
                        if isinstance(item.media, SharedTensors):
                            item.media = take(item.media)
                    except FileNotFoundError as e:  # cancelled before it got here
                        refuse(item, e)
                        continue
                    try:
                        loop.submit(item)
                    # The front end checks these first; ValueError: a grammar
                    # that does not compile.
                    except (QueueFull, DuplicateRequest, ValueError) as e:
                        refuse(item, e)
                elif kind == "abort":
                    loop.abort(*item)
                elif kind == "clear_prefix_cache":
                    loop.clear_prefix_cache()
                else:
                    break
        except (EOFError, OSError):
            log.warning("front end went away; exiting")
            timer = threading.Timer(ORPHAN_GRACE_S, _exit_now, args=(1,))
            timer.daemon = True
            timer.start()
        loop.stop()

    threading.Thread(target=read_requests, name="core-reader", daemon=True).start()
    code = 0
    try:
        loop.run()
    except BaseException:  # e.g. the last send, into a pipe whose reader died
        log.exception("engine core stopped")
        code = 1
    _exit_now(code)

