"""Prometheus metrics: what each gateway process saw, plus the engine's queue
as GetStats reports it at scrape time.

With several uvicorn workers, prometheus-client's multi-process mode
(PROMETHEUS_MULTIPROC_DIR, set by `__main__` before the workers start) sums
every worker's counters and histograms into one scrape, whichever worker
answers it.
"""

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from vllm_mlx.v1 import engine_pb2 as pb

# The `_created` series double every counter's output and nothing reads them.
disable_created_metrics()

PREFIX = "vllm_mlx_gateway"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(f"{PREFIX}_requests", "HTTP requests by route, method and status",
                   ["route", "method", "status"])
TTFT = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                 "From request arrival to the first generated token", ["endpoint"],
                 buckets=_LATENCY)
ITL = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                "Time between successive generated tokens of one choice", ["endpoint"],
                buckets=_TOKEN_GAP)
E2E = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                "From request arrival to its last token", ["endpoint"], buckets=_LATENCY)
PROMPT_TOKENS = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests",
                        ["endpoint"])
GENERATION_TOKENS = Counter(f"{PREFIX}_generation_tokens",
                            "Generated tokens of finished requests", ["endpoint"])


class Timer:
    """The latency figures of one request, kept as its tokens arrive."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.start = time.perf_counter()
        # labels() is a locked dict lookup: once per request, not per token.
        self._ttft, self._itl = TTFT.labels(endpoint), ITL.labels(endpoint)
        self._first: float | None = None
        self._last: dict[int, float] = {}

    def tokens(self, choice: int, count: int) -> None:
        if not count:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._ttft.observe(now - self.start)
        last = self._last.get(choice)
        if last is not None:
            # Coalesced messages carry several tokens: spread the gap.
            gap = (now - last) / count
            for _ in range(count):
                self._itl.observe(gap)
        self._last[choice] = now

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        E2E.labels(self.endpoint).observe(time.perf_counter() - self.start)
        PROMPT_TOKENS.labels(self.endpoint).inc(prompt_tokens)
        GENERATION_TOKENS.labels(self.endpoint).inc(completion_tokens)


class _EngineCollector:
    def __init__(self, stats: pb.Stats | None):
        self.stats = stats

    def collect(self):
        up = GaugeMetricFamily("vllm_mlx_engine_up", "1 when GetStats answered this scrape")
        up.add_metric([], 0 if self.stats is None else 1)
        yield up
        if self.stats is None:
            return
        s = self.stats
        for name, value, doc in (
                ("running", s.running, "Requests in the engine's running batch"),
                ("waiting", s.waiting, "Requests in the engine's queue (queue depth)"),
                ("generation_tokens_per_second", s.generation_tokens_per_s,
                 "Engine decode throughput over the last few seconds")):
            g = GaugeMetricFamily(f"vllm_mlx_engine_{name}", doc)
            g.add_metric([], value)
            yield g
        for name, value, doc in (
                ("prefix_cache_bytes", s.cache_bytes, "KV bytes held by the engine's prefix cache"),
                ("weights_bytes", s.weights_bytes, "Bytes of the model's weights"),
                ("kv_bytes", s.kv_bytes, "KV bytes of the requests in the batch"),
                ("allocator_cache_bytes", s.allocator_cache_bytes,
                 "Freed buffers MLX keeps for reuse"),
                ("active_memory_bytes", s.active_memory_bytes, "Bytes of MLX's live arrays"),
                ("memory_limit_bytes", s.memory_limit_bytes,
                 "The limit weights + reserved KV + prefix cache are kept under"),
                ("core_rss_bytes", s.rss_bytes, "Resident memory of the engine core process")):
            g = GaugeMetricFamily(f"vllm_mlx_engine_{name}", doc)
            g.add_metric([], value)
            yield g
        # Counters of the engine process: they restart from zero with it.
        for name, value, doc in (
                ("prefix_cache_hits", s.cache_hits,
                 "Requests that reused cached KV for part of their prompt"),
                ("prefix_cache_misses", s.cache_misses,
                 "Requests that found no cached prefix"),
                ("prefix_cache_tokens_reused", s.cache_tokens_reused,
                 "Prompt tokens served from the prefix cache instead of prefilled"),
                ("prefix_cache_evictions", s.cache_evictions,
                 "Prefix-cache entries dropped to stay under its byte budget")):
            c = CounterMetricFamily(f"vllm_mlx_engine_{name}", doc)
            c.add_metric([], value)
            yield c


def render(stats: pb.Stats | None) -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    engine = CollectorRegistry()
    engine.register(_EngineCollector(stats))
    return generate_latest(registry) + generate_latest(engine)


class RequestMetrics:
    """ASGI middleware counting every response by route template (not raw
    path, which would let clients mint unbounded label values)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route, scope.get("method", ""), str(status)).inc()
