"""KV reuse across requests: the KV of each request's prompt, kept as soon
as its prefill pass has run, and of each finished request (prompt +
completion), keyed by its tokens, serves later prompts that share a prefix
with it, so they prefill only what is new (a shared system prompt, the next
turn of a chat). A prompt's KV is kept whatever becomes of its request
(finished, stopped, aborted, failed): what a pass computed stays right.

Entries are found through their 16-token blocks (blocks.py), as vLLM finds
its KV blocks: each block-aligned prefix of an entry is known by a chained
hash, and a prompt's deepest such prefix that is known names the entry that
shares the most whole blocks with it; the match then runs on token by token
inside that entry. mlx-lm's `LRUPromptCache`, which this replaced, keeps a
trie with a Python dict per token: inserting the 64 entries of one finished
batch of 160-token requests took 9.5 ms on the 2-core CPU, in the decode
loop, and a full garbage collection walks every one of those dicts
(docs/benchmarks.md). Here an entry costs a hash per block. The KV copies
and trims are mlx-lm's. At least one prompt token is always left to
prefill: the first sampled token needs the last prompt token's logits.

Past the byte budget the least recently used entries go first. Each block
key lists the most recently used entry holding it, so the entry evicted
(the least recently used of all) is never listed under a block another
entry holds: a shared system prompt stays findable while any entry has it.
With a store (prefix_store.py) the entries also live on disk, for the next
engine. Everything here runs on the engine thread.
"""

import copy
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache, trim_prompt_cache

from engine_worker import mlx_compat
from engine_worker.blocks import BLOCK_TOKENS, MediaSpan, block_keys, shared_blocks
from engine_worker.memory import device_memory
from engine_worker.vision import MediaRows

log = logging.getLogger("engine")

_MAX_DEFAULT_BYTES = 8 << 30
# Entries are found by whole blocks, so a cached prefix is used only if it
# saves at least a block of prefill. Using one deep-copies the whole entry;
# random prompts share a first token or two with some entry all the time,
# and those copies cost far more than prefilling two tokens: 360 µs per step
# of admission at 64 streams on an H200 (docs/benchmarks.md).
MIN_REUSE_TOKENS = BLOCK_TOKENS
# GetStats' hit rate covers the lookups of this many seconds.
HIT_RATE_WINDOW_S = 300.0


