"""The media worker's gRPC server: Prepare runs each item on a thread pool so
decoding never blocks the event loop that answers health checks."""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from media_worker.errors import MediaError
from media_worker.prepare import PreparedCache, prepare_item
from media_worker.processor import Preprocessor
from vllm_mlx.settings import MediaSettings
from vllm_mlx.v1 import media_pb2 as pb
from vllm_mlx.v1 import media_pb2_grpc

log = logging.getLogger("media")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MediaWorker"].full_name


class MediaService(media_pb2_grpc.MediaWorkerServicer):
    def __init__(self, settings: MediaSettings, pool: ThreadPoolExecutor):
        self.settings = settings
        self.pool = pool
        self.pre: Preprocessor | None = None
        self.cache = PreparedCache()

    async def Prepare(self, request: pb.PrepareRequest, context) -> pb.PrepareResponse:
        if self.pre is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the media worker is still loading")
        if not request.items:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no media items given")
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
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"item {i}: {error}")
            log.error("request %s item %d failed", request.request_id, i, exc_info=error)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"item {i}: internal error while preparing the media "
                                f"({type(error).__name__})")
        items = [t.result() for t in tasks]
        log.info("request %s: %d item(s) in %.3f s", request.request_id, len(items),
                 max(it.prepare_seconds for it in items))
        return pb.PrepareResponse(items=items)


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
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service = MediaService(settings, pool)
    media_pb2_grpc.add_MediaWorkerServicer_to_server(service, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()

    async def set_health(status) -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("listening on %s:%d, loading the processor of %s", settings.host, port,
             settings.model)
    try:
        service.pre = await asyncio.to_thread(Preprocessor, settings.model)
        await set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving media for %s (%s) on %s:%d", settings.model, service.pre.model_type,
                 settings.host, port)
        await server.wait_for_termination()
    finally:
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        pool.shutdown(wait=False, cancel_futures=True)
