"""The client side of one streamed chat completion, timed chunk by chunk,
and a closed loop of them: what `vllm-mlx-bench serve` measures with."""

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

CHAT_PATH = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


@dataclass
class Outcome:
    error: str | None = None
    status: int | None = None   # HTTP status; None when no response came
    ttft: float | None = None
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0              # events with content
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    text: str = ""               # the content streamed

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


def _has_content(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") \
                or delta.get("tool_calls"):
            return True
    return False


def error_text(body: bytes | str | dict) -> str:
    """The message of an OpenAI-style error body, else the body itself."""
    if isinstance(body, (bytes, str)):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        try:
            body = json.loads(text)
        except ValueError:
            return text.strip()[:300]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict) and "message" in err:
            err = err["message"] + (f" (param {err['param']})" if err.get("param") else "")
        return str(err)[:300]
    return str(body)[:300]


class _Stream:
    """Reads one SSE response: timestamps content as it arrives. Lines are
    split on b"\\n" alone: str.splitlines (httpx's aiter_lines) also splits on
    U+2028 and friends, which some servers leave raw inside JSON strings."""

    def __init__(self, out: Outcome, start: float):
        self.out, self.start = out, start
        self.buf = b""
        self.data: list[bytes] = []
        self.last: float | None = None

    def feed(self, piece: bytes, now: float) -> None:
        self.buf += piece
        *lines, self.buf = self.buf.split(b"\n")
        content = False
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                content |= self.event()
            elif line.startswith(b"data:"):
                value = line[5:]
                self.data.append(value[1:] if value.startswith(b" ") else value)
        if content:
            if self.out.ttft is None:
                self.out.ttft = now - self.start
            else:
                self.out.gaps.append(now - self.last)
            self.last = now

    def event(self) -> bool:
        """Handles the event gathered so far; True when it carried content."""
        if not self.data:
            return False
        data, self.data = b"\n".join(self.data), []
        if data.strip() == b"[DONE]" or self.out.error:
            return False
        obj = json.loads(data)
        if not isinstance(obj, dict):
            return False
        if "error" in obj and not obj.get("choices"):
            self.out.error = f"in stream: {error_text(obj)}"
            return False
        usage = obj.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.out.usage_tokens = int(usage["completion_tokens"])
            self.out.prompt_tokens = usage.get("prompt_tokens")
        if _has_content(obj):
            self.out.chunks += 1
            self.out.text += "".join((c.get("delta") or {}).get("content") or ""
                                     for c in obj.get("choices") or ())
            return True
        return False


async def stream_chat(client: httpx.AsyncClient, body: bytes) -> Outcome:
    """Sends one streaming chat completion and reads it to its end. Any
    failure (a refusal, a dropped connection, an error event) comes back as
    the outcome's error, never raised."""
    out = Outcome()
    start = time.perf_counter()
    try:
        async with client.stream("POST", CHAT_PATH, content=body, headers=JSON) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {error_text(await r.aread())}"
                return out
            if not r.headers.get("content-type", "").lower().startswith("text/event-stream"):
                # A server that ignored "stream": nothing to time token by token.
                out.error = f"not an event stream: {(await r.aread())[:200]!r}"
                return out
            reader = _Stream(out, start)
            async for piece in r.aiter_bytes():
                reader.feed(piece, time.perf_counter())
            reader.feed(b"\n\n", time.perf_counter())  # a last event left unterminated
    except (httpx.HTTPError, OSError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}" if str(e) else repr(e)
    out.e2e = time.perf_counter() - start
    return out


async def closed_loop(client: httpx.AsyncClient, bodies: Sequence[bytes], concurrency: int,
                      done: Callable[[], None]) -> tuple[list[Outcome], float]:
    """`concurrency` workers, each sending its next body when its previous
    request ends; returns the outcomes and the wall time."""
    queue = iter(bodies)  # shared: next() never awaits, so no two workers take one body
    outcomes: list[Outcome] = []

    async def worker() -> None:
        for body in queue:
            outcomes.append(await stream_chat(client, body))
            done()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return outcomes, time.perf_counter() - start
