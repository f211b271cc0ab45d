"""The engine loop: one thread owns the model and every MLX call.

Requests arrive from any thread through `submit` and `abort`; the loop admits
them into mlx-lm's BatchGenerator between decode steps, turns each step's
tokens into `StepOutputs` and hands them, one per step, to `publish`.
Outputs carry token ids only: turning them into text (detokenizing, stop
strings) is the front end's job, in a process of its own, so the decode loop
does as little per token as it can (docs/benchmarks.md).
"""

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import psutil
from mlx_lm.generate import BatchGenerator, StopSequences

from engine_worker import mlx_compat, prefill
from engine_worker.memory import (
    DEFAULT_ALLOCATOR_CACHE_FRACTION,
    DEFAULT_LIMIT_FRACTION,
    MemoryBudget,
    device_memory,
    keep_allocator_cache,
    kv_bytes_per_token,
)
from engine_worker.messages import (
    DuplicateRequest,
    Output,
    QueueFull,
    Request,
    StepOutputs,
    TokenLogprob,
)
from engine_worker.model import LoadedModel
from engine_worker.prefix_cache import (
    PrefixCache,
    batch_kv,
    can_reuse,
    default_budget,
    finished_rows,
)
from engine_worker.sampling import make_processors, make_sampler
from engine_worker.vision import BatchedVisionLM
from vllm_mlx.settings import EngineSettings

log = logging.getLogger("engine")

# Lets tests make one request fail inside the batch; never set in production.
FAULT_INJECTION = os.environ.get("VLLM_MLX_FAULT_INJECTION") == "1"
STATS_WINDOW_S = 5.0
# "prefill" is the part of "step" that mlx-lm spent in prompt passes.
LOOP_PHASES = ("admit", "step", "prefill", "handle", "publish", "idle")
MEDIA_HOLD_MAX_S = 0.5  # see Engine._admit
IDLE_GATHER_GAP_S = 0.001  # see Engine._admission_cap


@dataclass
class _Running:
    request: Request
    failure: str = ""  # set by a guarded sampler or processor that raised


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    generation_tokens_per_s: float = 0.0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: int = 0
    requests_rejected: int = 0
    active_memory_bytes: int = 0
    peak_memory_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_tokens_reused: int = 0
    cache_bytes: int = 0
    cache_evictions: int = 0
    weights_bytes: int = 0
    kv_bytes: int = 0
    allocator_cache_bytes: int = 0
    rss_bytes: int = 0
    memory_limit_bytes: int = 0
    loop_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOOP_PHASES, 0.0))
    steps: int = 0
    prefill_passes: int = 0  # steps in which mlx-lm also ran a prompt pass


