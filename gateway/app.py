"""The HTTP routes. Each request is validated by its pydantic model, turned
into engine calls (translate), and answered from their streams (serving).
Nothing outlives a request except the gRPC channel and the engine's model
facts, so any number of these processes can share a port."""

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway import metrics, serving, sse, translate
from gateway.auth import APIKeyMiddleware
from gateway.config import GatewaySettings
from gateway.engine_client import EngineClient
from gateway.errors import APIError, EngineUnavailable, NotFound, install_handlers
from gateway.responses import ChatCompletion, Completion, ErrorResponse, Health, Model, ModelList
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from vllm_mlx import event_loop_lag
from vllm_mlx.settings import freeze_startup_objects

log = logging.getLogger("gateway")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 429, 500, 503,
                                                            504)}
_STREAM_DOC = {"text/event-stream": {"schema": {
    "type": "string", "description": "`data: {chunk}` events, then `data: [DONE]`"}}}


def _json(obj) -> Response:
    return Response(obj.model_dump_json(), media_type="application/json")


def _request_id(request: Request) -> str:
    # A client-chosen id (as vLLM takes it) makes a request findable in the
    # engine's logs and abortable by a direct gRPC client.
    # Printable ASCII only: it is echoed in response ids and headers, and
    # starlette reads header bytes as Latin-1 (invalid UTF-8 came back as
    # mojibake).
    supplied = request.headers.get("x-request-id", "").strip()[:128]
    if supplied and all("!" <= c <= "~" for c in supplied):
        return supplied
    return uuid.uuid4().hex


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The ASGI app; uvicorn calls this (factory=True) in every worker."""
    settings = settings or GatewaySettings.from_env()
    engine = EngineClient(settings.engine, settings.request_timeout_s,
                          settings.health_timeout_s)
    watch = event_loop_lag.LagWatch(metrics.LOOP_LAG.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        freeze_startup_objects()
        lag = asyncio.create_task(watch.run())
        yield
        lag.cancel()
        await engine.close()

    app = FastAPI(title="vllm-mlx", summary="OpenAI-compatible inference on MLX",
                  version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(metrics.RequestMetrics, watch=watch)  # outermost: counts 401s too

    async def served_name() -> str:
        return settings.served_model_name or (await engine.model_info()).name

    async def resolve(model: str) -> str:
        served = await served_name()
        if model == served or model == "default" or model in settings.model_aliases:
            return served
        raise NotFound(f"The model '{model}' does not exist", param="model",
                       code="model_not_found")

    async def model_objects(names: list[str]) -> list[Model]:
        modalities = list((await engine.model_info()).modalities)
        return [Model(id=n, created=settings.started_at, modalities=modalities) for n in names]

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health() -> Health:
        """200 when the engine is serving, 503 with the reason when not."""
        reason = await engine.health()
        if reason:
            raise EngineUnavailable(reason)
        return Health()

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> Response:
        served = await served_name()
        names = [served] + [a for a in settings.model_aliases if a != served]
        return _json(ModelList(data=await model_objects(names)))

    @app.get("/v1/models/{model_id:path}", response_model=Model, responses=_ERRORS)
    async def get_model(model_id: str) -> Response:
        served = await resolve(model_id)
        return _json((await model_objects([served if model_id == "default" else model_id]))[0])

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        rid = _request_id(request)
        ctx = serving.Context(id=f"chatcmpl-{rid}", created=int(time.time()),
                              model=await resolve(body.model), timer=metrics.Timer("chat"),
                              include_usage=body.include_usage,
                              prompt_logprobs=body.prompt_logprobs is not None)
        info = await engine.model_info()
        requests = translate.chat_requests(body, rid, list(info.modalities),
                                           settings.max_choices)
        if body.user:
            log.debug("request %s from user %s", rid, body.user)
        if len(requests) > 1:
            await engine.admit(len(requests))
        gens = [engine.generate(r, "messages", "top_logprobs") for r in requests]
        await sse.race_disconnect(request, serving.start(gens))
        headers = {"X-Request-Id": rid}
        if body.stream:
            return sse.SSEResponse(serving.chat_stream(gens, ctx, body.logprobs), headers)
        result = await sse.race_disconnect(
            request, serving.chat_completion(gens, ctx, body.logprobs))
        response = _json(result)
        response.headers.update(headers)
        return response

    @app.post("/v1/completions", response_model=Completion,
              responses={**_ERRORS, 200: {"content": _STREAM_DOC}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        rid = _request_id(request)
        ctx = serving.Context(id=f"cmpl-{rid}", created=int(time.time()),
                              model=await resolve(body.model),
                              timer=metrics.Timer("completions"),
                              include_usage=body.include_usage,
                              prompt_logprobs=body.prompt_logprobs is not None)
        pairs = translate.completion_requests(body, rid, settings.max_choices)
        if body.user:
            log.debug("request %s from user %s", rid, body.user)
        prompt_of = [p for p, _ in pairs]
        echo = body.prompts if body.echo else None
        logprobs = body.logprobs is not None
        if len(pairs) > 1:
            await engine.admit(len(pairs))
        gens = [engine.generate(r, "prompt", "logprobs") for _, r in pairs]
        await sse.race_disconnect(request, serving.start(gens))
        headers = {"X-Request-Id": rid}
        if body.stream:
            return sse.SSEResponse(
                serving.completion_stream(gens, ctx, prompt_of, echo, logprobs), headers)
        result = await sse.race_disconnect(
            request, serving.completion(gens, ctx, prompt_of, echo, logprobs))
        response = _json(result)
        response.headers.update(headers)
        return response

    @app.post("/v1/admin/clear-prefix-cache", responses=_ERRORS)
    async def clear_prefix_cache() -> dict:
        """Drop the engine's cached prompt prefixes (guarded by the API key
        like every route but /health)."""
        await engine.clear_prefix_cache()
        return {"cleared": True}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        try:
            stats = await engine.stats()
        except APIError:
            stats = None  # still serve the gateway's own figures
        return Response(metrics.render(stats), media_type=metrics.CONTENT_TYPE)

    return app
