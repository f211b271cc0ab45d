"""The engine worker's gRPC front end: the Engine servicer, which has its
request builder (request_builder.py) validate, tokenize and prepare each
request, hands it to the engine core process through the core client
(core_client.py) and streams the core's outputs back as proto messages;
and `serve`, which starts it all. This process never touches MLX.

Every call it fails carries an ErrorInfo (vllm_mlx.ipc.error_info)."""

import asyncio
import logging
import uuid

import grpc

from engine_worker.core_client import CoreClient
from engine_worker.media_client import MediaClient, MediaUnavailable, PreparedItem, release
from engine_worker.messages import DuplicateRequest, Output, QueueFull, Request
from engine_worker.model import ModelFacts, load_tokenizer, read_facts
from engine_worker.reply import ReplyParser
from engine_worker.request_builder import InvalidRequest, RequestBuilder
from engine_worker.text_output import TokenStream
from engine_worker.token_bytes import token_bytes
from vllm_mlx import event_loop_lag
from vllm_mlx.ipc.error_info import abort
from vllm_mlx.ipc.grpc_server import listen
from vllm_mlx.settings import (
    MAX_GRPC_MESSAGE_BYTES,
    EngineSettings,
    favour_the_waiting_thread,
    freeze_startup_objects,
)
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import engine_pb2_grpc
from vllm_mlx.v1 import errors_pb2 as epb

