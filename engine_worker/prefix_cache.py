"""KV reuse across requests: the KV of each finished request, keyed by its
tokens (prompt + completion), serves later prompts that share a prefix with
it, so they prefill only what is new (a shared system prompt, the next turn
of a chat).

Entries are found through their 16-token blocks, as vLLM finds its KV
blocks: each block-aligned prefix of an entry is known by a chained hash,
and a prompt's deepest such prefix that is known names the entry that
shares the most whole blocks with it; the match then runs on token by
token inside that entry. mlx-lm's `LRUPromptCache`, which this replaced,
keeps a trie with a Python dict per token: inserting the 64 entries of one
finished batch of 160-token requests took 9.5 ms on the 2-core CPU, in the
decode loop, and a full garbage collection walks every one of those dicts
(docs/benchmarks.md). Here an entry costs a hash per block. The KV copies
and trims are mlx-lm's. At least one prompt token is always left to
prefill: the first sampled token needs the last prompt token's logits.
Everything here runs on the engine thread.
"""

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache, trim_prompt_cache

from engine_worker import mlx_compat
from engine_worker.memory import device_memory
from engine_worker.vision import MediaRows

log = logging.getLogger("engine")

_MAX_DEFAULT_BYTES = 8 << 30
# Entries are found by whole blocks of this many tokens, so a cached prefix
# is used only if it saves at least this much prefill. Using one deep-copies
# the whole entry; random prompts share a first token or two with some entry
# all the time, and those copies cost far more than prefilling two tokens:
# 360 µs per step of admission at 64 streams on an H200 (docs/benchmarks.md).
BLOCK_TOKENS = 16
MIN_REUSE_TOKENS = BLOCK_TOKENS


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


class BatchRow:
    """One finished row of a batch (`finished_rows`): its KV is
    sliced out of the batch's per-layer copies only when a prompt reuses it."""

    __slots__ = ("layers", "row")

    def __init__(self, layers: list[tuple[mx.array, mx.array, list[int]]], row: int):
        self.layers = layers  # per layer: keys, values, each row's first position
        self.row = row

    @property
    def nbytes(self) -> int:
        n = 0
        for keys, values, starts in self.layers:
            kept = (keys.shape[2] - starts[self.row]) / (keys.shape[0] * keys.shape[2])
            n += int((keys.nbytes + values.nbytes) * kept)
        return n

    def caches(self) -> list[KVCache]:
        out = []
        for keys, values, starts in self.layers:
            kv = KVCache()
            i, start = self.row, starts[self.row]
            kv.keys, kv.values = keys[i:i + 1, :, start:], values[i:i + 1, :, start:]
            kv.offset = keys.shape[2] - start
            out.append(kv)
        return out


def batch_kv(layers: list) -> list[tuple] | None:
    """The decoding batch's KV as it stands (keys, values, left padding and
    end, per layer), for `finished_rows`; None where a layer is not mlx-lm's
    BatchKVCache (vision models' MediaRows)."""
    if not layers or not all(type(c) is BatchKVCache and c.keys is not None for c in layers):
        return None
    return [(c.keys, c.values, c.left_padding, mlx_compat.kv_end(c)) for c in layers]


def finished_rows(kv: list[tuple], rows: list[int]) -> list[BatchRow]:
    """The KV of the finished `rows` of a batch (`batch_kv`, taken as mlx-lm
    drops them). mlx-lm extracts each finished row as a copy per layer: for
    a batch ending together that is a kernel per layer and row (3,840 for
    64 rows of SmolLM2-135M, 59 ms of launches on an H200), and until
    evaluated each copy holds the whole batch's KV alive. Here the rows are
    gathered into one copy per layer, without their padding, and a row is
    sliced out of it only if a prompt reuses it: the copy lives while any of
    its rows is cached, and holds nothing else but the rows' padding."""
    index = mx.array(rows)
    copies = []
    for keys, values, left_padding, end in kv:
        pads = left_padding.tolist()
        lo = min(pads[r] for r in rows)
        copies.append((mx.contiguous(keys[index, :, lo:end]),
                       mx.contiguous(values[index, :, lo:end]),
                       [pads[r] - lo for r in rows]))
    return [BatchRow(copies, i) for i in range(len(rows))]


