"""Running the engine streams of one HTTP request and shaping what they
produce into OpenAI responses: whole objects, or Server-Sent Events."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.engine_client import Generation
from gateway.errors import APIError, EngineFailed, sse_error
from gateway.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from gateway.metrics import Timer
from gateway.responses import (
    CalledFunction,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    FunctionDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from gateway.sse import DONE, TEXT_HOLE, TextChunk, sse
from vllm_mlx.v1 import engine_pb2 as pb

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}


@dataclass
class Context:
    """What every object of one response shares."""
    id: str
    created: int
    model: str
    timer: Timer
    include_usage: bool = False
    prompt_logprobs: bool = False  # vLLM's extension was asked for


@dataclass
class Choice:
    """One engine stream's output so far."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # From the first message, when asked for.
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    prompt_text: str = ""
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[pb.ToolCallDelta] = field(default_factory=list)

    def add(self, msg: pb.GenerateResponse) -> None:
        if msg.prompt_logprobs:
            self.prompt_logprobs = list(msg.prompt_logprobs)
        if msg.prompt_text:
            self.prompt_text = msg.prompt_text
        self.prompt_tokens = msg.prompt_tokens
        self.completion_tokens = msg.completion_tokens
        if msg.text:
            self.text.append(msg.text)
        if msg.reasoning_text:
            self.reasoning.append(msg.reasoning_text)
        self.tool_calls.extend(msg.tool_calls)
        self.logprobs.extend(msg.logprobs)
        if msg.finished:
            self.finish_reason = finish_reason(msg)


def finish_reason(msg: pb.GenerateResponse) -> str:
    if msg.finish_reason in FINISH:
        return FINISH[msg.finish_reason]
    if msg.finish_reason == pb.FINISH_REASON_ABORT:
        # Someone called Abort on this request id (our own cancels never
        # reach here: their stream is no longer read).
        raise EngineFailed("the request was aborted in the engine", code="aborted")
    raise EngineFailed(f"the engine failed this request: {msg.error or 'unknown error'}")


def cancel_all(gens: list[Generation]) -> None:
    for g in gens:
        g.cancel()


async def start(gens: list[Generation]) -> None:
    """Wait for every stream's first message, so that a refusal (bad input,
    a full queue) is a plain HTTP error before any byte of a 200 is sent."""
    if len(gens) == 1:
        try:
            await gens[0].first()
        except BaseException:
            gens[0].cancel()
            raise
        return
    tasks = [asyncio.ensure_future(g.first()) for g in gens]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        # Read every failure (an unread one is logged as never retrieved).
        errors = [e for e in (t.exception() for t in done) if e is not None]
        if errors:
            raise errors[0]
    except BaseException:
        for t in tasks:
            t.cancel()
        cancel_all(gens)
        raise


