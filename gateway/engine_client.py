"""The gateway's only way to the engine: the generated grpc.aio client, with a
deadline on every call and engine failures turned into `APIError`s (by the
ErrorInfo the engine attaches: gateway/errors.py's from_grpc)."""

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import (
    APIError,
    EngineUnavailable,
    InvalidRequest,
    RateLimited,
    from_grpc,
)
from vllm_mlx.settings import MAX_GRPC_MESSAGE_BYTES, UNARY_DEADLINE_S
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import engine_pb2_grpc

log = logging.getLogger("gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
# The engine is declared down after this many health checks in a row fail,
# one a second (a busy engine still answers within the check's deadline).
DOWN_AFTER_FAILED_CHECKS = 3

CHANNEL_OPTIONS = [
    # gRPC backs off up to two minutes between reconnects by default; a
    # restarted engine must be found again within about a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Long prompts as token ids and data: URLs exceed the default 4 MiB.
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
]


class Generation:
    """One Generate stream. `first()` waits for its first message, so that a
    refusal (bad input, full queue) is known before any HTTP header is sent;
    iterating yields the rest. `cancel()` aborts it in the engine."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, prompt_field: str,
                 logprobs_field: str):
        self._call = call
        self._fields = (prompt_field, logprobs_field)
        self._first: pb.GenerateResponse | None = None
        self._finished = False
        self._failure: APIError | None = None

    async def _read(self) -> pb.GenerateResponse | None:
        try:
            msg = await self._call.read()
        except grpc.RpcError as e:
            raise from_grpc(e, *self._fields) from None
        except asyncio.CancelledError:
            if self._failure is not None:  # see fail(); not our task's own cancel
                raise self._failure from None
            raise
        if msg is grpc.aio.EOF:
            # The engine always ends with a finished message; a stream that
            # stops early means the engine went away mid-request.
            raise EngineUnavailable("the engine closed the stream before the request finished")
        self._finished = msg.finished
        return msg

    async def first(self) -> pb.GenerateResponse:
        if self._first is None:
            self._first = await self._read()
        return self._first

    async def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        msg = await self.first()
        while True:
            yield msg
            if msg.finished:
                return
            msg = await self._read()

    def fail(self, error: APIError) -> None:
        """End the stream with `error` (the engine is known down)."""
        if not self._finished:
            self._failure = error
            self._call.cancel()

    def cancel(self) -> None:
        # Cancelling the call ends the engine-side handler, whose `finally`
        # aborts the request: its slot in the batch is freed within a step.
        # A finished stream needs none, and cancelling one is not free.
        if not self._finished:
            self._call.cancel()


class EngineClient:
    def __init__(self, address: str, request_timeout_s: float, health_timeout_s: float):
        self.address = address
        self.request_timeout_s = request_timeout_s
        self.health_timeout_s = health_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: engine_pb2_grpc.EngineStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        self._info: pb.ModelInfo | None = None
        self._info_lock = asyncio.Lock()
        # Why the engine is known down (None: it answers); see _watch.
        self.down: str | None = None
        self._streams: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        # grpc.aio channels belong to the event loop that creates them.
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._stub = engine_pb2_grpc.EngineStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Check the engine every second. Once it fails DOWN_AFTER_FAILED_CHECKS
        checks in a row, new requests get a 503 at once and the streams in
        flight end with one, instead of waiting out the request deadline on
        an engine that stopped answering; its supervisor replaces it."""
        failed = 0
        while True:
            reason = await self.health()
            failed = failed + 1 if reason else 0
            if failed >= DOWN_AFTER_FAILED_CHECKS and self.down is None:
                log.error("the engine is down: %s", reason)
                self.down = reason
                for stream in list(self._streams):
                    stream.fail(EngineUnavailable(reason))
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._channel is not None:
            await self._channel.close(grace=None)

    def generate(self, request: pb.GenerateRequest, prompt_field: str = "prompt",
                 logprobs_field: str = "logprobs") -> Generation:
        if self.down is not None:
            raise EngineUnavailable(self.down)
        call = self._stub.Generate(request, timeout=self.request_timeout_s)
        stream = Generation(call, prompt_field, logprobs_field)
        self._streams.add(stream)
        return stream

    async def model_info(self) -> pb.ModelInfo:
        """The engine's model, asked once: it does not change while the
        engine runs, and an engine restarted by the supervisor serves the
        same model. Forgotten when the engine is unreachable."""
        if self._info is not None:
            return self._info
        async with self._info_lock:
            if self._info is None:
                self._info = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())
        return self._info

    async def stats(self) -> pb.Stats:
        return await self._unary(self._stub.GetStats, pb.GetStatsRequest())

    async def admit(self, choices: int) -> None:
        """Refuse a request of several choices up front unless all of them fit
        the engine's capacity (running + waiting) now: admitted one by one,
        three requests of n=128 ran for minutes before a late choice was
        refused and their work thrown away, and requests behind them waited."""
        info = await self.model_info()
        capacity = info.max_num_seqs + info.max_queue
        if choices > capacity:
            raise InvalidRequest(f"the request asks for {choices} choices; the engine runs and "
                                 f"queues at most {capacity} at once", param="n")
        in_flight = (await self.stats()).in_flight
        if in_flight + choices > capacity:
            raise RateLimited(f"the engine has room for {capacity - in_flight} more requests, "
                              f"not {choices}; retry later")

    async def clear_prefix_cache(self) -> None:
        await self._unary(self._stub.ClearPrefixCache, pb.ClearPrefixCacheRequest())

    async def abort(self, request_id: str) -> bool:
        reply = await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))
        return reply.found

    async def health(self) -> str | None:
        """None when the engine is serving, else why not."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=self.health_timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._info = None  # a restarted engine may serve another model
            return f"the engine at {self.address} is unreachable ({e.code().name})"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"the engine at {self.address} is not serving yet (loading or stopping)"
        if self.down is not None:
            log.info("the engine serves again")
            self.down = None
        return None

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=UNARY_DEADLINE_S)
        except grpc.RpcError as e:
            error: APIError = from_grpc(e)
            if isinstance(error, EngineUnavailable):
                self._info = None
            raise error from None
