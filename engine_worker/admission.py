"""Which waiting requests join the batch, and when.

A policy over plain data: it sees the waiting queue and a summary of the
batch (`BatchState`), and asks the caller what a request's KV costs and
whether a total fits. It never touches MLX, so tests drive it with requests
and a clock of their own.

Why it holds requests back at all: mlx-lm's BatchGenerator prefills up to
prefill_batch_size prompts in one pass, and a pass costs about as much
whatever its size: on an H200 each extra pass cost 4 to 9 decode steps of the
whole batch (docs/benchmarks.md). Raw mlx-lm, given 64 prompts in one insert,
makes 8 passes of 8. Over gRPC they arrive spread over a few milliseconds,
and two patterns multiplied the passes:
- prompts inserted while the previous group is about to move from prefill to
  decoding: the generator tops its prefill batch up to prefill_batch_size
  counting that group, so it takes 8 - k now, k next time, and stays out of
  step: 1, 7, 1, 7, ... (16 passes for 64). Such a burst joins one step
  later, unless it fits beside the group.
- a few arrivals per step, a pass each. So while a batch decodes and requests
  keep arriving, they join in whole prefill batches, waiting at most
  admit_window_s.

It also holds back a request whose prompt is mostly a prefix that another
one is being prefilled with (a system prompt, a document that several
questions are asked about), until that pass has put the prefix in the
prefix cache: then it prefills only the rest. Prefilling the prefix again
beside the first would cost as much again on a device a prefill keeps busy:
8 requests sharing a 1,000-token prefix got their first tokens after 17.8 s
(p50) this way, 100.1 s all prefilled together (2-core CPU,
docs/benchmarks.md).
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine_worker.blocks import BLOCK_TOKENS, shared_blocks

# A media request held back for text requests joins anyway after this long.
MEDIA_HOLD_MAX_S = 0.5
# An idle engine gathers a burst until this long passes with no new arrival.
IDLE_GATHER_GAP_S = 0.001
# How long an idle engine sleeps when nothing is held back.
IDLE_WAIT_S = 0.5
# A request waits for another's prefill of a prefix they share when that
# pass computes at least this share of what the request would prefill
# (its prompt less what the prefix cache holds): waiting then saves at least
# half its prefill, even on a device where a pass costs the same whatever
# its size.
SHARED_PREFILL_WAIT = 0.5


class Waiting(Protocol):
    """What the policy reads of a request."""
    request_id: str
    media: list
    prompt: list[int]
    prefix_keys: list[int]  # blocks.block_keys of its prompt; empty: it uses no cache


@dataclass
class BatchState:
    """The batch as the last step left it."""
    running: int = 0
    kv_reserved: int = 0  # bytes of KV the running requests may grow to
    prefilling: int = 0  # prompts still in the generator's prefill batch
    prefill_turning: bool = False  # some of them move to decoding on the next step
    text_awaiting_first: bool = False  # a running text request has no token yet
    # Block keys of prompt prefixes being prefilled, which the prefix cache
    # will hold once their passes have run.
    prefill_keys: set[int] = field(default_factory=set)
    encoding: bool = False  # a media request's encoder is running


@dataclass
class Decision:
    admit: list = field(default_factory=list)  # insert these now, in order
    # Requests that alone exceed what memory leaves: they never will fit.
    too_large: list[tuple[Waiting, int]] = field(default_factory=list)


class Admission:
    def __init__(self, max_num_seqs: int, prefill_batch_size: int, admit_window_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.max_num_seqs = max_num_seqs
        self.prefill_batch_size = min(prefill_batch_size, max_num_seqs)
        self.admit_window_s = admit_window_s
        self.clock = clock
        self.waiting: deque[Waiting] = deque()
        self._arrived = 0  # arrivals since the last `choose`
        self._held_since: float | None = None  # when the current hold began
        # Whether the last busy spell ran one request at a time (a lone user
        # sending one request after another): such a user is not held.
        self._one_at_a_time = False
        self._busy_peak = 0  # most requests running at once in this busy spell
        self._media_held_since: float | None = None

    def limit(self, max_num_seqs: int) -> None:
        """Run at most `max_num_seqs` requests at once from now on."""
        self.max_num_seqs = max_num_seqs
        self.prefill_batch_size = min(self.prefill_batch_size, max_num_seqs)

    def add(self, request: Waiting) -> None:
        self.waiting.append(request)
        self._arrived += 1

    def remove(self, request_id: str) -> Waiting | None:
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                return r
        return None

    def batch_emptied(self) -> None:
        """The batch ran dry: a busy spell ended."""
        if self._busy_peak:
            self._one_at_a_time, self._busy_peak = self._busy_peak == 1, 0

    def idle_wait_s(self) -> float:
        """How long an idle loop may sleep before calling `choose` again."""
        return IDLE_GATHER_GAP_S if self._held_since is not None else IDLE_WAIT_S

    def choose(self, batch: BatchState, cost: Callable[[Waiting], int],
               fits: Callable[[int], bool],
               cached_blocks: Callable[[Waiting], int] = lambda r: 0) -> Decision:
        """Take the requests that join now off the waiting queue. `cost`: the
        KV bytes a request reserves; `fits(total)`: whether that many bytes
        of requests' KV fit (the caller may evict cached prefixes to make it
        so); `cached_blocks`: how many leading blocks of a request's prompt
        the prefix cache holds."""
        decision = Decision()
        if not self.waiting:
            self._arrived = 0
            return decision
        cap = self._cap(batch.running)
        self._arrived = 0
        if cap == 0:
            return decision
        if cap is None:
            cap = self.max_num_seqs
        if (batch.running and batch.prefill_turning
                and min(cap, len(self.waiting)) > self.prefill_batch_size - batch.prefilling):
            # The prefill batch moves to decoding on the next step, and what
            # waits would not all fit beside it: join on the step after, in
            # step with the generator.
            return decision
        # A media request's vision encoder runs beside the decode steps
        # (vision.py), and its image tokens then fill the generator's
        # prefill batch. So media requests start one at a time,
        # once the last one's encoder is done and no text request is waiting
        # or still waiting for its first token; text requests behind them go
        # ahead, and media requests keep their order.
        # One held back for MEDIA_HOLD_MAX_S joins anyway: steady text traffic
        # must not starve it.
        now = self.clock()
        media_ok = (not batch.text_awaiting_first and all(w.media for w in self.waiting)) or (
            self._media_held_since is not None
            and now - self._media_held_since >= MEDIA_HOLD_MAX_S)
        later: list[Waiting] = []  # held back, in order
        media_held, media_in_batch = False, batch.encoding
        reserved = batch.kv_reserved
        admit = decision.admit
        admitted_keys: set[int] = set()
        while self.waiting and len(admit) < cap and batch.running + len(admit) < self.max_num_seqs:
            r = self.waiting[0]
            if r.media and (media_in_batch or not media_ok):
                later.append(self.waiting.popleft())
                media_held = True
                continue
            if r.prefix_keys and (batch.prefill_keys or admitted_keys) and _waits_for_prefill(
                    r, batch.prefill_keys, admitted_keys, cached_blocks):
                later.append(self.waiting.popleft())
                continue
            need = cost(r)
            if not fits(reserved + need):
                if batch.running or admit:
                    break  # it waits for running requests to finish
                decision.too_large.append((self.waiting.popleft(), need))
                continue
            admit.append(self.waiting.popleft())
            reserved += need
            media_in_batch = media_in_batch or bool(r.media)
            admitted_keys.update(r.prefix_keys)
        self.waiting.extendleft(reversed(later))
        if not self.waiting:
            self._held_since = None  # that hold is over; the next burst starts its own
        if any(r.media for r in admit):
            self._media_held_since = None
        elif media_held and self._media_held_since is None:
            self._media_held_since = now
        self._busy_peak = max(self._busy_peak, batch.running + len(admit))
        return decision

    def _cap(self, running: int) -> int | None:
        """How many waiting requests may join now (None: all).

        While requests are still arriving (some came in since the last call),
        only whole prefill batches join; the rest wait, at most
        admit_window_s, or until a step passes with no new arrival. An idle
        engine takes no steps: there it gathers a burst until
        IDLE_GATHER_GAP_S passes with no new arrival, so a lone request waits
        only that long, and not at all when the last busy spell ran one
        request at a time.
        """
        lone_again = not running and self._one_at_a_time and len(self.waiting) == 1
        if not self._arrived or self.admit_window_s <= 0 or lone_again:
            self._held_since = None
            return None
        now = self.clock()
        if self._held_since is None:
            self._held_since = now
        elif now - self._held_since >= self.admit_window_s:
            self._held_since = None
            return None
        group = max(1, min(self.prefill_batch_size, self.max_num_seqs - running))
        return len(self.waiting) // group * group


def _waits_for_prefill(r: Waiting, prefilling: set[int], admitted: set[int],
                       cached_blocks: Callable[[Waiting], int]) -> bool:
    """Whether a prompt being prefilled (or about to be: `admitted` now)
    shares enough of what `r` would prefill for `r` to wait for its KV."""
    shared = max(shared_blocks(r.prefix_keys, prefilling), shared_blocks(r.prefix_keys, admitted))
    if not shared:
        return False
    cached = cached_blocks(r) * BLOCK_TOKENS
    return (shared * BLOCK_TOKENS - cached) >= SHARED_PREFILL_WAIT * (len(r.prompt) - cached)
