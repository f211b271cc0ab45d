"""The engine's memory budget: weights + the KV every admitted request may
grow to + the prefix cache stay under one limit, so a burst of long requests
waits instead of pushing the process into an out-of-memory kill (on a Mac,
unified memory shared with everything else).

Each admitted request reserves KV for its whole prompt plus max_tokens: a
request never runs out of room halfway.
"""

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from engine_worker import mlx_compat

DEFAULT_LIMIT_FRACTION = 0.9
# Of the memory limit, what MLX's allocator may keep of freed buffers for reuse.
DEFAULT_ALLOCATOR_CACHE_FRACTION = 0.05


def device_memory() -> int:
    """Bytes of memory the device can use: unified memory on a Mac, GPU
    memory on CUDA; on a CPU, which mlx does not size, the machine's RAM."""
    return int(mx.device_info().get("memory_size")
               or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def kv_bytes_per_token(model: nn.Module) -> int:
    """KV bytes one token of one sequence takes, read off a real cache after a
    one-token forward (so dtype, GQA and head sizes are the model's own)."""
    cache = make_prompt_cache(model)
    model(mx.array([[1]]), cache=cache)
    total = 0
    for c in cache:
        for a in (getattr(c, "keys", None), getattr(c, "values", None)):
            if a is not None:  # [batch, kv heads, allocated steps, head dim]
                total += a.nbytes // a.shape[2]
    return total


@dataclass
class MemoryBudget:
    limit: int
    weights: int
    kv_per_token: int
    # Freed buffers MLX may keep for reuse (keep_allocator_cache): resident
    # though no array uses them, so the budget sets them aside too.
    allocator_cache: int = 0

    def request_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.kv_per_token

    @property
    def for_requests(self) -> int:
        """What the limit leaves beside the weights and the buffer cache:
        the KV of admitted requests and the prefix cache share it."""
        return self.limit - self.weights - self.allocator_cache


def keep_allocator_cache(limit: int) -> None:
    """Let MLX's allocator keep up to `limit` bytes of freed buffers for
    reuse, instead of mlx-lm emptying its cache after every prefill pass.

    On CUDA, emptying it frees device memory, which waits for the device,
    and the next steps allocate it all again: an image request's prefill
    steps took 123 ms instead of 17 ms, and quiet decode steps 16% longer
    (docs/benchmarks.md). The limit keeps the cache bounded, which is what
    the emptying was for. For this process only: mlx-lm's generate module
    gets a view of mlx.core whose clear_cache does nothing.
    """
    mx.set_cache_limit(limit)
    mlx_compat.keep_freed_buffers_in_generate()


def set_up_memory(model: nn.Module, max_memory: int | None,
                  allocator_cache_bytes: int | None) -> MemoryBudget:
    """The budget of a freshly loaded model (its weights are MLX's live
    memory now), with MLX's allocator cache set aside inside the limit."""
    limit = max_memory or int(device_memory() * DEFAULT_LIMIT_FRACTION)
    budget = MemoryBudget(limit, mx.get_active_memory(), kv_bytes_per_token(model))
    if budget.for_requests <= 0:
        raise MemoryError(f"the weights take {budget.weights} bytes, more than the "
                          f"memory limit of {limit} bytes")
    cache_bytes = allocator_cache_bytes
    if cache_bytes is None:
        cache_bytes = int(limit * DEFAULT_ALLOCATOR_CACHE_FRACTION)
    if cache_bytes > 0:
        keep_allocator_cache(cache_bytes)
        budget.allocator_cache = cache_bytes
    return budget


def make_room(budget: MemoryBudget, prefix_cache, requests_bytes: int) -> bool:
    """Whether weights + the buffer cache + `requests_bytes` of KV + the
    prefix cache fit the limit, evicting cached prefixes first if that is
    what it takes."""
    over = requests_bytes - budget.for_requests
    if prefix_cache is not None:
        over += prefix_cache.nbytes
        if over > 0:
            prefix_cache.shrink(over)
            over = requests_bytes + prefix_cache.nbytes - budget.for_requests
    return over <= 0
