"""The media worker's gRPC server: Prepare runs each item on a thread pool so
decoding never blocks the event loop that answers health checks. A call it
fails carries an ErrorInfo (vllm_mlx.ipc.error_info) naming the item."""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil

from media_worker.errors import MediaError
from media_worker.prepare import PreparedCache, pack, prepare_item
from media_worker.processor import Preprocessor
from vllm_mlx.ipc.error_info import abort
from vllm_mlx.ipc.grpc_server import listen
from vllm_mlx.ipc.shared_tensors import SegmentLedger, free_segments
from vllm_mlx.settings import MediaSettings, freeze_startup_objects
from vllm_mlx.v1 import errors_pb2 as epb
from vllm_mlx.v1 import media_pb2 as pb
from vllm_mlx.v1 import media_pb2_grpc

log = logging.getLogger("media")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MediaWorker"].full_name
SWEEP_INTERVAL_S = 2.0  # how often segments of dead callers are looked for


class MediaService(media_pb2_grpc.MediaWorkerServicer):
    def __init__(self, settings: MediaSettings, pool: ThreadPoolExecutor):
        self.settings = settings
        self.pool = pool
        self.pre: Preprocessor | None = None
        self.cache = PreparedCache()
        self.segments = SegmentLedger()
        self.callers: set[tuple[int, str]] = set()  # (owner_pid, peer) verified

    async def Prepare(self, request: pb.PrepareRequest, context) -> pb.PrepareResponse:
        if self.pre is None:
            await abort(context, epb.ERROR_CODE_LOADING, "the media worker is still loading")
        if not request.items:
            await abort(context, epb.ERROR_CODE_INVALID_ARGUMENT, "no media items given", "items")
        if request.shared_memory and not await self._is_caller(request.owner_pid, context.peer()):
            # The ledger frees a dead owner's segments; those of a made-up
            # owner (0, or a live process that is not the caller) would
            # never be freed.
            await abort(context, epb.ERROR_CODE_INVALID_ARGUMENT,
                        f"owner_pid {request.owner_pid} is not the calling process: "
                        f"shared-memory replies need their owner's real pid", "owner_pid")
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(self.pool, prepare_item, item, self.settings, self.pre,
                                      self.cache)
                 for item in request.items]
        # The first refusal answers the call; items still running finish in the
        # pool unobserved (their caps bound what that costs).
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [i for i, t in enumerate(tasks) if t in done and t.exception() is not None]
        if failed:
            for t in tasks:
                if t not in done:
                    t.add_done_callback(_drop_result)
            i = failed[0]
            error = tasks[i].exception()
            if isinstance(error, MediaError):
                log.info("request %s item %d refused: %s", request.request_id, i, error)
                await abort(context, epb.ERROR_CODE_MEDIA_REFUSED, str(error), "items", i)
            log.error("request %s item %d failed", request.request_id, i, exc_info=error)
            await abort(context, epb.ERROR_CODE_INTERNAL,
                        f"internal error while preparing the media ({type(error).__name__})",
                        "items", i)
        results = [t.result() for t in tasks]
        log.info("request %s: %d item(s) in %.3f s", request.request_id, len(results),
                 max(r.prepare_seconds for r in results))
        packing = loop.run_in_executor(self.pool, pack, results, request.shared_memory)
        try:
            reply = await asyncio.shield(packing)
        except asyncio.CancelledError:
            # The caller gave up: nobody will unlink the segments of this reply.
            packing.add_done_callback(_free_reply)
            raise
        self.segments.record(request.owner_pid, reply)
        return reply

    async def _is_caller(self, pid: int, peer: str) -> bool:
        """Whether process `pid` holds the caller's end of this connection
        (once per connection; a gRPC channel keeps its connection)."""
        if (pid, peer) in self.callers:
            return True
        if not pid or not await asyncio.to_thread(holds_socket, pid, peer):
            return False
        if len(self.callers) > 4096:
            self.callers.clear()
        self.callers.add((pid, peer))
        return True

    async def sweep_segments(self) -> None:
        """Forever: free the segments of callers that died holding them."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            freed = await asyncio.to_thread(self.segments.sweep)
            if freed:
                log.warning("freed %d shared-memory segment(s) of callers that exited "
                            "without freeing them", freed)


def holds_socket(pid: int, peer: str) -> bool:
    """Whether process `pid` has a TCP socket bound to `peer` (gRPC's
    "ipv4:127.0.0.1:54321" / "ipv6:[::1]:54321"), i.e. is the caller."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return False
    return any(c.laddr and c.laddr.port == int(port)
               and c.laddr.ip in (host, f"::ffff:{host}") for c in sockets)


def _free_reply(packing: asyncio.Future) -> None:
    if not packing.cancelled() and packing.exception() is None:
        free_segments(packing.result())


def _drop_result(task: asyncio.Future) -> None:
    task.exception()  # retrieved, so asyncio does not log it as never retrieved


def message_limit(settings: MediaSettings) -> int:
    """Largest request accepted: a few items at the byte cap, base64-encoded."""
    return max(64 * 1024 * 1024, 3 * settings.max_media_bytes)


async def serve(settings: MediaSettings) -> None:
    """Listen at once (health NOT_SERVING), load the processor, then SERVING."""
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                              thread_name_prefix="prepare")
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", message_limit(settings)),
        # Prepared tensors of a 1080p image are ~13 MB; the engine's client
        # must accept them too (grpc.max_receive_message_length = -1).
        ("grpc.max_send_message_length", -1),
    ])
    service = MediaService(settings, pool)
    media_pb2_grpc.add_MediaWorkerServicer_to_server(service, server)
    listening = await listen(server, SERVICE_NAME, settings.host, settings.port)
    port = listening.port
    log.info("listening on %s:%d, loading the processor of %s", settings.host, port,
             settings.model)
    sweeper = asyncio.create_task(service.sweep_segments())
    try:
        service.pre = await asyncio.to_thread(Preprocessor, settings.model)
        freeze_startup_objects()
        await listening.set_serving(True)
        log.info("serving media for %s (%s) on %s:%d", settings.model, service.pre.model_type,
                 settings.host, port)
        await server.wait_for_termination()
    finally:
        sweeper.cancel()
        await listening.stop(grace=2)
        pool.shutdown(wait=False, cancel_futures=True)