def default_budget() -> int:
    """10% of the device's memory (unified memory on a Mac), at most 8 GiB."""
    return min(device_memory() // 10, _MAX_DEFAULT_BYTES)


def can_reuse(model) -> bool:
    """Only plain KV caches can be trimmed back to any prefix. Rotating
    (sliding-window) and recurrent/hybrid caches cannot, and reusing them
    would be silently wrong, so such models run without the prefix cache.
    A vision model's MediaRows entry holds no tokens (vision.py)."""
    return all(type(c) is KVCache or type(c) is MediaRows for c in make_prompt_cache(model))


class BatchRow:
    """One row of a batch (`gather_rows`): its KV is sliced out of the
    batch's per-layer copies only when a prompt reuses it."""

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
    """A batch's KV as it stands (keys, values, left padding and end, per
    layer), for `gather_rows`; None where a layer is not mlx-lm's
    BatchKVCache (vision models' MediaRows)."""
    if not layers or not all(type(c) is BatchKVCache and c.keys is not None for c in layers):
        return None
    return [(c.keys, c.values, c.left_padding, mlx_compat.kv_end(c)) for c in layers]


def gather_rows(kv: list[tuple], rows: list[int]) -> list[BatchRow]:
    """The KV of `rows` of a batch (`batch_kv`): finished rows, taken as
    mlx-lm drops them, or prompts whose pass just ran. mlx-lm extracts each
    finished row as a copy per layer: for
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


def _media_before(media, n: int) -> tuple[MediaSpan, ...]:
    """The items that start among a sequence's first `n` tokens."""
    return tuple(m for m in media if m[0] < n)


@dataclass
class _Entry:
    tokens: list[int]
    cache: list | BatchRow
    nbytes: int
    keys: list[int]
    # Its images and videos: a match token by token past its whole blocks
    # stops where one starts, since placeholder tokens do not say which
    # picture they stand for.
    media: tuple[MediaSpan, ...] = ()
    saved: str = ""  # its file in the store, once written


class PrefixCache:
    def __init__(self, max_bytes: int, store=None):
        """`store`: a prefix_store.PrefixStore that keeps the entries on disk."""
        self.max_bytes = max_bytes
        self.store = store
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        # Block key -> the most recently used entry holding that block.
        self._holder: dict[int, int] = {}
        self._next_id = 0
        self._unsaved = 0  # entries not yet in the store
        self._saving = store is not None  # until writing to it fails
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.evictions = 0
        # (time, prompt tokens looked up, tokens reused) over HIT_RATE_WINDOW_S, and their sums.
        self._lookups: deque[tuple[float, int, int]] = deque()
        self._looked_up = self._reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: list[int], keys: list[int] | None = None,
              media: list[MediaSpan] = ()) -> tuple[list | None, int]:
        """A private copy of the KV for the longest cached prefix of
        `prompt`, and that prefix's length (0 and None on a miss). The
        prefix is always shorter than the prompt. `keys`: block_keys of
        prompt[:-1], when the caller has them; `media`: the prompt's items."""
        if keys is None:
            keys = block_keys(prompt[:-1], media)
        found_id, reused = self._match(prompt, keys, media)
        if found_id is None:
            self.misses += 1
            self._note_lookup(len(prompt), 0)
            return None, 0
        found = self._entries[found_id]
        cache = (found.cache.caches() if isinstance(found.cache, BatchRow)
                 else copy.deepcopy(found.cache))
        trim_prompt_cache(cache, len(found.tokens) - reused)
        self._touch(found_id)
        self.hits += 1
        self.tokens_reused += reused
        self._note_lookup(len(prompt), reused)
        return cache, reused

    def cached_tokens(self, prompt: list[int], keys: list[int],
                      media: list[MediaSpan] = ()) -> int:
        """How many tokens `fetch` would reuse, with no copy made."""
        return self._match(prompt, keys, media)[1]

    def _match(self, prompt: list[int], keys: list[int],
               media: list[MediaSpan]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length."""
        blocks = self.cached_blocks(keys)
        found_id = self._holder[keys[blocks - 1]] if blocks else None
        depth = blocks * BLOCK_TOKENS
        found = self._entries.get(found_id)
        if found is None or found.tokens[:depth] != prompt[:depth]:
            return None, 0
        reused, limit = depth, min(len(found.tokens), len(prompt) - 1,
                                   *(s for s, _, _ in (*found.media, *media) if s >= depth))
        while reused < limit and found.tokens[reused] == prompt[reused]:
            reused += 1
        return found_id, reused

    def cached_blocks(self, keys: list[int]) -> int:
        """How many leading blocks of a prompt (its block keys) the deepest
        entry that shares them holds."""
        return shared_blocks(keys, self._holder)

    def insert(self, entries: list[tuple[list[int], list | BatchRow, list[int] | None,
                                         list[MediaSpan]]]) -> None:
        """Keep each (tokens, cache, keys, media): the KV of exactly those
        tokens, their block keys (None: computed here) and the spans of the
        images and videos among them, evicting the least recently used
        entries past the byte budget. A `BatchRow`'s copy is its caller's to
        evaluate (see Batch._keep_kv)."""
        # A finished request's KV comes out of the batch as a lazy copy of
        # its rows; until evaluated, it holds the whole batch's KV buffers
        # alive, many times its own size. Evaluate them, all of one step's in
        # one go and asynchronously, so no decode step waits for it.
        mx.async_eval([a for _, cache, _, _ in entries if not isinstance(cache, BatchRow)
                       for c in cache
                       for a in (getattr(c, "keys", None), getattr(c, "values", None))
                       if a is not None])
        for tokens, cache, keys, media in entries:
            if len(tokens) >= MIN_REUSE_TOKENS:
                media = _media_before(media, len(tokens))
                self._insert(list(tokens), cache,
                             block_keys(tokens, media) if keys is None else keys, media)
        self.shrink(self.nbytes - self.max_bytes)

    def _insert(self, tokens: list[int], cache: list | BatchRow, keys: list[int],
                media: tuple[MediaSpan, ...] = (), saved: str = "") -> bool:
        """False: an entry holds these tokens already (a hit's prompt, repeated)."""
        holder = self._entries.get(self._holder.get(keys[-1])) if keys else None
        if holder is not None and holder.tokens[:len(tokens)] == tokens \
                and _media_before(holder.media, len(tokens)) == media:
            return False
        # An entry these tokens extend serves nothing the new one cannot,
        # trimmed: drop it, as mlx-lm's cache does.
        covered = {self._holder.get(k) for k in keys}
        entry_id, self._next_id = self._next_id, self._next_id + 1
        for k in keys:
            self._holder[k] = entry_id
        for old_id in covered:
            old = self._entries.get(old_id)
            if old is not None and len(old.tokens) <= len(tokens) \
                    and tokens[:len(old.tokens)] == old.tokens \
                    and old.media == _media_before(media, len(old.tokens)):
                self._remove(old_id)
        nbytes = cache.nbytes if isinstance(cache, BatchRow) else sum(c.nbytes for c in cache)
        self._entries[entry_id] = _Entry(tokens, cache, nbytes, keys, media, saved)
        self.nbytes += nbytes
        self._unsaved += not saved
        return True

    def _touch(self, entry_id: int) -> None:
        entry = self._entries[entry_id]
        self._entries.move_to_end(entry_id)
        for k in entry.keys:
            self._holder[k] = entry_id
        if entry.saved:
            self.store.touch(entry.saved)

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        for k in entry.keys:
            if self._holder.get(k) == entry_id:
                del self._holder[k]
        if entry.saved:
            self.store.delete(entry.saved)
        else:
            self._unsaved -= 1

    def shrink(self, by: int) -> None:
        """Evict least recently used entries until `by` bytes are freed (or
        the cache is empty): running requests come before cached ones."""
        target = self.nbytes - by
        while self._entries and self.nbytes > target:
            self._remove(next(iter(self._entries)))
            self.evictions += 1

    def clear(self) -> None:
        for entry_id in list(self._entries):
            self._remove(entry_id)

    # -- the hit rate ----------------------------------------------------------------

    def _note_lookup(self, prompt_tokens: int, reused: int) -> None:
        self._lookups.append((time.monotonic(), prompt_tokens, reused))
        self._looked_up += prompt_tokens
        self._reused += reused
        if len(self._lookups) > 64:
            self._forget_old()

    def _forget_old(self) -> None:
        old = time.monotonic() - HIT_RATE_WINDOW_S
        while self._lookups and self._lookups[0][0] < old:
            _, looked_up, reused = self._lookups.popleft()
            self._looked_up -= looked_up
            self._reused -= reused

    def hit_rate(self) -> float:
        """The share of prompt tokens looked up in the last HIT_RATE_WINDOW_S
        that came from the cache (0 when none were)."""
        self._forget_old()
        return self._reused / self._looked_up if self._looked_up else 0.0

    # -- the store -------------------------------------------------------------------

    def restore(self) -> int:
        """Take in what the store holds (up to the byte budget); how many entries."""
        restored = self.store.load(self.max_bytes)  # least recently used first
        for tokens, cache, name in restored:
            if not self._insert(tokens, cache, block_keys(tokens), saved=name):
                self.store.delete(name)
        self.shrink(self.nbytes - self.max_bytes)
        return len(restored)

    def save_one(self) -> bool:
        """Write the most recently used entry the store lacks; False when
        there is none."""
        if not self._saving or not self._unsaved:
            return False
        for entry in reversed(self._entries.values()):
            if not entry.saved:
                cache = (entry.cache.caches() if isinstance(entry.cache, BatchRow)
                         else entry.cache)
                try:
                    entry.saved = self.store.save(entry.tokens, cache)
                except OSError as e:  # a full or read-only disk: serve on without it
                    log.warning("prefix cache: writing to %s failed (%s); writing no more",
                                self.store.folder, e)
                    self._saving = False
                    return False
                self._unsaved -= 1
                return True
        return False