class Engine:
    def __init__(self, settings: EngineSettings,
                 load: Callable[[EngineSettings], LoadedModel],
                 publish: Callable[[StepOutputs], None],
                 on_ready: Callable[[BaseException | None], None] = lambda error: None):
        self.settings = settings
        self._on_ready = on_ready
        self._load = load
        self.loaded: LoadedModel | None = None  # set by the engine thread before `ready`
        self.memory: MemoryBudget | None = None  # likewise
        self.load_error: BaseException | None = None
        self._publish = publish
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # guarded by _lock
        self._queued = 0  # submitted, not yet admitted; guarded by _lock
        self._waiting: deque[Request] = deque()
        self._arrived = 0  # requests the last inbox drain brought in
        self._held_since: float | None = None  # when _admit began holding arrivals
        # Whether the last busy spell ran one request at a time (a lone user
        # sending one request after another): see _admission_cap.
        self._one_at_a_time = False
        self._busy_peak = 0  # most requests running at once in this busy spell
        # From the last step: prompts still in the generator's prefill batch,
        # and whether some of them move to decoding on the next step.
        self._prefilling = 0
        self._prefill_turning = False
        self._running: dict[int, _Running] = {}  # BatchGenerator uid -> state
        self._logprob_uids: set[int] = set()  # running requests that asked for logprobs
        # Running requests that asked for their prompt's logprobs, until their
        # first token carries them out.
        self._prompt_scores: dict[int, prefill.PromptScores] = {}
        # Text requests in the batch that have not produced a token yet, and
        # since when a media request has been held back for them.
        self._awaiting_first: set[int] = set()
        self._media_held_since: float | None = None
        self._outbox = StepOutputs()
        self._step_tokens: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self._window_tokens = 0  # their sum
        self._prefix: PrefixCache | None = None  # set at load unless turned off
        self._dropped_from: tuple | None = None  # (uids, KV); see _new_generator
        self._copies_to_evaluate: list[mx.array] = []  # see _keep_kv
        self.stats = Stats()
        self.ready = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- any thread --------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a thread of its own."""
        self._thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until `stop`."""
        self._run()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self._lock:
            if request.request_id in self._in_flight:
                raise DuplicateRequest(request.request_id)
            # Running plus waiting, as the front end counts (messages.QueueFull):
            # counting only the waiting ones refused requests the front end
            # had let through whenever memory kept the batch below
            # max_num_seqs.
            limit = self.settings.max_num_seqs + self.settings.max_queue
            if len(self._in_flight) >= limit:
                self.stats.requests_rejected += 1
                raise QueueFull(f"{len(self._in_flight)} requests are in flight")
            self._in_flight.add(request.request_id)
            self._queued += 1
            self.stats.requests_total += 1
        self._inbox.put(("add", request))
        self._wake.set()

    def clear_prefix_cache(self) -> None:
        self._inbox.put(("clear", None))
        self._wake.set()

    def abort(self, request_id: str, keep_kv: bool = False) -> bool:
        """End a request. `keep_kv`: it ended normally (the front end found a
        stop string), so its KV may serve later prompts."""
        with self._lock:
            found = request_id in self._in_flight
        if found:
            self._inbox.put(("abort", (request_id, keep_kv)))
            self._wake.set()
        return found

    # -- the engine thread -------------------------------------------------

    def _new_generator(self) -> BatchGenerator:
        s = self.settings
        gen = BatchGenerator(
            self.loaded.model,
            completion_batch_size=s.max_num_seqs,
            prefill_batch_size=min(s.prefill_batch_size, s.max_num_seqs),
            prefill_step_size=s.prefill_step_size,
        )
        # mlx-lm drops finished rows from its decoding batch (one object for
        # the generator's life) with `filter`, right after the step that
        # wrote their last KV: the batch's rows and KV as they were then are
        # what `_keep_kv` copies finished rows from.
        decoding = mlx_compat.decoding_batch(gen)
        drop_rows = type(decoding).filter

        def filter_noting_kv(keep: list[int]) -> None:
            if self._dropped_from is None:  # the step's own, not a later removal's
                kv = batch_kv(decoding.prompt_cache)
                self._dropped_from = kv and (list(decoding.uids), kv)
            drop_rows(decoding, keep)

        decoding.filter = filter_noting_kv
        mlx_compat.install_decode_step(decoding, self._logprob_uids)
        prefill.install(mlx_compat.prompt_batch(gen), self._prompt_scores)
        return gen

    def _run(self) -> None:
        # Loading evaluates the weights, so it too belongs to this thread.
        try:
            self.loaded = self._load(self.settings)
            self.memory = self._measure_memory()
            cache_bytes = self.settings.allocator_cache_bytes
            if cache_bytes is None:
                cache_bytes = int(self.memory.limit * DEFAULT_ALLOCATOR_CACHE_FRACTION)
            if cache_bytes > 0:
                keep_allocator_cache(cache_bytes)
                self.memory.allocator_cache = cache_bytes
            self._gen = self._new_generator()
            self._prefix = self._new_prefix_cache()
            if self.settings.warmup:
                self._warm_up()
        except BaseException as e:
            log.exception("loading %s failed", self.settings.model)
            self.load_error = e
            self.ready.set()
            self._on_ready(e)
            return
        self.ready.set()
        self._on_ready(None)
        log.info("engine ready")
        last_memory_read = 0.0
        spent = self.stats.loop_seconds
        clock = time.perf_counter
        while not self._stopping:
            t0 = clock()
            self._drain_inbox()
            self._admit()
            t1 = clock()
            spent["admit"] += t1 - t0
            if not self._running:
                if self._busy_peak:
                    self._one_at_a_time, self._busy_peak = self._busy_peak == 1, 0
                self._evaluate_copies()
                if t1 - last_memory_read > 1.0:
                    last_memory_read = t1
                    self._read_memory()
                # Publish even when there is nothing to say: the stats go with it.
                self._update_stats(idle=True)
                self._flush(always=True)
                self._wake.wait(IDLE_GATHER_GAP_S if self._held_since is not None else 0.5)
                self._wake.clear()
                spent["idle"] += clock() - t1
                continue
            try:
                prompt_time = mlx_compat.prompt_seconds(self._gen)  # mlx-lm's own timing
                self._dropped_from = None
                prompt_responses, responses = self._gen.next()
                self._evaluate_copies()
                t2 = clock()
                spent["prefill"] += mlx_compat.prompt_seconds(self._gen) - prompt_time
                self._note_prefill(prompt_responses)
                self._handle(responses)
            except Exception as e:  # a failure we cannot pin on one request
                log.exception("batch step failed; failing the running requests")
                self._fail_all(f"engine step failed: {e}")
                self._gen = self._new_generator()
                self._note_prefill([])
                t2 = clock()
            t3 = clock()
            self._flush()
            t4 = clock()
            spent["step"] += t2 - t1
            spent["handle"] += t3 - t2
            spent["publish"] += t4 - t3
            self.stats.steps += 1
            if t4 - last_memory_read > 1.0:
                last_memory_read = t4
                self._read_memory()
        self._fail_all("engine shutting down")
        self._flush()

    def _new_prefix_cache(self) -> PrefixCache | None:
        s = self.settings
        if not s.prefix_cache:
            return None
        if not can_reuse(self.loaded.model):
            log.warning("prefix cache off: this model's KV cache cannot be trimmed "
                        "(sliding-window or recurrent layers)")
            return None
        budget = s.prefix_cache_bytes if s.prefix_cache_bytes is not None else default_budget()
        log.info("prefix cache on, budget %.1f MiB", budget / 2**20)
        return PrefixCache(budget)

    def _measure_memory(self) -> MemoryBudget:
        limit = self.settings.max_memory or int(device_memory() * DEFAULT_LIMIT_FRACTION)
        budget = MemoryBudget(limit, mx.get_active_memory(),
                              kv_bytes_per_token(self.loaded.model))
        log.info("memory: limit %.2f GB, weights %.2f GB, KV %d bytes per token",
                 limit / 1e9, budget.weights / 1e9, budget.kv_per_token)
        if budget.for_requests <= 0:
            raise MemoryError(f"the weights take {budget.weights} bytes, more than the "
                              f"memory limit of {limit} bytes")
        return budget

    def _warm_up(self) -> None:
        # Two prompts of different lengths exercise both the padded prefill
        # and the decode kernels, which on a GPU compile on first use.
        tic = time.perf_counter()
        self._gen.insert([[1, 2, 3], [4, 5, 6, 7, 8]], max_tokens=[4, 4])
        while self._gen.next_generated():
            pass
        model = self.loaded.model
        if isinstance(model, BatchedVisionLM):
            # And the vision encoder, and an image request joining text
            # requests that are decoding: without this, the first text
            # request once image traffic began waited 2.5 to 3 s on an H200
            # (docs/benchmarks.md).
            prompt, media = model.warm_up_request()
            self._gen.insert([[1, 2, 3], [4, 5]], max_tokens=[8, 8])
            self._gen.next()
            self._gen.insert([prompt], max_tokens=[2], caches=[model.cache_for(prompt, media)])
            while self._gen.next_generated():
                pass
        log.info("warm-up took %.2fs", time.perf_counter() - tic)

    def _drain_inbox(self) -> None:
        self._arrived = 0
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._waiting.append(item)
                self._arrived += 1
            elif kind == "clear":
                if self._prefix is not None:
                    self._prefix.clear()
                self._update_stats()
            else:
                self._abort(*item)

    def _abort(self, request_id: str, keep_kv: bool) -> None:
        for r in self._waiting:
            if r.request_id == request_id:
                self._waiting.remove(r)
                with self._lock:
                    self._queued -= 1
                self._finish(r, Output(request_id, None, "abort"))
                return
        for uid, state in self._running.items():
            if state.request.request_id == request_id:
                keep_kv = keep_kv and self._prefix is not None and not state.request.media
                kept = self._gen.remove([uid], return_prompt_caches=keep_kv)
                if keep_kv and uid in kept:
                    cache, tokens = kept[uid]
                    self._keep_kv([(tokens, cache, uid)])
                self._finish_uid(uid, "abort")
                return

    # -- admission: whole prefill batches ------------------------------------
    #
    # mlx-lm's BatchGenerator prefills up to prefill_batch_size prompts in one
    # pass, and a pass costs about as much whatever its size: on an H200 each
    # extra pass cost 4 to 9 decode steps of the whole batch (not broken down;
    # mlx-lm syncs and frees its allocator cache after each, and merges the
    # new KV into the batch; docs/benchmarks.md). Raw mlx-lm, given 64 prompts
    # in one insert, makes 8 passes of 8. Over gRPC they arrive spread over a
    # few milliseconds, and two patterns multiplied the passes:
    # - prompts inserted while the previous group is about to move from
    #   prefill to decoding: the generator tops its prefill batch up to
    #   prefill_batch_size counting that group, so it takes 8 - k now, k next
    #   time, and stays out of step: 1, 7, 1, 7, ... (16 passes for 64). So
    #   such a burst joins one step later, unless it fits beside the group.
    # - a few arrivals per step, a pass each. So while a batch decodes and
    #   requests keep arriving, they join in whole prefill batches, waiting
    #   at most admit_window_s.

    def _note_prefill(self, prompt_responses) -> None:
        # The engine inserts plain prompts, which mlx-lm splits into two
        # segments (all but the last token, then the last token): one whose
        # first segment has just ended moves to decoding on the next step.
        staying = [p for p in prompt_responses if not p.end_of_prompt]
        self.stats.prefill_passes += bool(staying)
        self._prefilling = len(staying)
        self._prefill_turning = any(p.end_of_segment for p in staying)

    def _admission_cap(self) -> int | None:
        """How many waiting requests may join the batch now (None: all).

        While requests are still arriving (some came in during the last step),
        only whole prefill batches join; the rest wait, at most
        admit_window_s, or until a step passes with no new arrival. An idle
        engine takes no steps: there it gathers a burst until IDLE_GATHER_GAP_S
        passes with no new arrival, so a lone request waits only that long,
        and not at all when the last busy spell ran one request at a time.
        """
        s = self.settings
        lone_again = not self._running and self._one_at_a_time and len(self._waiting) == 1
        if not self._arrived or s.admit_window_s <= 0 or lone_again:
            self._held_since = None
            return None
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        elif now - self._held_since >= s.admit_window_s:
            self._held_since = None
            return None
        group = max(1, min(s.prefill_batch_size, s.max_num_seqs - len(self._running)))
        return len(self._waiting) // group * group

    def _admit(self) -> None:
        if not self._waiting:
            return
        cap = self._admission_cap()
        if cap == 0:
            return
        if cap is None:
            cap = self.settings.max_num_seqs
        if (self._running and self._prefill_turning and min(cap, len(self._waiting))
                > self.settings.prefill_batch_size - self._prefilling):
            # The prefill batch moves to decoding on the next step, and what
            # waits would not all fit beside it: join on the step after, in
            # step with the generator.
            return
        batch: list[tuple[Request, object, list]] = []
        reserved = sum(self._reservation(st.request) for st in self._running.values())
        # A media request's vision encoder runs on this thread before the
        # step, and its image tokens then fill the generator's prefill batch:
        # every other request waits for both (about 23 ms for one 1080p image
        # with Qwen2-VL on an H200; 0.85 s of encoder alone on a 2-core CPU).
        # So media requests join one per step, and only once no text request
        # is waiting or still waiting for its first token; text requests
        # behind them go ahead, and media requests keep their order. One held
        # back for MEDIA_HOLD_MAX_S joins anyway: steady text traffic must
        # not starve it.
        media_ok = (not self._awaiting_first and all(w.media for w in self._waiting)) or (
            self._media_held_since is not None
            and time.monotonic() - self._media_held_since >= MEDIA_HOLD_MAX_S)
        later_media: list[Request] = []
        media_in_batch = False
        while (self._waiting and len(batch) < cap
               and len(self._running) + len(batch) < self.settings.max_num_seqs):
            r = self._waiting[0]
            if r.media and (media_in_batch or not media_ok):
                later_media.append(self._waiting.popleft())
                continue
            need = self._reservation(r)
            if not self._make_room(reserved + need):
                if self._running or batch:
                    break  # it waits for running requests to finish
                self._waiting.popleft()  # alone it cannot fit: it never will
                with self._lock:
                    self._queued -= 1
                self._finish(r, Output(r.request_id, None, "error",
                                       error=f"the request needs {need} bytes of KV cache, "
                                             f"more than the memory limit leaves"))
                continue
            self._waiting.popleft()
            reserved += need
            with self._lock:
                self._queued -= 1
            state = _Running(r)
            batch.append((r, state, self._guarded(state)))
            media_in_batch = media_in_batch or bool(r.media)
        self._waiting.extendleft(reversed(later_media))
        if not self._waiting:
            self._held_since = None  # that hold is over; the next burst starts its own
        if media_in_batch:
            self._media_held_since = None
        elif later_media and self._media_held_since is None:
            self._media_held_since = time.monotonic()
        if not batch:
            return
        # Each prompt prefills only what follows its longest cached prefix.
        caches, cached, ok = [], [], []
        for entry in batch:
            r = entry[0]
            try:
                cache, n = self._initial_cache(r)
            except Exception as e:  # bad media tensors: this request only
                log.exception("request %s: encoding its media failed", r.request_id)
                self._finish(r, Output(r.request_id, None, "error",
                                       error=f"encoding the media failed: {e}"))
                continue
            ok.append(entry)
            caches.append(cache)
            cached.append(n)
        batch = ok
        if not batch:
            return
        uids = self._gen.insert(
            [r.prompt[n:] for (r, _, _), n in zip(batch, cached)],
            max_tokens=[r.max_tokens for r, _, _ in batch],
            caches=caches,
            # The tokens each cache holds: the batch keeps them with the KV,
            # and penalties look back over them as over any prompt.
            all_tokens=[r.prompt[:n] for (r, _, _), n in zip(batch, cached)],
            samplers=[g[0] for _, _, g in batch],
            logits_processors=[g[1] for _, _, g in batch],
            stop_sequences=[StopSequences([(t,) for t in r.stop_token_ids]) for r, _, _ in batch],
        )
        self._busy_peak = max(self._busy_peak, len(self._running) + len(batch))
        for uid, (r, state, _) in zip(uids, batch):
            self._running[uid] = state
            if r.logprobs:
                self._logprob_uids.add(uid)
            if r.prompt_logprobs is not None:
                self._prompt_scores[uid] = prefill.PromptScores(r.prompt, r.prompt_logprobs)
            if not r.media:
                self._awaiting_first.add(uid)
            self.stats.prompt_tokens_total += len(r.prompt)

    def _initial_cache(self, r: Request) -> tuple[list | None, int]:
        """The cache a request starts from and how many prompt tokens it
        holds. Media requests start empty: their token ids alone do not say
        which image they hold, so they neither use nor feed the prefix cache."""
        model = self.loaded.model
        if r.media:
            if not isinstance(model, BatchedVisionLM):
                raise ValueError("this model takes text only")
            return model.cache_for(r.prompt, r.media), 0
        if self._prefix is None or r.prompt_logprobs is not None:
            return None, 0  # scoring the prompt needs its whole prompt pass
        return self._prefix.fetch(r.prompt)

    def _reservation(self, r: Request) -> int:
        return self.memory.request_bytes(len(r.prompt) + r.max_tokens)

    def _make_room(self, requests_bytes: int) -> bool:
        """Whether weights + the buffer cache + `requests_bytes` of KV + the
        prefix cache fit the limit, evicting cached prefixes first if that is
        what it takes."""
        over = requests_bytes - self.memory.for_requests
        if self._prefix is not None:
            over += self._prefix.nbytes
            if over > 0:
                self._prefix.shrink(over)
                over = requests_bytes + self._prefix.nbytes - self.memory.for_requests
        return over <= 0

    def _guarded(self, state: _Running) -> tuple:
        """The request's sampler and processors, wrapped so that one raising
        marks that request failed instead of failing the whole batch."""
        r = state.request
        sampler = make_sampler(r.sampling)
        processors = make_processors(r.sampling, len(r.prompt))
        if FAULT_INJECTION and r.request_id.startswith("fault-"):
            processors.append(_fault_after(len(r.prompt) + 2))

        def guard_processor(p):
            def run(tokens: mx.array, logits: mx.array) -> mx.array:
                try:
                    return p(tokens, logits)
                except Exception as e:
                    state.failure = state.failure or f"logits processor failed: {e}"
                    return logits
            return run

        def guard_sampler(s):
            def run(logprobs: mx.array) -> mx.array:
                try:
                    return s(logprobs)
                except Exception as e:
                    state.failure = state.failure or f"sampler failed: {e}"
                    return mx.argmax(logprobs, axis=-1)
            return run

        return (guard_sampler(sampler) if sampler else None,
                [guard_processor(p) for p in processors])

    def _handle(self, responses) -> None:
        running, outbox = self._running, self._outbox
        ids, tokens = outbox.ids, outbox.tokens
        produced = 0
        finished_kv = []
        awaiting = self._awaiting_first
        for resp in responses:
            state = running.get(resp.uid)
            if state is None:
                continue
            awaiting.discard(resp.uid)
            produced += 1
            r = state.request
            if state.failure:
                if resp.finish_reason is None:
                    self._gen.remove([resp.uid])
                self._finish_uid(resp.uid, "error", error=state.failure)
                continue
            try:
                logprob = (self._logprob(resp.logprobs, resp.token, r.top_logprobs)
                           if r.logprobs else None)
            except Exception as e:  # this request only
                log.exception("request %s failed", r.request_id)
                if resp.finish_reason is None:
                    self._gen.remove([resp.uid])
                self._finish_uid(resp.uid, "error", error=str(e))
                continue
            scores = self._prompt_scores.pop(resp.uid, None) if self._prompt_scores else None
            prompt_logprobs = None if scores is None else scores.scored
            if resp.finish_reason is None:
                if logprob is None and scores is None:  # plain: straight into the columns
                    ids.append(r.request_id)
                    tokens.append(resp.token)
                else:
                    outbox.add(Output(r.request_id, resp.token, None, logprob,
                                      prompt_logprobs=prompt_logprobs))
            else:
                if not r.media:  # token ids alone do not say which image it saw
                    finished_kv.append((resp.all_tokens, resp.prompt_cache, resp.uid))
                self._finish_uid(resp.uid, resp.finish_reason, resp.token, logprob,
                                 prompt_logprobs=prompt_logprobs)
        self._keep_kv(finished_kv, in_step=True)
        self._step_tokens.append((time.monotonic(), produced))
        self._window_tokens += produced
        self.stats.generation_tokens_total += produced
        self._update_stats()

    def _keep_kv(self, finished: list[tuple[list[int] | None, list | None, int]],
                 in_step: bool = False) -> None:
        """Offer finished requests' KV (of prompt + completion; with their
        uids) to later ones. `in_step`: the step just taken finished them."""
        dropped_from, self._dropped_from = self._dropped_from, None
        if self._prefix is None or not finished:
            return
        if in_step and dropped_from is not None:
            # One copy per layer for all of them, not one per layer and row.
            uids, kv = dropped_from
            row_of = {uid: i for i, uid in enumerate(uids)}
            rows = finished_rows(kv, [row_of[uid] for _, _, uid in finished])
            # Evaluated after the next step: the KV they copy comes from the
            # step still in flight, and evaluating now waited for it (0.4 ms
            # a time on the 2-core CPU, whatever the number of rows).
            self._copies_to_evaluate += [a for keys, values, _ in rows[0].layers
                                         for a in (keys, values)]
            finished = [(t, row, uid) for (t, _, uid), row in zip(finished, rows)]
        entries = [(t, c) for t, c, _ in finished if t and c]
        if entries:
            self._prefix.insert(entries)

    def _evaluate_copies(self) -> None:
        if self._copies_to_evaluate:
            mx.async_eval(self._copies_to_evaluate)
            self._copies_to_evaluate = []

    def _logprob(self, logprobs: mx.array, token: int, k: int) -> TokenLogprob:
        top: list[tuple[int, float]] = []
        if k > 0:
            ids = mx.argpartition(-logprobs, k - 1)[:k]
            values = logprobs[ids]
            top = sorted(zip(ids.tolist(), values.tolist()), key=lambda t: -t[1])
        return TokenLogprob(token, logprobs[token].item(), top)

    def _finish_uid(self, uid: int, reason: str, token: int | None = None,
                    logprob: TokenLogprob | None = None, error: str = "",
                    prompt_logprobs: list[TokenLogprob] | None = None) -> None:
        self._awaiting_first.discard(uid)
        self._logprob_uids.discard(uid)
        self._prompt_scores.pop(uid, None)
        r = self._running.pop(uid).request
        self._finish(r, Output(r.request_id, token, reason, logprob, error, prompt_logprobs))

    def _finish(self, request: Request, out: Output) -> None:
        with self._lock:
            self._in_flight.discard(request.request_id)
        self._outbox.add(out)

    def _fail_all(self, message: str) -> None:
        for uid in list(self._running):
            self._finish_uid(uid, "error", error=message)

    def _flush(self, always: bool = False) -> None:
        if self._outbox or always:
            outputs, self._outbox = self._outbox, StepOutputs()
            self._publish(outputs)

    def _read_memory(self) -> None:
        s = self.stats
        s.active_memory_bytes, s.peak_memory_bytes = mx.get_active_memory(), mx.get_peak_memory()
        s.allocator_cache_bytes = mx.get_cache_memory()
        s.kv_bytes = self._gen.prompt_cache_nbytes
        s.weights_bytes, s.memory_limit_bytes = self.memory.weights, self.memory.limit
        s.rss_bytes = psutil.Process().memory_info().rss

    def _update_stats(self, idle: bool = False) -> None:
        now = time.monotonic()
        while self._step_tokens and now - self._step_tokens[0][0] > STATS_WINDOW_S:
            self._window_tokens -= self._step_tokens.popleft()[1]
        s = self.stats
        s.running, s.waiting = len(self._running), len(self._waiting)
        if self._prefix is not None:
            p = self._prefix
            s.cache_hits, s.cache_misses = p.hits, p.misses
            s.cache_tokens_reused, s.cache_evictions = p.tokens_reused, p.evictions
            s.cache_bytes = p.nbytes
        if len(self._step_tokens) > 1:
            span = max(now - self._step_tokens[0][0], 1e-6)
            s.generation_tokens_per_s = self._window_tokens / span
        elif idle:
            s.generation_tokens_per_s = 0.0


def _fault_after(n_tokens: int):
    def fault(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size > n_tokens:
            raise RuntimeError("injected fault")
        return logits
    return fault
