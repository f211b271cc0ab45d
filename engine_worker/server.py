"""The engine worker's gRPC front end: handlers validate and tokenize requests,
hand them to the engine core process (core.py) and stream its outputs back.
This process never touches MLX."""

import asyncio
import json
import logging
import multiprocessing as mp
import pickle
import uuid

import grpc

from engine_worker.core import core_main
from engine_worker.media_client import (
    MediaClient,
    MediaRefused,
    MediaUnavailable,
    PreparedItem,
    release,
)
from engine_worker.memory import MemoryBudget
from engine_worker.messages import DuplicateRequest, Output, QueueFull, Request, StepOutputs
from engine_worker.model import ModelFacts, load_tokenizer, read_facts
from engine_worker.sampling import SamplingError, SamplingParams
from engine_worker.text_output import TokenStream
from engine_worker.token_bytes import token_bytes
from engine_worker.vision import ONE_MEDIA_KIND
from vllm_mlx.ipc.grpc_server import listen
from vllm_mlx.ipc.shared_tensors import SharedTensors
from vllm_mlx.settings import MAX_GRPC_MESSAGE_BYTES, EngineSettings
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import engine_pb2_grpc
from vllm_mlx.v1 import media_pb2 as mpb

log = logging.getLogger("engine")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
# transformers' apply_chat_template's own parameters, and the tokenizer
# arguments it forwards: never template variables (tools and documents are:
# the template renders them).
TOKENIZER_ARGUMENTS = frozenset({
    "conversation", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "add_special_tokens", "pad_to_multiple_of", "return_attention_mask",
    "return_token_type_ids", "stride", "verbose", "split_special_tokens", "padding_side"})
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}


class InvalidRequest(ValueError):
    pass


MEDIA_PART_TYPES = {mpb.MEDIA_KIND_IMAGE: "image", mpb.MEDIA_KIND_VIDEO: "video"}


def media_parts(request: pb.GenerateRequest) -> list[tuple[int, int, mpb.MediaSource]]:
    """(message index, part index, source) of each media part, in prompt order."""
    if request.WhichOneof("input") != "chat":
        return []
    return [(i, j, part.media) for i, m in enumerate(request.chat.messages)
            for j, part in enumerate(m.parts) if part.WhichOneof("part") == "media"]


def expand_placeholders(ids: list[int], items: list[PreparedItem]) -> list[int]:
    """Each item's single placeholder token, as the chat template renders it,
    becomes the item's num_placeholder_tokens copies."""
    placeholders = {it.placeholder_token_id for it in items}
    out: list[int] = []
    k = 0
    for t in ids:
        if t not in placeholders:
            out.append(t)
            continue
        if k >= len(items) or items[k].placeholder_token_id != t:
            raise InvalidRequest("the prompt's image/video placeholders do not match its "
                                 "media parts (is a placeholder token written in the text?)")
        out += [t] * items[k].num_placeholder_tokens
        k += 1
    if k != len(items):
        raise InvalidRequest(f"the chat template placed {k} of the {len(items)} media parts")
    return out


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    values = {f: getattr(p, f) for f in ("temperature", "top_p", "top_k", "min_p",
                                          "repetition_penalty", "presence_penalty",
                                          "frequency_penalty", "seed", "penalty_context_size")
              if p.HasField(f)}
    return SamplingParams(**{**defaults.__dict__, **values, "logit_bias": dict(p.logit_bias)})


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
        self.stats: dict = {}
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
                 stats: dict | None) -> None:
        if stats is not None:
            self.stats = stats
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