def combine(msgs: list[pb.GenerateResponse]) -> pb.GenerateResponse:
    """Consecutive messages of one stream as one: their tokens, text and
    logprobs in order, the last one's counts and finish."""
    if len(msgs) == 1:
        return msgs[0]
    last = msgs[-1]
    out = pb.GenerateResponse(
        request_id=last.request_id, text="".join(m.text for m in msgs),
        finished=last.finished, finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
        error=last.error, stop_reason=last.stop_reason,
        prompt_text="".join(m.prompt_text for m in msgs))
    out.reasoning_text = "".join(m.reasoning_text for m in msgs)
    for m in msgs:
        out.tool_calls.extend(m.tool_calls)
        out.token_ids.extend(m.token_ids)
        out.logprobs.extend(m.logprobs)
        out.prompt_logprobs.extend(m.prompt_logprobs)
    return out


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    """(choice index, message) from every stream as they arrive; leaving
    early (error, disconnect) cancels every stream in the engine.

    Whatever arrived while the caller handled the previous message comes as
    one message per choice. Each SSE event costs this process far more than
    a gRPC read (starlette's send path, h11, a socket write), so once the
    engine outpaces the gateway, events grow instead of queueing, and an idle
    gateway still sends every token as it comes."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for msg in g:
                queue.put_nowait((i, msg, None))
        except APIError as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        live = len(gens)
        while live:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            by_choice: dict[int, list[pb.GenerateResponse]] = {}
            error = None
            for i, msg, error in items:
                if error is not None:
                    break
                by_choice.setdefault(i, []).append(msg)
            for i, msgs in by_choice.items():
                msg = combine(msgs)
                yield i, msg
                live -= msg.finished
            if error is not None:
                raise error
    finally:
        for t in tasks:
            t.cancel()
        cancel_all(gens)


def _usage(prompt_tokens: int, choices: list[Choice]) -> Usage:
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion)


# -- chat ----------------------------------------------------------------------------

async def chat_completion(gens: list[Generation], ctx: Context, logprobs: bool
                          ) -> ChatCompletion:
    choices = [Choice() for _ in gens]
    async for i, msg in merged(gens):
        ctx.timer.tokens(i, len(msg.token_ids))
        choices[i].add(msg)
    usage = _usage(choices[0].prompt_tokens, choices)
    ctx.timer.done(usage.prompt_tokens, usage.completion_tokens)
    return ChatCompletion(id=ctx.id, created=ctx.created, model=ctx.model, usage=usage, choices=[
        ChatChoice(index=i, message=_message(c),
                   logprobs=chat_logprobs(c.logprobs) if logprobs else None,
                   finish_reason=c.finish_reason)
        for i, c in enumerate(choices)],
        prompt_logprobs=prompt_logprobs(choices[0].prompt_logprobs)
        if ctx.prompt_logprobs else None)


def _message(c: Choice) -> ChatMessage:
    content = "".join(c.text)
    calls = [ToolCall(id=t.id, function=CalledFunction(name=t.name, arguments=t.arguments))
             for t in c.tool_calls]
    return ChatMessage(content=None if calls and not content.strip() else content,
                       tool_calls=calls or None,
                       reasoning_content="".join(c.reasoning) if c.reasoning else None)


def _delta_calls(calls) -> list[ToolCallDelta]:
    """Each call as two deltas, as OpenAI streams them: id and name, then
    the arguments."""
    out = []
    for t in calls:
        out.append(ToolCallDelta(index=t.index, id=t.id, type="function",
                                 function=FunctionDelta(name=t.name)))
        out.append(ToolCallDelta(index=t.index, function=FunctionDelta(arguments=t.arguments)))
    return out


async def chat_stream(gens: list[Generation], ctx: Context, logprobs: bool
                      ) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return sse(ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model,
                                       choices=choices, usage=usage))

    choices = [Choice() for _ in gens]
    text_chunks = [TextChunk(ChatCompletionChunk(
        id=ctx.id, created=ctx.created, model=ctx.model,
        choices=[ChatChunkChoice(index=i, delta=ChatDelta(content=TEXT_HOLE))]))
        for i in range(len(gens))]
    # Events due together leave in one write (one trip through starlette's
    # send path and one syscall each, the gateway's main cost per event).
    events = [chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
              for i in range(len(gens))]
    try:
        async for i, msg in merged(gens):
            ctx.timer.tokens(i, len(msg.token_ids))
            choices[i].add(msg)
            if ctx.prompt_logprobs and i == 0 and msg.prompt_logprobs:  # choices share it
                events.append(sse(ChatCompletionChunk(
                    id=ctx.id, created=ctx.created, model=ctx.model, choices=[],
                    prompt_logprobs=prompt_logprobs(msg.prompt_logprobs))))
            if logprobs and msg.logprobs:
                events.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=msg.text),
                                                     logprobs=chat_logprobs(msg.logprobs))]))
            elif msg.text:
                events.append(text_chunks[i](msg.text))
            if msg.reasoning_text:
                events.append(chunk([ChatChunkChoice(
                    index=i, delta=ChatDelta(reasoning_content=msg.reasoning_text))]))
            for call in _delta_calls(msg.tool_calls):
                events.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(tool_calls=[call]))]))
            if msg.finished:
                events.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(),
                                                     finish_reason=choices[i].finish_reason)]))
            if events:
                yield b"".join(events)
                events = []
        usage = _usage(choices[0].prompt_tokens, choices)
        ctx.timer.done(usage.prompt_tokens, usage.completion_tokens)
        if ctx.include_usage:
            events.append(chunk([], usage))
    except APIError as e:
        events.append(sse_error(e))
    yield b"".join(events) + DONE


# -- completions -----------------------------------------------------------------------

def _completion_usage(choices: list[Choice], prompt_of: list[int]) -> Usage:
    # Each prompt counts once, however many choices it has.
    first_choice = {}
    for i, p in enumerate(prompt_of):
        first_choice.setdefault(p, i)
    return _usage(sum(choices[i].prompt_tokens for i in first_choice.values()), choices)


def _echoed(echo: list[str | list[int]] | None, prompt: int, c: Choice) -> str:
    """The text a choice echoes: the prompt as sent, or as the engine decoded
    its token ids."""
    if echo is None:
        return ""
    sent = echo[prompt]
    return sent if isinstance(sent, str) else c.prompt_text


def _prompt_choice(i: int, c: Choice, ctx: Context, text: str, logprobs: bool
                   ) -> tuple[CompletionChoice, int]:
    """What a choice's output starts with: the echoed prompt, its tokens'
    logprobs (first null) when logprobs are asked for, and vLLM's
    prompt_logprobs; and the text offset after it."""
    lps, offset = None, len(text)
    if text and logprobs:
        lps, offset = completion_logprobs(c.prompt_logprobs, 0)
    return CompletionChoice(
        index=i, text=text, logprobs=lps, finish_reason=None,
        prompt_logprobs=prompt_logprobs(c.prompt_logprobs) if ctx.prompt_logprobs else None,
    ), offset


async def completion(gens: list[Generation], ctx: Context, prompt_of: list[int],
                     echo: list[str | list[int]] | None, logprobs: bool) -> Completion:
    choices = [Choice() for _ in gens]
    async for i, msg in merged(gens):
        ctx.timer.tokens(i, len(msg.token_ids))
        choices[i].add(msg)
    usage = _completion_usage(choices, prompt_of)
    ctx.timer.done(usage.prompt_tokens, usage.completion_tokens)
    out = []
    for i, c in enumerate(choices):
        prefix = _echoed(echo, prompt_of[i], c)
        # An echoed prompt's tokens come first, with the text offsets from 0.
        lps = completion_logprobs((c.prompt_logprobs if prefix else []) + c.logprobs,
                                  0)[0] if logprobs else None
        out.append(CompletionChoice(
            index=i, text=prefix + "".join(c.text), logprobs=lps,
            finish_reason=c.finish_reason,
            prompt_logprobs=prompt_logprobs(c.prompt_logprobs) if ctx.prompt_logprobs else None))
    return Completion(id=ctx.id, created=ctx.created, model=ctx.model, choices=out, usage=usage)


async def completion_stream(gens: list[Generation], ctx: Context, prompt_of: list[int],
                            echo: list[str | list[int]] | None, logprobs: bool
                            ) -> AsyncIterator[bytes]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse(Completion(id=ctx.id, created=ctx.created, model=ctx.model,
                              choices=choices, usage=usage))

    choices = [Choice() for _ in gens]
    offsets = [0] * len(gens)
    text_chunks = [TextChunk(Completion(
        id=ctx.id, created=ctx.created, model=ctx.model,
        choices=[CompletionChoice(index=i, text=TEXT_HOLE, finish_reason=None)]))
        for i in range(len(gens))]
    events = []  # due together: one write (see chat_stream)
    started = [False] * len(gens)
    try:
        async for i, msg in merged(gens):
            ctx.timer.tokens(i, len(msg.token_ids))
            choices[i].add(msg)
            if not started[i]:  # the echo and prompt logprobs come with the first message
                started[i] = True
                if echo or ctx.prompt_logprobs:
                    first, offsets[i] = _prompt_choice(
                        i, choices[i], ctx, _echoed(echo, prompt_of[i], choices[i]), logprobs)
                    events.append(chunk([first]))
            if logprobs and msg.logprobs:
                lps, offsets[i] = completion_logprobs(msg.logprobs, offsets[i])
                events.append(chunk([CompletionChoice(index=i, text=msg.text, logprobs=lps,
                                                      finish_reason=None)]))
            elif msg.text:
                events.append(text_chunks[i](msg.text))
            if msg.reasoning_text:
                events.append(chunk([ChatChunkChoice(
                    index=i, delta=ChatDelta(reasoning_content=msg.reasoning_text))]))
            for call in _delta_calls(msg.tool_calls):
                events.append(chunk([ChatChunkChoice(index=i, delta=ChatDelta(tool_calls=[call]))]))
            if msg.finished:
                events.append(chunk([CompletionChoice(index=i, text="",
                                                      finish_reason=choices[i].finish_reason)]))
            if events:
                yield b"".join(events)
                events = []
        usage = _completion_usage(choices, prompt_of)
        ctx.timer.done(usage.prompt_tokens, usage.completion_tokens)
        if ctx.include_usage:
            events.append(chunk([], usage))
    except APIError as e:
        events.append(sse_error(e))
    yield b"".join(events) + DONE
