"""Server-Sent Events: the response class, one event per object (escaped so
that line-splitting clients read it whole), a fast path for text-only
chunks, and watching for a client that leaves."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from typing import TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from gateway.errors import ClientClosed

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client goes away first: then `work` is
    cancelled (and with it its engine calls) and ClientClosed raised.
    uvicorn does not cancel a handler whose client left, so this does."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
    if task.cancelled():
        raise ClientClosed("the client closed the connection")
    return task.result()


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **headers})

    async def __call__(self, scope, receive, send) -> None:
        # Starlette only listens for a disconnect on ASGI spec < 2.4 and
        # otherwise notices it at the next write; a request that waits in
        # the engine's queue writes nothing for a long time. Always listen,
        # so a departed client's stream is cancelled at once.
        async with anyio.create_task_group() as tg:
            async def run_then_stop(func) -> None:
                await func()
                tg.cancel_scope.cancel()

            tg.start_soon(run_then_stop, partial(self.stream_response, send))
            await run_then_stop(partial(self.listen_for_disconnect, receive))


# JSON leaves these characters unescaped, but str.splitlines ends a line at
# each, and so do clients that read SSE with it (httpx's iter_lines): a token
# holding one split its event in two, and the client read garbage.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                (b"\xe2\x80\xa9", b"\\u2029"))


def one_line(data: bytes) -> bytes:
    """JSON bytes with the line breaks that splitlines sees escaped."""
    for raw, escaped in _LINE_BREAKS:
        data = data.replace(raw, escaped)
    return data


def sse(obj: BaseModel) -> bytes:
    return b"data: " + one_line(obj.model_dump_json().encode()) + b"\n\n"


TEXT_HOLE = "\x00vllm-mlx-text\x00"


class TextChunk:
    """The SSE event of a chunk that carries only new text, made once per
    choice from the pydantic model (still the one schema) with a hole where
    the text goes: filling it costs a string join instead of building and
    serializing two models per message, the bulk of the gateway's work per
    token."""

    def __init__(self, chunk: BaseModel):
        self._before, self._after = sse(chunk).split(json.dumps(TEXT_HOLE).encode())

    def __call__(self, text: str) -> bytes:
        return self._before + one_line(json.dumps(text, ensure_ascii=False).encode()) \
            + self._after