def _content(m: pb.ChatMessage) -> list[dict]:
    """A message's parts as the chat template's content list: text parts, and
    an {"type": "image"} or {"type": "video"} entry where each medium goes."""
    content = []
    for part in m.parts:
        if part.WhichOneof("part") == "text":
            content.append({"type": "text", "text": part.text})
        elif part.WhichOneof("part") == "media":
            content.append({"type": MEDIA_PART_TYPES.get(part.media.kind, "image")})
    return content


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, settings: EngineSettings, facts: ModelFacts, tokenizer):
        self.settings = settings
        self.facts = facts
        self.tokenizer = tokenizer
        self.core = CoreClient(settings, facts)
        self.media = MediaClient(settings.media_workers) if facts.vision else None

    def _serving(self) -> bool:
        return (self.core.ready.done() and self.core.ready.result() is None
                and not self.core.dead.done())

    # -- building a Request ------------------------------------------------

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        tok = self.tokenizer
        kind = request.WhichOneof("input")
        if kind == "text":
            ids = tok.encode(request.text)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if t >= self.facts.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.facts.vocab_size - 1})")
        elif kind == "chat":
            ids = self._chat_ids(request.chat)
        else:
            raise InvalidRequest("one of text, token_ids or chat is required")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def _chat_ids(self, chat: pb.ChatInput) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("this model has no chat template; send text or token_ids")
        if not chat.messages:
            raise InvalidRequest("chat.messages must not be empty")
        messages = []
        for i, m in enumerate(chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages[{i}].role {m.role!r} is not one of "
                                     f"{sorted(CHAT_ROLES)}")
            msg = {"role": m.role, "content": _content(m) if m.parts else m.content}
            if m.name:
                msg["name"] = m.name
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        try:
            kwargs = json.loads(chat.template_kwargs_json) if chat.template_kwargs_json else {}
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"chat.template_kwargs_json is not valid JSON: {e}") from e
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat.template_kwargs_json must be a JSON object")
        reserved = sorted(set(kwargs) & TOKENIZER_ARGUMENTS)
        if reserved:
            # They reach the tokenizer, not the template: return_tensors gave
            # a 500, padding to max_length 10**7 took this process to 1.2 GB.
            raise InvalidRequest(f"chat template kwargs are template variables; {reserved[0]!r} "
                                 f"is an argument of the tokenizer, not the client's to set")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=True,
                add_generation_prompt=not chat.continue_final_message,
                continue_final_message=chat.continue_final_message, **kwargs)
        except Exception as e:  # the template itself refuses (roles order, ...)
            raise InvalidRequest(f"the chat template rejected the messages: {e}") from e

    async def _prepare_media(self, request: pb.GenerateRequest, request_id: str,
                             timeout: float | None) -> list[PreparedItem]:
        parts = media_parts(request)
        if not parts:
            return []
        for i, j, source in parts:
            where = f"messages[{i}].content[{j}]"
            if not self.facts.vision:
                raise InvalidRequest(f"{where}: this model takes text only; it cannot "
                                     f"read images or videos")
            if source.kind not in MEDIA_PART_TYPES:
                raise InvalidRequest(f"{where}: the media kind (image or video) is required")
            if source.WhichOneof("source") is None:
                raise InvalidRequest(f"{where}: a url or a path is required")
            if (self.facts.model_type in ONE_MEDIA_KIND and source.kind != parts[0][2].kind):
                raise InvalidRequest(f"{where}: this model takes images or videos in one "
                                     f"request, not both")
        try:
            return await self.media.prepare(request_id, [s for _, _, s in parts], timeout)
        except MediaRefused as e:
            if e.index < 0:
                raise InvalidRequest(f"media: {e.reason}") from None
            i, j, _ = parts[e.index]
            raise InvalidRequest(f"messages[{i}].content[{j}]: {e.reason}") from None

    def _build(self, request: pb.GenerateRequest, request_id: str,
               media: list[PreparedItem] = ()) -> Request:
        facts = self.facts
        prompt = self._prompt_ids(request)
        if media:
            prompt = expand_placeholders(prompt, list(media))
        context = facts.context_length
        if len(prompt) >= context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens, which leaves no room in the model's "
                f"context length of {context} tokens")
        max_tokens = request.max_tokens or context - len(prompt)
        if len(prompt) + max_tokens > context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: "
                f"together they exceed the model's context length of {context} tokens")
        memory = self.core.memory
        need = memory.request_bytes(len(prompt) + max_tokens)
        if need > memory.for_requests:
            raise InvalidRequest(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) needs "
                f"{need} bytes of KV cache, more than the {memory.for_requests} bytes the "
                f"engine's memory limit of {memory.limit} leaves beside the weights and "
                f"MLX's buffer cache; lower max_tokens")
        sampling = sampling_from_proto(request.sampling)
        try:
            sampling.validate(facts.vocab_size)
        except SamplingError as e:
            raise InvalidRequest(str(e)) from e
        if request.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}")
        if request.top_logprobs and not request.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs")
        prompt_logprobs = (request.prompt_logprobs if request.HasField("prompt_logprobs")
                           else None)
        if prompt_logprobs is not None:
            if prompt_logprobs > MAX_TOP_LOGPROBS:
                raise InvalidRequest(f"prompt_logprobs must be at most {MAX_TOP_LOGPROBS}")
            if media:
                raise InvalidRequest("prompt_logprobs is for text prompts; this one has "
                                     "images or videos")
        if any(not s for s in request.stop):
            raise InvalidRequest("stop strings must not be empty")
        bad = [t for t in request.stop_token_ids if t >= facts.vocab_size]
        if bad:
            raise InvalidRequest(f"stop token id {bad[0]} is outside the vocabulary")
        stop_ids = set(request.stop_token_ids)
        if not request.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        return Request(
            request_id=request_id, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
            stop=list(request.stop), stop_token_ids=sorted(stop_ids),
            logprobs=request.logprobs, top_logprobs=request.top_logprobs,
            include_stop=request.include_stop_in_output, prompt_logprobs=prompt_logprobs,
            media=SharedTensors([(it.segment, it.layout) for it in media]) if media else [])

    def _token_logprob(self, token_id: int, logprob: float | None,
                       top: list[tuple[int, float]], rank: int = 0) -> pb.TokenLogprob:
        decode, tok = self.tokenizer.decode, self.tokenizer
        return pb.TokenLogprob(
            token_id=token_id, logprob=logprob, token=decode([token_id]),
            token_bytes=token_bytes(tok, token_id), rank=rank,
            top=[pb.TopLogprob(token_id=t, logprob=v, token=decode([t]),
                               token_bytes=token_bytes(tok, t)) for t, v in top])

    def _prompt_extras(self, request: pb.GenerateRequest, r: Request, stream: TokenStream,
                       msg: pb.GenerateResponse) -> None:
        """What the first message carries besides tokens, when asked for."""
        if request.echo:
            msg.prompt_text = self.tokenizer.decode(r.prompt)
        scored = stream.prompt_logprobs
        if scored is not None:
            stream.prompt_logprobs = None
            msg.prompt_logprobs.append(self._token_logprob(r.prompt[0], None, []))
            msg.prompt_logprobs.extend(self._token_logprob(lp.token_id, lp.logprob, lp.top,
                                                           lp.rank) for lp in scored)

    def _to_proto(self, r: Request, stream: TokenStream,
                  outs: list[Output]) -> pb.GenerateResponse:
        """One message for every output queued since the last one: when the
        client or the network is slower than decoding, tokens coalesce
        instead of piling up as many small messages."""
        try:
            ids, text, logprobs = stream.take(outs)
        except Exception as e:  # e.g. detokenizing failed: this request only
            log.exception("request %s failed", r.request_id)
            ids, text, logprobs = [], "", []
            stream.finish_reason, stream.error = "error", f"detokenizing failed: {e}"
            stream.stopped_by_string = True  # the core must still let go of it
        msg = pb.GenerateResponse(
            request_id=r.request_id, token_ids=ids, text=text, prompt_tokens=len(r.prompt),
            completion_tokens=stream.completion_tokens)
        msg.logprobs.extend(self._token_logprob(lp.token_id, lp.logprob, lp.top)
                            for lp in logprobs)
        if stream.finish_reason:
            msg.finished = True
            msg.finish_reason = FINISH_REASONS[stream.finish_reason]
            msg.stop_reason = stream.stop_reason
            msg.error = stream.error
        return msg

    # -- RPCs ----------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if not self._serving():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is still loading")
        request_id = request.request_id or uuid.uuid4().hex
        media: list[PreparedItem] = []
        try:
            async for msg in self._generate(request, request_id, media, context):
                yield msg
        finally:
            # The core copied the tensors when the request reached it, and
            # the request is over (or never got there): this request's hold
            # on its media segments ends.
            release(media)

    async def _generate(self, request: pb.GenerateRequest, request_id: str,
                        media: list[PreparedItem], context: grpc.aio.ServicerContext):
        sink: asyncio.Queue = asyncio.Queue()
        try:
            media += await self._prepare_media(request, request_id, context.time_remaining())
            # Tokenizing and templating are plain CPU work; keep the loop free.
            r = await asyncio.to_thread(self._build, request, request_id, media)
            self.core.submit(r, sink)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except MediaUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"media: {e}")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the engine's queue is full ({e}); retry later")
        except DuplicateRequest:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {request_id!r} is already in flight")
        # Text and token-id prompts, and a continued final message, are
        # continued by the output; a chat reply starts a text of its own.
        continues = request.WhichOneof("input") != "chat" or request.chat.continue_final_message
        stream = TokenStream(self.tokenizer, r.stop, r.include_stop,
                             context=r.prompt if continues else None)
        interval = self.settings.stream_interval_s
        loop = asyncio.get_running_loop()
        first = True
        try:
            while stream.finish_reason is None:
                outs = [await sink.get()]
                if outs[0].finish_reason == "rejected":  # the core's queue is full
                    stream.finish_reason = "rejected"
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"the engine's queue is full ({outs[0].error}); "
                                        f"retry later")
                sent_at = loop.time()
                # After the first message, send at most one per interval: each
                # message costs this process's event loop far more than a token.
                if (outs[0].finish_reason is None and interval > 0
                        and stream.completion_tokens > 0):
                    await asyncio.sleep(interval - (loop.time() - sent_at))
                while not sink.empty():
                    outs.append(sink.get_nowait())
                msg = self._to_proto(r, stream, outs)
                if first:
                    self._prompt_extras(request, r, stream, msg)
                    first = False
                if stream.stopped_by_string:
                    self.core.stop_early(request_id)
                yield msg
        finally:
            if stream.finish_reason is None:  # the client went away or cancelled
                self.core.abort(request_id)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.core.abort(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        if not self._serving():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is still loading")
        f = self.facts
        return pb.ModelInfo(
            name=f.name, path=f.path, context_length=f.context_length, modalities=f.modalities,
            has_chat_template=getattr(self.tokenizer, "chat_template", None) is not None,
            eos_token_ids=sorted(self.tokenizer.eos_token_ids), vocab_size=f.vocab_size,
            max_num_seqs=self.settings.max_num_seqs, max_queue=self.settings.max_queue,
            memory_limit_bytes=self.core.memory.limit, weights_bytes=self.core.memory.weights,
            kv_bytes_per_token=self.core.memory.kv_per_token)

    async def GetStats(self, request, context) -> pb.Stats:
        stats = dict(self.core.stats)
        stats["requests_rejected"] = stats.get("requests_rejected", 0) + \
            self.core.requests_rejected
        stats["in_flight"] = len(self.core.sinks)
        return pb.Stats(**stats)

    async def ClearPrefixCache(self, request, context) -> pb.ClearPrefixCacheResponse:
        if not self._serving():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is still loading")
        self.core.clear_prefix_cache()
        return pb.ClearPrefixCacheResponse()


async def serve(settings: EngineSettings) -> None:
    """Listen at once (health NOT_SERVING), start the engine core, and report
    SERVING once it has loaded the weights and warmed up."""
    facts = read_facts(settings.model, settings.served_model_name, settings.max_model_len,
                       settings.mllm)
    tokenizer = await asyncio.to_thread(load_tokenizer, facts)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES)])
    service = EngineService(settings, facts, tokenizer)
    engine_pb2_grpc.add_EngineServicer_to_server(service, server)
    listening = await listen(server, SERVICE_NAME, settings.host, settings.port)
    port = listening.port
    log.info("listening on %s:%d, loading %s", settings.host, port, settings.model)
    core = service.core
    core.start()
    try:
        await asyncio.wait([core.ready, core.dead], return_when=asyncio.FIRST_COMPLETED)
        error = core.ready.result() if core.ready.done() else core.dead.result()
        if error is not None:
            raise SystemExit(f"could not load {settings.model}: {error}")
        await listening.set_serving(True)
        log.info("serving %s (context %d) on %s:%d", facts.name, facts.context_length,
                 settings.host, port)
        watch = asyncio.create_task(core.watch())
        # Serve until stopped; a dead core ends this process so that its
        # supervisor restarts it, after failing what was in flight.
        reason = await asyncio.shield(core.dead)
        watch.cancel()
        log.error("%s; shutting down", reason)
        await listening.set_serving(False)
        core.fail_all(reason)
        raise SystemExit(1)
    finally:
        await listening.stop(grace=5)
        core.stop()
        if service.media is not None:
            await service.media.close()  # unlinks the cached media segments