log = logging.getLogger("engine")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR,
                  "tool_calls": pb.FINISH_REASON_TOOL_CALLS}


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, settings: EngineSettings, facts: ModelFacts, tokenizer):
        self.settings = settings
        self.facts = facts
        self.tokenizer = tokenizer
        self.core = CoreClient(settings, facts)
        self.media = MediaClient(settings.media_workers) if facts.vision else None
        self.builder = RequestBuilder(facts, tokenizer, self.media, settings.tool_call_parser,
                                      settings.reasoning_parser)
        self.loop_lag = event_loop_lag.LagHistogram()  # for GetStats
        self.loop_watch = event_loop_lag.LagWatch(self.loop_lag.record)

    def _serving(self) -> bool:
        return (self.core.ready.done() and self.core.ready.result() is None
                and not self.core.dead.done())

    async def _refuse_unless_serving(self, context: grpc.aio.ServicerContext) -> None:
        if not self._serving():
            await abort(context, epb.ERROR_CODE_LOADING, "the engine is still loading")

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

    def _to_proto(self, r: Request, stream: TokenStream, outs: list[Output],
                  reply: ReplyParser | None) -> pb.GenerateResponse:
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
        if reply is not None:
            called = len(reply.calls)
            msg.text, msg.reasoning_text, calls = reply.add(text, stream.finish_reason is not None)
            for k, call in enumerate(calls, called):
                msg.tool_calls.append(pb.ToolCallDelta(index=k, id=call.id, name=call.name,
                                                       arguments=call.arguments))
            if reply.calls and stream.finish_reason == "stop":
                stream.finish_reason = "tool_calls"
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
        await self._refuse_unless_serving(context)
        request_id = request.request_id or uuid.uuid4().hex
        media: list[PreparedItem] = []
        self.loop_watch.begin()
        try:
            async for msg in self._generate(request, request_id, media, context):
                yield msg
        finally:
            self.loop_watch.end()
            # The core copied the tensors when the request reached it, and
            # the request is over (or never got there): this request's hold
            # on its media segments ends.
            release(media)

    async def _generate(self, request: pb.GenerateRequest, request_id: str,
                        media: list[PreparedItem], context: grpc.aio.ServicerContext):
        sink: asyncio.Queue = asyncio.Queue()
        try:
            media += await self.builder.prepare_media(request, request_id,
                                                      context.time_remaining())
            # Tokenizing and templating are plain CPU work; keep the loop free.
            r = await asyncio.to_thread(self.builder.build, request, request_id,
                                        self.core.memory, media)
            self.core.submit(r, sink)
        except InvalidRequest as e:
            await abort(context, e.code, str(e), e.field, e.item)
        except MediaUnavailable as e:
            await abort(context, epb.ERROR_CODE_MEDIA_UNAVAILABLE, f"media: {e}")
        except QueueFull as e:
            await abort(context, epb.ERROR_CODE_OVERLOADED,
                        f"the engine's queue is full ({e}); retry later")
        except DuplicateRequest:
            await abort(context, epb.ERROR_CODE_DUPLICATE_REQUEST_ID,
                        f"request_id {request_id!r} is already in flight", "request_id")
        except Exception as e:  # a bug or a tokenizer failing: this request only
            log.exception("request %s failed before reaching the core", request_id)
            await abort(context, epb.ERROR_CODE_INTERNAL,
                        f"internal error while building the request ({type(e).__name__}: {e})")
        reply = self.builder.reply_parser(request, r)
        stream = self.builder.token_stream(request, r, reply)
        interval = self.settings.stream_interval_s
        loop = asyncio.get_running_loop()
        first = True
        try:
            while stream.finish_reason is None:
                outs = [await sink.get()]
                if outs[0].finish_reason == "rejected":  # the core's queue is full
                    stream.finish_reason = "rejected"
                    await abort(context, epb.ERROR_CODE_OVERLOADED,
                                f"the engine's queue is full ({outs[0].error}); retry later")
                sent_at = loop.time()
                # After the first message, send at most one per interval: each
                # message costs this process's event loop far more than a token.
                if (outs[0].finish_reason is None and interval > 0
                        and stream.completion_tokens > 0):
                    await asyncio.sleep(interval - (loop.time() - sent_at))
                while not sink.empty():
                    outs.append(sink.get_nowait())
                msg = self._to_proto(r, stream, outs, reply)
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
        await self._refuse_unless_serving(context)
        f = self.facts
        return pb.ModelInfo(
            name=f.name, path=f.path, context_length=f.context_length, modalities=f.modalities,
            has_chat_template=getattr(self.tokenizer, "chat_template", None) is not None,
            eos_token_ids=sorted(self.tokenizer.eos_token_ids), vocab_size=f.vocab_size,
            max_num_seqs=self.settings.max_num_seqs, max_queue=self.settings.max_queue,
            memory_limit_bytes=self.core.memory.limit, weights_bytes=self.core.memory.weights,
            kv_bytes_per_token=self.core.memory.kv_per_token)

    async def GetStats(self, request, context) -> pb.Stats:
        stats = pb.Stats()
        stats.CopyFrom(self.core.stats)
        # The front end refuses most overload itself, before the core sees it.
        stats.requests_rejected += self.core.requests_rejected
        stats.in_flight = len(self.core.sinks)
        stats.event_loop_lag_seconds_bounds.extend(event_loop_lag.BOUNDS)
        stats.event_loop_lag_seconds_counts.extend(self.loop_lag.counts)
        stats.event_loop_lag_seconds_sum = self.loop_lag.sum
        return stats

    async def ClearPrefixCache(self, request, context) -> pb.ClearPrefixCacheResponse:
        await self._refuse_unless_serving(context)
        self.core.clear_prefix_cache()
        return pb.ClearPrefixCacheResponse()


async def serve(settings: EngineSettings) -> None:
    """Listen at once (health NOT_SERVING), start the engine core, and report
    SERVING once it has loaded the weights and warmed up."""
    facts = read_facts(settings.model, settings.served_model_name, settings.max_model_len,
                       settings.mllm)
    favour_the_waiting_thread()  # the event loop forwards every token; requests are
    # built on other threads
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
    lag = asyncio.create_task(service.loop_watch.run())
    try:
        await asyncio.wait([core.ready, core.dead], return_when=asyncio.FIRST_COMPLETED)
        error = core.ready.result() if core.ready.done() else core.dead.result()
        if error is not None:
            raise SystemExit(f"could not load {settings.model}: {error}")
        freeze_startup_objects()
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
        lag.cancel()
        await listening.stop(grace=5)
        core.stop()
        if service.media is not None:
            await service.media.close()  # unlinks the cached media segments
