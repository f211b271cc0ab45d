"""The engine front end's side of the media workers: one Prepare call per
request (all its items, in prompt order), a retry on another worker when one
is down or hangs, and a memory-bounded LRU of prepared media so that a
conversation that resends an image (a data: URL) is neither sent to a worker
nor decoded again. http(s) URLs and paths go to a worker every time: what
they point at can change.

The tensors never pass through this process: each item arrives as a
shared-memory segment that the media worker wrote (vllm_mlx.ipc.shared_tensors)
and that this process then owns, counting its users (the requests in flight
that carry it, and the cache) and unlinking it when the last one lets go.
"""

import asyncio
import hashlib
import itertools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vllm_mlx.ipc.error_info import error_info
from vllm_mlx.ipc.shared_tensors import Layout, exists, free_segments, unlink
from vllm_mlx.v1 import errors_pb2 as epb
from vllm_mlx.v1 import media_pb2 as mpb
from vllm_mlx.v1 import media_pb2_grpc

log = logging.getLogger("engine")

DEFAULT_CACHE_BYTES = 512 << 20
# Used when the client set no deadline of its own.
DEFAULT_PREPARE_TIMEOUT_S = 120.0
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A worker's health service answers from its event loop while its threads
# decode, so a long Prepare is told from a hung worker (stopped, deadlocked,
# swapped out) by asking it: every HEALTH_INTERVAL_S during a call, and a
# call whose worker misses HEALTH_MISSES answers in a row (each waited for up
# to HEALTH_TIMEOUT_S) moves to another worker. Without this a hung worker
# held each request sent to it for half the engine call's deadline (minutes).
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 2.0
HEALTH_MISSES = 2
# A worker that failed a call is tried last for this long, so the requests
# after it do not each wait to find it out again.
COOLDOWN_S = 10.0


class MediaRefused(ValueError):
    """A worker refused item `index` of the request (-1: no one item, e.g. the
    call itself); the message is its reason."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index = index
        self.reason = reason


class MediaUnavailable(RuntimeError):
    """No media worker could prepare the request in time."""


class _WorkerHung(Exception):
    """The worker stopped answering health checks during a call."""


@dataclass(eq=False)
class PreparedItem:
    """One prepared image or video: its tensors' segment and layout, the token
    the chat template renders for it (0: none), the tokens that replace it,
    and the media worker's hash of its content and preparation."""
    segment: str
    layout: Layout
    nbytes: int
    placeholder_token_id: int
    token_ids: list[int]
    frames: int
    content_hash: str = ""
    users: int = 0

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            unlink(self.segment)


def from_proto(pm: mpb.PreparedMedia) -> PreparedItem:
    if not pm.shm_name or not exists(pm.shm_name):
        raise MediaUnavailable("a media worker replied without shared memory this machine "
                               "can see: media workers must run on the engine's machine")
    layout = [(t.name, np.dtype(t.dtype).str, tuple(t.shape), t.offset) for t in pm.tensors]
    nbytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                 for _, dtype, shape, _ in layout)
    return PreparedItem(pm.shm_name, layout, nbytes, pm.placeholder_token_id,
                        list(pm.token_ids), pm.frames, pm.content_hash)


def cache_key(source: mpb.MediaSource) -> str | None:
    """Content key of a source whose text fixes its content (a data: URL),
    with the options that shape its tensors; None for the others."""
    if source.WhichOneof("source") != "url" or not source.url.startswith("data:"):
        return None
    h = hashlib.sha256(source.url.encode())
    h.update(f"|{source.kind}|{source.fps}|{source.max_frames}".encode())
    return h.hexdigest()


