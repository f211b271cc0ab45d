"""The engine's figures, kept in the proto's own `Stats` message.

The proto defines each figure once, with what it means; the loop fills the
message in, the core sends it to the front end as is, GetStats answers with
it and the gateway's /metrics exports its fields by name.
"""

import bisect
import time
from collections import deque

import mlx.core as mx
import psutil

from engine_worker.memory import MemoryBudget
from vllm_mlx import event_loop_lag
from vllm_mlx.v1 import engine_pb2 as pb

# "prefill" is the part of "step" that mlx-lm spent in prompt passes.
LOOP_PHASES = ("admit", "encode", "step", "prefill", "handle", "publish", "idle")
RATE_WINDOW_S = 5.0
# Upper bounds of the step-time histogram's buckets, in seconds: those of
# the event-loop lag histograms, so that the two compare.
STEP_BOUNDS = event_loop_lag.BOUNDS


def new_stats() -> pb.Stats:
    stats = pb.Stats()
    for phase in LOOP_PHASES:
        stats.loop_seconds[phase] = 0.0
    stats.step_seconds_bounds.extend(STEP_BOUNDS)
    stats.step_seconds_counts.extend([0] * (len(STEP_BOUNDS) + 1))
    return stats


def record_step(stats: pb.Stats, seconds: float) -> None:
    """Count one loop iteration that took a decode step."""
    stats.step_seconds_counts[bisect.bisect_left(STEP_BOUNDS, seconds)] += 1
    stats.step_seconds_sum += seconds


class TokenRate:
    """Generated tokens per second over the last RATE_WINDOW_S."""

    def __init__(self) -> None:
        self._steps: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self._tokens = 0  # their sum

    def add(self, tokens: int) -> None:
        self._steps.append((time.monotonic(), tokens))
        self._tokens += tokens

    def per_second(self, idle: bool) -> float | None:
        """None: too few steps to say, and not idle either (keep the last figure)."""
        now = time.monotonic()
        while self._steps and now - self._steps[0][0] > RATE_WINDOW_S:
            self._tokens -= self._steps.popleft()[1]
        if len(self._steps) > 1:
            return self._tokens / max(now - self._steps[0][0], 1e-6)
        return 0.0 if idle else None


def read_memory(stats: pb.Stats, budget: MemoryBudget, kv_bytes: int) -> None:
    """MLX's and the process's memory; a few syscalls, so about once a second."""
    stats.active_memory_bytes, stats.peak_memory_bytes = (mx.get_active_memory(),
                                                          mx.get_peak_memory())
    stats.allocator_cache_bytes = mx.get_cache_memory()
    stats.kv_bytes = kv_bytes
    stats.weights_bytes, stats.memory_limit_bytes = budget.weights, budget.limit
    stats.rss_bytes = psutil.Process().memory_info().rss


def read_prefix_cache(stats: pb.Stats, cache) -> None:
    stats.cache_hits, stats.cache_misses = cache.hits, cache.misses
    stats.cache_tokens_reused, stats.cache_evictions = cache.tokens_reused, cache.evictions
    stats.cache_bytes = cache.nbytes
    stats.cache_hit_rate = cache.hit_rate()

