"""KV reuse across requests: the KV of each finished request, keyed by its
tokens (prompt + completion), serves later prompts that share a prefix with
it, so they prefill only what is new (a shared system prompt, the next turn
of a chat).

The trie, the LRU order and the copying/trimming of caches are mlx-lm's
`LRUPromptCache`; this wrapper adds the byte budget with counted evictions,
the figures for Stats, and the rule that at least one prompt token is always
left to prefill (the first sampled token needs the last prompt token's logits).
Everything here runs on the engine thread.
"""

import logging

import mlx.core as mx
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    LRUPromptCache,
    make_prompt_cache,
    trim_prompt_cache,
)

from engine_worker.memory import device_memory
from engine_worker.vision import MediaRows

log = logging.getLogger("engine")

# One engine serves one model; LRUPromptCache keys its trie by model too.
_MODEL_KEY = "model"
_MAX_DEFAULT_BYTES = 8 << 30
# A cached prefix is used only if it saves at least this many tokens of
# prefill. Using one deep-copies the whole entry; random prompts share a
# first token or two with some entry all the time, and those copies cost
# far more than prefilling two tokens: 360 µs per step of admission at 64
# streams on an H200 (docs/benchmarks.md). vLLM reuses whole 16-token
# blocks only, for the same reason.
MIN_REUSE_TOKENS = 16


def default_budget() -> int:
    """10% of the device's memory (unified memory on a Mac), at most 8 GiB."""
    return min(device_memory() // 10, _MAX_DEFAULT_BYTES)


def can_reuse(model) -> bool:
    """Only plain KV caches can be trimmed back to any prefix. Rotating
    (sliding-window) and recurrent/hybrid caches cannot, and reusing them
    would be silently wrong, so such models run without the prefix cache.
    A vision model's MediaRows entry holds no tokens: text requests to it
    still share prefixes (media requests never enter the cache)."""
    return all(type(c) is KVCache or type(c) is MediaRows for c in make_prompt_cache(model))


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        # mlx-lm's own limits are lifted: `insert` enforces the budget with
        # trim_to, so that evictions can be counted.
        self._lru = LRUPromptCache(max_size=1 << 62, max_bytes=1 << 62)
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)

    def fetch(self, prompt: list[int]) -> tuple[list | None, int]:
        """A private copy of the KV for the longest cached prefix of
        `prompt`, and that prefix's length (0 and None on a miss). The
        prefix is always shorter than the prompt."""
        if _reusable(self._lru, prompt) < MIN_REUSE_TOKENS:
            self.misses += 1
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_MODEL_KEY, prompt)
        if cache is not None and not rest:
            # A full hit: give back the last token so that it is prefilled
            # and yields the logits of the first generated token.
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        reused = len(prompt) - len(rest)
        if cache is None or reused <= 0:
            self.misses += 1
            return None, 0
        self.hits += 1
        self.tokens_reused += reused
        return cache, reused

    def insert(self, entries: list[tuple[list[int], list]], copied: bool = False) -> None:
        """Keep each (tokens, cache): the KV of exactly those tokens,
        evicting the least recently inserted entries past the byte budget.
        `copied`: the caches are rows of `split_batch`, already on their way."""
        # A finished request's KV comes out of the batch as a lazy copy of
        # its rows; until evaluated, it holds the whole batch's KV buffers
        # alive, many times its own size. Evaluate them, all of one step's in
        # one go and asynchronously, so no decode step waits for it.
        if not copied:
            mx.async_eval([a for _, cache in entries for c in cache
                           for a in (getattr(c, "keys", None), getattr(c, "values", None))
                           if a is not None])
        for tokens, cache in entries:
            self._lru.insert_cache(_MODEL_KEY, list(tokens), cache)
        before = len(self._lru)
        self._lru.trim_to(n_bytes=self.max_bytes)
        self.evictions += before - len(self._lru)

    def shrink(self, by: int) -> None:
        """Evict least recently inserted entries until `by` bytes are freed
        (or the cache is empty): running requests come before cached ones."""
        before = len(self._lru)
        self._lru.trim_to(n_bytes=max(0, self.nbytes - by))
        self.evictions += before - len(self._lru)

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)


def split_batch(layers: list) -> list[list[KVCache]] | None:
    """Each row's KV of a batch that ended as a whole (mlx-lm's BatchKVCache
    per layer, as the batch left them), or None where layers are of another
    kind. mlx-lm extracts a finished row as a copy per layer, and for a whole
    batch that is a kernel per layer and row: 3,840 for 64 rows of
    SmolLM2-135M, 59 ms of launches on an H200 each time a batch ended
    together (docs/benchmarks.md). Here each layer is copied once, without
    its padding, and each row is a slice of that copy: the copy lives while
    any of its rows is cached, and holds nothing else but the rows' padding."""
    if not layers or not all(type(c) is BatchKVCache and c.keys is not None for c in layers):
        return None
    rows: list[list[KVCache]] = [[] for _ in range(layers[0].keys.shape[0])]
    copies = []
    for c in layers:
        pads = c.left_padding.tolist()
        lo, end = min(pads), c._idx
        keys, values = mx.contiguous(c.keys[:, :, lo:end]), mx.contiguous(c.values[:, :, lo:end])
        copies += [keys, values]
        for i, pad in enumerate(pads):
            kv = KVCache()
            kv.keys = keys[i:i + 1, :, pad - lo:]
            kv.values = values[i:i + 1, :, pad - lo:]
            kv.offset = end - pad
            rows[i].append(kv)
    mx.async_eval(copies)
    return rows


def _reusable(lru: LRUPromptCache, prompt: list[int]) -> int:
    """How many prompt tokens `fetch_nearest_cache` would reuse, without the
    copy it makes. Walks the trie of mlx-lm's LRUPromptCache (it has no
    public way to ask) and mirrors that method's choice. Its own search also
    looks for the nearest longer entry, a walk of the whole subtree below the
    common prefix, which with a small vocabulary is most of the cache."""
    node = lru._trie._trie.get(_MODEL_KEY)
    if node is None:
        return 0
    depth = shorter = 0
    for token in prompt:
        node = node.get(token)
        if node is None:
            break
        depth += 1
        if "__value__" in node:
            shorter = depth
    if shorter == len(prompt):
        return shorter
    # Every node of the trie lies on the way to some entry, so a walk that
    # went past the last entry on its way ended inside a longer one.
    return max(shorter, min(len(prompt) - 1, depth))