def block_keys(tokens: list[int]) -> Iterator[int]:
    """The key of each block-aligned prefix of `tokens`, shortest first: a
    hash of the previous key and the block, so equal keys mean equal
    prefixes (up to hash collisions, which `fetch` rules out)."""
    key = 0
    for end in range(BLOCK_TOKENS, len(tokens) + 1, BLOCK_TOKENS):
        key = hash((key, *tokens[end - BLOCK_TOKENS:end]))
        yield key


@dataclass
class _Entry:
    tokens: list[int]
    cache: list | BatchRow
    nbytes: int
    keys: list[int]


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        # Block-aligned prefix key -> the newest entry that starts with it.
        self._newest: dict[int, int] = {}
        self._next_id = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: list[int]) -> tuple[list | None, int]:
        """A private copy of the KV for the longest cached prefix of
        `prompt`, and that prefix's length (0 and None on a miss). The
        prefix is always shorter than the prompt."""
        found, depth = None, 0
        # The newest entry holding the prompt's deepest known block prefix.
        for blocks, key in enumerate(block_keys(prompt[:-1]), 1):
            entry = self._entries.get(self._newest.get(key, -1))
            if entry is not None:
                found, depth = entry, blocks * BLOCK_TOKENS
        if found is None or found.tokens[:depth] != prompt[:depth]:
            self.misses += 1
            return None, 0
        reused, limit = depth, min(len(found.tokens), len(prompt) - 1)
        while reused < limit and found.tokens[reused] == prompt[reused]:
            reused += 1
        cache = (found.cache.caches() if isinstance(found.cache, BatchRow)
                 else copy.deepcopy(found.cache))
        trim_prompt_cache(cache, len(found.tokens) - reused)
        self.hits += 1
        self.tokens_reused += reused
        return cache, reused

    def insert(self, entries: list[tuple[list[int], list | BatchRow]]) -> None:
        """Keep each (tokens, cache): the KV of exactly those tokens,
        evicting the least recently inserted entries past the byte budget.
        A `BatchRow`'s copy is its caller's to evaluate (see Engine._keep_kv)."""
        # A finished request's KV comes out of the batch as a lazy copy of
        # its rows; until evaluated, it holds the whole batch's KV buffers
        # alive, many times its own size. Evaluate them, all of one step's in
        # one go and asynchronously, so no decode step waits for it.
        mx.async_eval([a for _, cache in entries if not isinstance(cache, BatchRow)
                       for c in cache
                       for a in (getattr(c, "keys", None), getattr(c, "values", None))
                       if a is not None])
        for tokens, cache in entries:
            if len(tokens) >= MIN_REUSE_TOKENS:
                self._insert(list(tokens), cache)
        self.shrink(self.nbytes - self.max_bytes)

    def _insert(self, tokens: list[int], cache: list | BatchRow) -> None:
        keys = list(block_keys(tokens))
        # An entry these tokens extend (or repeat) serves nothing the new one
        # cannot, trimmed: drop it, as mlx-lm's cache does.
        covered = {self._newest.get(k) for k in keys}
        entry_id, self._next_id = self._next_id, self._next_id + 1
        for k in keys:
            self._newest[k] = entry_id
        for old_id in covered:
            old = self._entries.get(old_id)
            if old is not None and len(old.tokens) <= len(tokens) \
                    and tokens[:len(old.tokens)] == old.tokens:
                self._remove(old_id)
        nbytes = cache.nbytes if isinstance(cache, BatchRow) else sum(c.nbytes for c in cache)
        self._entries[entry_id] = _Entry(tokens, cache, nbytes, keys)
        self.nbytes += nbytes

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        for k in entry.keys:
            if self._newest.get(k) == entry_id:
                del self._newest[k]

    def shrink(self, by: int) -> None:
        """Evict least recently inserted entries until `by` bytes are freed
        (or the cache is empty): running requests come before cached ones."""
        target = self.nbytes - by
        while self._entries and self.nbytes > target:
            self._remove(next(iter(self._entries)))
            self.evictions += 1

    def clear(self) -> None:
        for entry_id in list(self._entries):
            self._remove(entry_id)
