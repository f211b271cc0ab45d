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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.multiprocess import MultiProcessCollector

from vllm_mlx import event_loop_lag
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
LOOP_LAG = Histogram(f"{PREFIX}_event_loop_lag_seconds",
                     "How late the event loop, which forwards every stream, woke for what "
                     "fell due; checked every few ms while requests are in flight",
                     buckets=event_loop_lag.BOUNDS)


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


# Every field of the engine's Stats message (engine.proto says what each
# means) and the metric it becomes: name (after vllm_mlx_engine_), kind, help.
# Counters restart from zero with the engine process.
ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "running": ("running", "gauge", "Requests in the engine's running batch"),
    "waiting": ("waiting", "gauge", "Requests in the engine's queue (queue depth)"),
    "in_flight": ("in_flight", "gauge",
                  "Requests the engine holds: running, waiting, or on their way in"),
    "generation_tokens_per_s": ("generation_tokens_per_second", "gauge",
                                "Engine decode throughput over the last few seconds"),
    "prompt_tokens_total": ("prompt_tokens", "counter", "Prompt tokens the engine admitted"),
    "generation_tokens_total": ("generation_tokens", "counter", "Tokens the engine generated"),
    "requests_total": ("requests", "counter", "Requests the engine accepted"),
    "requests_rejected": ("requests_rejected", "counter",
                          "Requests refused because the queue was full"),
    "cache_hits": ("prefix_cache_hits", "counter",
                   "Requests that reused cached KV for part of their prompt"),
    "cache_misses": ("prefix_cache_misses", "counter", "Requests that found no cached prefix"),
    "cache_tokens_reused": ("prefix_cache_tokens_reused", "counter",
                            "Prompt tokens served from the prefix cache instead of prefilled"),
    "cache_evictions": ("prefix_cache_evictions", "counter",
                        "Prefix-cache entries dropped to stay under its byte budget"),
    "cache_bytes": ("prefix_cache_bytes", "gauge", "KV bytes held by the engine's prefix cache"),
    "cache_hit_rate": ("prefix_cache_hit_rate", "gauge",
                       "Share of prompt tokens served by the prefix cache, last 5 minutes"),
    "weights_bytes": ("weights_bytes", "gauge", "Bytes of the model's weights"),
    "kv_bytes": ("kv_bytes", "gauge", "KV bytes of the requests in the batch"),
    "allocator_cache_bytes": ("allocator_cache_bytes", "gauge",
                              "Freed buffers MLX keeps for reuse"),
    "active_memory_bytes": ("active_memory_bytes", "gauge", "Bytes of MLX's live arrays"),
    "peak_memory_bytes": ("peak_memory_bytes", "gauge", "Most bytes MLX's arrays ever took"),
    "rss_bytes": ("core_rss_bytes", "gauge", "Resident memory of the engine core process"),
    "memory_limit_bytes": ("memory_limit_bytes", "gauge",
                           "The limit weights + reserved KV + prefix cache are kept under"),
    "steps": ("steps", "counter", "Decode steps the engine loop took"),
    "prefill_passes": ("prefill_passes", "counter", "Decode steps that also ran a prompt pass"),
    "loop_seconds": ("loop_seconds", "counter",
                     "Where the engine loop's time went, by phase (see engine.proto)"),
    "step_seconds_counts": ("step_seconds", "histogram",
                            "Wall time of the engine loop's iterations that took a decode step"),
    "event_loop_lag_seconds_counts": ("front_end_event_loop_lag_seconds", "histogram",
                                      "How late the engine front end's event loop woke for "
                                      "what fell due, while requests were in flight"),
}
# The proto fields beside each histogram's counts (ENGINE_METRICS names the counts).
HISTOGRAM_PARTS = ("_bounds", "_sum")


class _EngineCollector:
    def __init__(self, stats: pb.Stats | None):
        self.stats = stats

    def collect(self):
        up = GaugeMetricFamily("vllm_mlx_engine_up", "1 when GetStats answered this scrape")
        up.add_metric([], 0 if self.stats is None else 1)
        yield up
        if self.stats is None:
            return
        for field, (name, kind, doc) in ENGINE_METRICS.items():
            if kind == "histogram":
                yield _histogram(self.stats, field, f"vllm_mlx_engine_{name}", doc)
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            value = getattr(self.stats, field)
            if field == "loop_seconds":
                metric = family(f"vllm_mlx_engine_{name}", doc, labels=["phase"])
                for phase, seconds in sorted(value.items()):
                    metric.add_metric([phase], seconds)
            else:
                metric = family(f"vllm_mlx_engine_{name}", doc)
                metric.add_metric([], value)
            yield metric


def _histogram(stats: pb.Stats, field: str, name: str, doc: str) -> HistogramMetricFamily:
    """A histogram the proto carries as FIELD (per-bucket counts, the last
    one past every bound) beside its `_bounds` and `_sum`."""
    base = field.removesuffix("_counts")
    bounds, counts = getattr(stats, base + "_bounds"), getattr(stats, field)
    buckets, total = [], 0
    for bound, count in zip([*map(repr, bounds), "+Inf"], counts):
        total += count
        buckets.append((bound, total))
    return HistogramMetricFamily(name, doc, buckets=buckets,
                                 sum_value=getattr(stats, base + "_sum"))


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
    path, which would let clients mint unbounded label values); the event
    loop's lag is watched while any response is under way."""

    def __init__(self, app, watch: event_loop_lag.LagWatch):
        self.app, self.watch = app, watch

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.watch.begin()
        try:
            await self.app(scope, receive, record)
        finally:
            self.watch.end()
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route, scope.get("method", ""), str(status)).inc()