class PreparedCache:
    """LRU of prepared items by content key, bounded by their tensors' bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self._items: OrderedDict[str, PreparedItem] = OrderedDict()

    def get(self, key: str | None) -> PreparedItem | None:
        item = self._items.get(key) if key else None
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return item

    def put(self, key: str | None, item: PreparedItem) -> None:
        if not key or key in self._items or item.nbytes > self.max_bytes:
            return
        item.acquire()
        self._items[key] = item
        self.nbytes += item.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            old.release()

    def clear(self) -> None:
        """Let go of every entry (their segments go once no request holds them)."""
        items, self._items, self.nbytes = list(self._items.values()), OrderedDict(), 0
        release(items)


class MediaClient:
    def __init__(self, addresses: tuple[str, ...], cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.addresses = addresses
        # Prepared tensors of a 1080p image are ~13 MB: no receive limit.
        self._channels = [grpc.aio.insecure_channel(
            a, options=[("grpc.max_receive_message_length", -1),
                        ("grpc.max_send_message_length", -1)]) for a in addresses]
        self._stubs = [media_pb2_grpc.MediaWorkerStub(c) for c in self._channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._next = itertools.count()
        # loop.time() until which worker k is tried last (it just failed a call).
        self._cooldown = [0.0] * len(addresses)
        self.cache = PreparedCache(cache_bytes)

    async def prepare(self, request_id: str, sources: list[mpb.MediaSource],
                      timeout: float | None) -> list[PreparedItem]:
        """Each source prepared, in order: from the cache, or from one Prepare
        call for all the others. Each item comes acquired for the caller,
        who must `release` it once the core has read it."""
        if not self._stubs:
            raise MediaUnavailable("the engine was started without media workers "
                                   "(--media-worker HOST:PORT)")
        # A data: URL is megabytes; hashlib lets go of the GIL while it hashes,
        # so on a thread this leaves the event loop to forward other streams'
        # tokens.
        keys = await asyncio.to_thread(lambda: [cache_key(s) for s in sources])
        items: list[PreparedItem | None] = [self.cache.get(k) for k in keys]
        for it in items:
            if it is not None:
                it.acquire()
        missing = [i for i, it in enumerate(items) if it is None]
        try:
            if missing:
                response = await self._call(request_id, [sources[i] for i in missing],
                                            timeout, missing)
                try:
                    fresh = [from_proto(pm) for pm in response.items]
                except BaseException:
                    free_segments(response)
                    raise
                for it in fresh:
                    it.acquire()
                if len(fresh) != len(missing):
                    release(fresh)
                    raise MediaUnavailable(f"a media worker answered {len(fresh)} items "
                                           f"for {len(missing)}")
                for i, it in zip(missing, fresh):
                    items[i] = it
                    self.cache.put(keys[i], it)
        except BaseException:
            release([it for it in items if it is not None])
            raise
        return items

    def _order(self, now: float) -> list[int]:
        """Workers to try, at most two: round robin, the ones that failed a
        call lately last."""
        n = len(self._stubs)
        first = next(self._next) % n
        ring = [(first + i) % n for i in range(n)]
        ring.sort(key=lambda k: self._cooldown[k] > now)  # stable: keeps the rotation
        return ring[:2]

    async def _call(self, request_id: str, sources: list[mpb.MediaSource],
                    timeout: float | None, indices: list[int]) -> mpb.PrepareResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or DEFAULT_PREPARE_TIMEOUT_S)
        attempts = self._order(loop.time())
        request = mpb.PrepareRequest(request_id=request_id, items=sources, shared_memory=True,
                                     owner_pid=os.getpid())
        for n, k in enumerate(attempts):
            left = deadline - loop.time()
            # With a second worker to try, the first gets half the time left
            # (the health watch usually moves on long before).
            budget = left / 2 if n + 1 < len(attempts) else left
            try:
                return await self._watched(k, request, max(budget, 0.001))
            except _WorkerHung as e:
                self._cooldown[k] = loop.time() + COOLDOWN_S
                if n + 1 < len(attempts):
                    log.warning("media worker %s: %s; retrying on %s", self.addresses[k], e,
                                self.addresses[attempts[n + 1]])
                    continue
                raise MediaUnavailable(f"the media worker at {self.addresses[k]} {e}") from None
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _refusal(e, indices) from None
                if e.code() in RETRY_CODES:
                    self._cooldown[k] = loop.time() + COOLDOWN_S
                if e.code() in RETRY_CODES and n + 1 < len(attempts):
                    log.warning("media worker %s: %s; retrying on %s", self.addresses[k],
                                e.code().name, self.addresses[attempts[n + 1]])
                    continue
                raise MediaUnavailable(f"the media worker at {self.addresses[k]} failed: "
                                       f"{e.code().name}: {e.details()}") from None
        raise MediaUnavailable("no media worker answered")  # not reached

    async def _watched(self, k: int, request: mpb.PrepareRequest,
                       timeout: float) -> mpb.PrepareResponse:
        """Prepare on worker k, given up (_WorkerHung) when the worker stops
        answering its health checks meanwhile."""
        call = self._stubs[k].Prepare(request, timeout=timeout)

        async def result() -> mpb.PrepareResponse:
            return await call

        prepare = asyncio.ensure_future(result())
        watch = asyncio.ensure_future(self._watch(k))
        try:
            await asyncio.wait((prepare, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancel()
            prepare.cancel()
            raise
        finally:
            watch.cancel()
        if prepare.done():
            return prepare.result()
        call.cancel()
        prepare.cancel()
        raise _WorkerHung(watch.result())

    async def _watch(self, k: int) -> str:
        """Returns (why) once worker k misses HEALTH_MISSES health checks in a
        row; runs until cancelled while it answers."""
        misses = 0
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                reply = await self._health[k].Check(health_pb2.HealthCheckRequest(),
                                                    timeout=HEALTH_TIMEOUT_S)
                ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                why = f"reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.aio.AioRpcError as e:
                ok, why = False, f"health check {e.code().name}"
            misses = 0 if ok else misses + 1
            if misses >= HEALTH_MISSES:
                return f"stopped answering its health checks ({why}, {misses} in a row)"

    async def close(self) -> None:
        self.cache.clear()
        for channel in self._channels:
            await channel.close()


def release(items: list[PreparedItem]) -> None:
    for it in items:
        it.release()


def _refusal(e: grpc.aio.AioRpcError, indices: list[int]) -> MediaRefused:
    """The worker's refusal, its item (counting the items sent) turned into
    the request's item index; -1 when it names no item."""
    info = error_info(e)
    index = -1
    if (info is not None and info.code == epb.ERROR_CODE_MEDIA_REFUSED
            and info.HasField("item") and info.item < len(indices)):
        index = indices[info.item]
    return MediaRefused(index, e.details() or "")
