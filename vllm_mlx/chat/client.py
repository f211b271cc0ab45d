"""The chat UI's side of the OpenAI API: which model a server serves and what
it takes in, one streamed reply with its timings, and failures put in words."""

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai

log = logging.getLogger("vllm_mlx.chat")

# A server that is down refuses at once; one that does not answer a connect
# within this long is as good as down.
CONNECT_TIMEOUT_S = 5.0
# Between two pieces of a reply: a long prompt on a slow machine can take
# minutes to prefill before its first token.
READ_TIMEOUT_S = 600.0


class ChatError(Exception):
    """A failure, in words fit to show in the chat."""


def api_base(server_url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> `http://host:port/v1`."""
    url = server_url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def make_client(server_url: str, api_key: str | None) -> openai.AsyncOpenAI:
    # No retries: a failure shows at once, and the user decides to resend.
    return openai.AsyncOpenAI(base_url=api_base(server_url), api_key=api_key or "not-needed",
                              max_retries=0,
                              timeout=openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))


def readable(error: Exception, server_url: str) -> str:
    """What went wrong, for a person: never a traceback."""
    if isinstance(error, openai.APITimeoutError):
        return f"The server at {server_url} did not answer in time."
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        reason = f" ({cause})" if cause is not None and str(cause) else ""
        return (f"Cannot reach the server at {server_url}{reason}. Is it running? "
                f"`vllm-mlx-up` starts one.")
    if isinstance(error, openai.APIError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or error.message
        if isinstance(error, openai.APIStatusError):
            return f"The server answered {error.status_code}: {message}"
        return f"The server reported an error: {message}"
    # A connection that broke mid-reply surfaces as the HTTP library's own
    # error, which differs between openai SDK versions.
    log.warning("reply failed", exc_info=error)
    return f"The reply broke off: {error or type(error).__name__}"


@dataclass
class ServedModel:
    name: str
    # "text", "image", "video" as the server lists them; None where it does
    # not say (a server other than vllm-mlx).
    modalities: list[str] | None

    @property
    def media(self) -> list[str]:
        """The uploads to offer: images and videos unless the server says
        the model takes fewer."""
        if self.modalities is None:
            return ["image", "video"]
        return [m for m in ("image", "video") if m in self.modalities]


async def served_model(client: openai.AsyncOpenAI) -> ServedModel:
    """The server's first model (vllm-mlx lists the served one first)."""
    page = await client.models.list()
    if not page.data:
        raise ChatError("The server lists no model.")
    model = page.data[0]
    modalities = (model.model_extra or {}).get("modalities")
    return ServedModel(model.id, list(modalities) if isinstance(modalities, list) else None)


@dataclass
class Reply:
    """One reply as it streams in, and its figures once it ends."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    ttft_s: float | None = None     # request sent -> first text
    decode_s: float = 0.0           # first text -> last text
    finish_reason: str | None = None

    def summary(self) -> str:
        n = self.completion_tokens
        parts = [f"{n} tokens"]
        if n > 1 and self.decode_s > 0:
            parts.append(f"{(n - 1) / self.decode_s:.1f} tokens/s")
        elif n and self.ttft_s:  # all of it came in one piece (a busy server coalesces)
            parts.append(f"{n / self.ttft_s:.1f} tokens/s")
        if self.ttft_s is not None:
            parts.append(f"{self.ttft_s:.2f} s to first token")
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens} prompt tokens")
        if self.finish_reason == "length":
            parts.append("stopped at max tokens")
        return " · ".join(parts)


async def stream_reply(client: openai.AsyncOpenAI, model: str, messages: list[dict], *,
                       temperature: float, top_p: float, max_tokens: int
                       ) -> AsyncIterator[Reply]:
    """Yields the reply after each piece of text. Closing this generator
    (the stop button cancels the task awaiting it) closes the connection,
    and the server aborts the generation."""
    reply = Reply()
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, temperature=temperature, top_p=top_p,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    async with stream:
        pieces = 0
        async for chunk in stream:
            if chunk.usage is not None:
                reply.prompt_tokens = chunk.usage.prompt_tokens
                reply.completion_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            reply.finish_reason = choice.finish_reason or reply.finish_reason
            if choice.delta.content:
                now = time.perf_counter()
                if reply.ttft_s is None:
                    reply.ttft_s = now - start
                reply.decode_s = now - start - reply.ttft_s
                reply.text += choice.delta.content
                pieces += 1
                # A server that sends no usage: one piece is about one token.
                reply.completion_tokens = max(reply.completion_tokens, pieces)
                yield reply
    yield reply
