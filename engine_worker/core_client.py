"""The engine front end's side of the pipe to the engine core process
(core.py): it starts the core, sends it requests and aborts, and routes each
decode step's outputs to the stream of the request they belong to. It also
watches that the core stays alive, and fails what is in flight if it dies.

Kept apart from the gRPC servicer so that the servicer deals in proto
messages and this in the core's own (messages.py)."""

import asyncio
import logging
import multiprocessing as mp
import pickle

from engine_worker.core import core_main
from engine_worker.memory import MemoryBudget
from engine_worker.messages import DuplicateRequest, Output, QueueFull, Request, StepOutputs
from engine_worker.model import ModelFacts
from vllm_mlx.settings import EngineSettings
from vllm_mlx.v1 import engine_pb2 as pb

log = logging.getLogger("engine")


class CoreClient:
    """The front end's side of the pipe to the engine core process."""

    def __init__(self, settings: EngineSettings, facts: ModelFacts):
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")  # never fork a process that may hold MLX or gRPC state
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=core_main, args=(child, settings, facts),
                                   name="engine-core", daemon=True)
        self.sinks: dict[str, asyncio.Queue] = {}  # request id -> its stream's queue
        self.stats = pb.Stats()  # the core's, as last sent
        self.ready: asyncio.Future = self._loop.create_future()  # -> load error or None
        self.dead: asyncio.Future = self._loop.create_future()
        self.requests_rejected = 0
        self.memory: MemoryBudget | None = None  # the core's, once ready
        self.last_heard = self._loop.time()

    def start(self) -> None:
        self.process.start()
        # The event loop reads the pipe itself whenever it is readable. A
        # reader thread would need the GIL for every message, and a busy
        # loop holds it for up to the switch interval (5 ms): the thread then
        # lagged behind a core that sends every 1-2 ms, the pipe filled, and
        # the core blocked in send (docs/benchmarks.md).
        self._loop.add_reader(self._conn.fileno(), self._read)

    def _read(self) -> None:
        self.last_heard = self._loop.time()
        try:
            while self._conn.poll():
                kind, *rest = pickle.loads(self._conn.recv_bytes())  # see core_main's send
                if kind == "ready":
                    error, self.memory = rest
                    _resolve(self.ready, error)
                else:
                    self._deliver(*rest)
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            _resolve(self.dead, "the engine core exited")

    def _deliver(self, ids: list[str], tokens: list[int], others: list[tuple[int, tuple]],
                 stats: bytes | None) -> None:
        if stats is not None:
            self.stats = pb.Stats.FromString(stats)
        for out in StepOutputs.from_wire(ids, tokens, others):
            sink = self.sinks.get(out.request_id)
            if sink is not None:
                if out.finish_reason:
                    del self.sinks[out.request_id]
                sink.put_nowait(out)

    def submit(self, request: Request, sink: asyncio.Queue) -> None:
        if request.request_id in self.sinks:
            raise DuplicateRequest(request.request_id)
        # Running plus waiting: so at most max_queue wait once the batch is full.
        s = self.settings
        if len(self.sinks) >= s.max_num_seqs + s.max_queue:
            self.requests_rejected += 1
            raise QueueFull(f"{len(self.sinks)} requests are in flight")
        self._conn.send(("add", request))
        self.sinks[request.request_id] = sink

    def abort(self, request_id: str) -> bool:
        """End a request; its stream still gets the core's "abort" finish."""
        if request_id not in self.sinks:
            return False
        self._conn.send(("abort", (request_id, False)))
        return True

    def stop_early(self, request_id: str) -> None:
        """The front end found a stop string: the request is over for its
        client now, and the core frees its slot (keeping its KV for the
        prefix cache) as soon as it hears."""
        if self.sinks.pop(request_id, None) is not None:
            self._conn.send(("abort", (request_id, True)))

    def clear_prefix_cache(self) -> None:
        # The pipe is ordered: requests sent after this never see the old KV.
        self._conn.send(("clear_prefix_cache", None))

    async def watch(self) -> None:
        """Once the core is ready, declare it dead (and kill it) when it sends
        nothing for the liveness timeout: a stopped or hung core otherwise
        left every request waiting and /health saying 200."""
        limit = self.settings.liveness_timeout_s
        while not self.dead.done():
            await asyncio.sleep(min(1.0, limit / 4))
            silent = self._loop.time() - self.last_heard
            if silent > limit:
                log.error("the engine core sent nothing for %.0f s; killing it", silent)
                self.process.kill()
                _resolve(self.dead, f"the engine core made no progress for {silent:.0f} s")

    def fail_all(self, message: str) -> None:
        for rid, sink in list(self.sinks.items()):
            sink.put_nowait(Output(rid, None, "error", error=message))
        self.sinks.clear()

    def stop(self) -> None:
        try:
            self._conn.send(("stop", None))
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
