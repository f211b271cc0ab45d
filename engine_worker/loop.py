"""The loop: one thread owns the batch and every decode step; a vision
model's encoder runs on a thread of its own (vision.py), whose finished
encodings the loop puts into the batch.

Requests arrive from any thread through `submit` and `abort`; between decode
steps the loop lets the admission policy (admission.py) pick which waiting
ones join mlx-lm's BatchGenerator, takes one step, and hands that step's
tokens, as `StepOutputs`, to `publish`. Outputs carry token ids only: turning
them into text (detokenizing, stop strings) is the front end's job, in a
process of its own, so the loop does as little per token as it can
(docs/benchmarks.md).
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from engine_worker import grammar
from engine_worker.admission import Admission
from engine_worker.batch import Batch
from engine_worker.blocks import block_keys
from engine_worker.memory import MemoryBudget, make_room, set_up_memory
from engine_worker.messages import DuplicateRequest, Output, QueueFull, Request, StepOutputs
from engine_worker.model import LoadedModel
from engine_worker.prefix_cache import PrefixCache, can_reuse, default_budget
from engine_worker.prefix_store import PrefixStore, can_store, model_identity
from engine_worker.stats import (
    TokenRate,
    new_stats,
    read_memory,
    read_prefix_cache,
    record_step,
)
from engine_worker.warmup import warm_up
from vllm_mlx.settings import EngineSettings, favour_the_waiting_thread

log = logging.getLogger("engine")

# A quiet engine writes its prefix cache out (--prefix-cache-dir) for at most
# this long at a time, then reports in, as an idle engine does, and goes on;
# a stopping one for at most STOP_SAVE_S.
SAVE_SLICE_S = 1.0
STOP_SAVE_S = 10.0
# A busy loop whose steps yield no output (a long prompt prefilled in
# passes, with nothing decoding) still reports this often: the front end
# takes a core that sends nothing for its liveness timeout for hung.
REPORT_EVERY_S = 0.5


class Loop:
    def __init__(self, settings: EngineSettings,
                 load: Callable[[EngineSettings], LoadedModel],
                 publish: Callable[[StepOutputs], None],
                 on_ready: Callable[[BaseException | None], None] = lambda error: None,
                 after_step: Callable[[list, list], None] | None = None,
                 admission: Admission | None = None):
        """`after_step(prompt_responses, responses)`, when given, sees what
        each of the generator's steps returned, on the loop's thread.
        `admission`: the policy (default: an `Admission` from the settings)."""
        self.settings = settings
        self._load, self._publish, self._on_ready = load, publish, on_ready
        self._after_step = after_step
        self.loaded: LoadedModel | None = None  # set by the loop's thread before `ready`
        self.memory: MemoryBudget | None = None  # likewise
        self.load_error: BaseException | None = None
        self.stats = new_stats()
        self.ready = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # guarded by _lock
        self._llg_tokenizer = None  # likewise; grammar.make_tokenizer's, when first needed
        self._admission = admission or Admission(
            settings.max_num_seqs, settings.prefill_batch_size, settings.admit_window_s)
        self._batch: Batch | None = None  # set at load
        self._prefix: PrefixCache | None = None  # likewise, unless turned off
        self._outbox = StepOutputs()
        self._last_flush = 0.0  # perf_counter time of the last publish
        self._rate = TokenRate()
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
        """Queue a request; its grammar, if any, is compiled here, on the
        caller's thread, never the loop's. Raises ValueError for a grammar
        that cannot be compiled."""
        if request.grammar and request.matcher is None:
            request.matcher = grammar.compile(self._grammar_tokenizer(), request.grammar)
        with self._lock:
            if request.request_id in self._in_flight:
                raise DuplicateRequest(request.request_id)
            # Running plus waiting, as the front end counts (messages.QueueFull).
            if len(self._in_flight) >= self.settings.max_num_seqs + self.settings.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFull(f"{len(self._in_flight)} requests are in flight")
            self._in_flight.add(request.request_id)
            self.stats.requests_total += 1
        if isinstance(request.media, list) and request.media \
                and hasattr(self.loaded.model, "media_inputs"):
            request.media = self.loaded.model.media_inputs(request.media)
        if self._prefix is not None and _cacheable(request):
            request.prefix_keys = block_keys(request.prompt[:-1], request.media_spans)  # here,
            # off the loop's thread
        self._send("add", request)

    def _grammar_tokenizer(self):
        with self._lock:
            if self._llg_tokenizer is None:  # once, at the first constrained request
                loaded = self.loaded
                self._llg_tokenizer = grammar.make_tokenizer(loaded.tokenizer,
                                                             loaded.facts.vocab_size)
            return self._llg_tokenizer

    def abort(self, request_id: str, keep_kv: bool = False) -> bool:
        """End a request. `keep_kv`: it ended normally (the front end found a
        stop string), so its KV may serve later prompts."""
        with self._lock:
            found = request_id in self._in_flight
        if found:
            self._send("abort", (request_id, keep_kv))
        return found

    def clear_prefix_cache(self) -> None:
        self._send("clear", None)

    def _send(self, kind: str, item) -> None:
        self._inbox.put((kind, item))
        self._wake.set()

    # -- the loop's thread -------------------------------------------------

    def _run(self) -> None:
        favour_the_waiting_thread()
        try:
            self._serve()
        finally:
            # MLX expects each thread to free its streams before it ends:
            # left to process exit, their teardown aborted the process
            # ("terminate called without an active exception") in about
            # half the runs of an in-process engine on the CPU.
            mx.clear_streams()

    def _serve(self) -> None:
        try:
            self._set_up()  # loading evaluates the weights: it belongs to this thread too
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
        batch, spent = self._batch, self.stats.loop_seconds
        clock = time.perf_counter
        while not self._stopping:
            t0 = start = clock()
            self._drain_inbox()
            self._admit()
            t1 = clock()
            spent["admit"] += t1 - t0
            if batch.encoding:
                batch.take_encoded()
                t0, t1 = t1, clock()
                spent["encode"] += t1 - t0
            if not batch.running:
                # (While media is being encoded, the batch is not done: the
                # encoder's thread wakes the loop when it is.)
                if not batch.encoding:
                    self._admission.batch_emptied()
                batch.evaluate_copies()
                if t1 - last_memory_read > 1.0:
                    last_memory_read = t1
                    self._read_memory()
                # Publish even when there is nothing to say: the stats go with it.
                self._update_stats(idle=True)
                self._flush(always=True)
                quiet = not self._wake.wait(self._admission.idle_wait_s())
                self._wake.clear()
                if quiet and self._prefix is not None and not batch.encoding:
                    self._save_prefixes(SAVE_SLICE_S)
                spent["idle"] += clock() - t1
                continue
            generated = self.stats.generation_tokens_total
            try:
                step = batch.step()
                t2 = clock()
                batch.handle(*step, self._outbox)
                if self._after_step is not None:
                    self._after_step(*step)
            except Exception as e:  # a failure we cannot pin on one request
                log.exception("batch step failed; failing the running requests")
                batch.restart(f"engine step failed: {e}")
                t2 = clock()
            self._rate.add(self.stats.generation_tokens_total - generated)
            self._update_stats()
            t3 = clock()
            self._flush(always=t3 - self._last_flush >= REPORT_EVERY_S)
            t4 = clock()
            spent["step"] += t2 - t1
            spent["handle"] += t3 - t2
            spent["publish"] += t4 - t3
            self.stats.steps += 1
            record_step(self.stats, t4 - start)
            if t4 - last_memory_read > 1.0:
                last_memory_read = t4
                self._read_memory()
        batch.fail_all("engine shutting down")
        batch.close()
        self._flush()
        if self._prefix is not None:
            self._save_prefixes(STOP_SAVE_S, until_woken=False)

    def _set_up(self) -> None:
        s = self.settings
        self.loaded = self._load(s)
        self.memory = set_up_memory(self.loaded.model, s.max_memory, s.allocator_cache_bytes)
        log.info("memory: limit %.2f GB, weights %.2f GB, KV %d bytes per token",
                 self.memory.limit / 1e9, self.memory.weights / 1e9, self.memory.kv_per_token)
        model = self.loaded.model
        prefix_lm = getattr(model, "prefix_lm", False)
        if s.prefix_cache and prefix_lm:
            log.warning("prefix cache off: this model's prompts attend both ways, so the "
                        "KV of a prompt's start depends on the rest of it")
        elif s.prefix_cache and not can_reuse(model):
            log.warning("prefix cache off: this model's KV cache cannot be trimmed "
                        "(sliding-window or recurrent layers)")
        elif s.prefix_cache:
            budget = s.prefix_cache_bytes if s.prefix_cache_bytes is not None else default_budget()
            log.info("prefix cache on, budget %.1f MiB", budget / 2**20)
            self._prefix = PrefixCache(budget, self._prefix_store())
            if self._prefix.store is not None:
                self._prefix.restore()
        lane = s
        if not getattr(model, "batchable", True):
            # Its requests cannot share a batch (vision.Wiring.solo): they queue
            # as any others do, and run one at a time.
            log.warning("%s: requests run one at a time: %s", model.model_type,
                        model.wiring.solo)
            lane = replace(lane, max_num_seqs=1, prefill_batch_size=1)
            self._admission.limit(1)
        if prefix_lm:  # each prompt in one prefill pass, however long
            lane = replace(lane, prefill_step_size=self.loaded.facts.context_length)
        self._batch = Batch(lane, model, self._prefix, self._reservation, self.stats,
                            self._finish, encoded=self._wake.set)
        if s.warmup:
            warm_up(self._batch.gen, self.loaded.model)

    def _prefix_store(self) -> PrefixStore | None:
        folder = self.settings.prefix_cache_dir
        if not folder:
            return None
        if not can_store(self.loaded.model):
            log.warning("prefix cache: not kept in %s: this model's cache holds more than "
                        "plain KV (a vision model)", folder)
            return None
        return PrefixStore(Path(folder), model_identity(Path(self.loaded.facts.path)),
                           self.memory.kv_per_token)

    def _save_prefixes(self, limit_s: float, until_woken: bool = True) -> None:
        """Write cached prefixes to the store until `limit_s` passes, none
        is left unwritten or (`until_woken`) something arrives."""
        end = time.perf_counter() + limit_s
        while (time.perf_counter() < end and not (until_woken and self._wake.is_set())
               and self._prefix.save_one()):
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._admission.add(item)
            elif kind == "clear":
                if self._prefix is not None:
                    self._prefix.clear()
                self._update_stats()
            else:
                self._abort(*item)

    def _abort(self, request_id: str, keep_kv: bool) -> None:
        waiting = self._admission.remove(request_id)
        if waiting is not None:
            self._finish(waiting, Output(request_id, None, "abort"))
        else:
            self._batch.remove(request_id, keep_kv)

    def _admit(self) -> None:
        if not self._admission.waiting:
            return  # the common case in decoding: no need to sum the batch's KV
        prefix = self._prefix
        decision = self._admission.choose(
            self._batch.admission_state(), self._reservation,
            lambda total: make_room(self.memory, prefix, total),
            lambda r: prefix.cached_blocks(r.prefix_keys) if prefix is not None else 0)
        for r, need in decision.too_large:
            self._finish(r, Output(r.request_id, None, "error",
                                   error=f"the request needs {need} bytes of KV cache, "
                                         f"more than the memory limit leaves"))
        if decision.admit:
            self._batch.insert(decision.admit)

    def _reservation(self, r: Request) -> int:
        return self.memory.request_bytes(len(r.prompt) + r.max_tokens)

    def _finish(self, request: Request, out: Output) -> None:
        with self._lock:
            self._in_flight.discard(request.request_id)
        self._outbox.add(out)

    def _flush(self, always: bool = False) -> None:
        if self._outbox or always:
            outputs, self._outbox = self._outbox, StepOutputs()
            self._last_flush = time.perf_counter()
            self._publish(outputs)

    def _read_memory(self) -> None:
        read_memory(self.stats, self.memory, self._batch.gen.prompt_cache_nbytes)

    def _update_stats(self, idle: bool = False) -> None:
        s = self.stats
        s.running, s.waiting = len(self._batch.running), len(self._admission.waiting)
        if self._prefix is not None:
            read_prefix_cache(s, self._prefix)
        rate = self._rate.per_second(idle)
        if rate is not None:
            s.generation_tokens_per_s = rate


def _cacheable(request: Request) -> bool:
    """Whether the prefix cache may serve a request: scoring a prompt needs
    its whole prompt pass, and media needs each item's content hash."""
    if request.prompt_logprobs is not None:
        return False
    spans = request.media_spans
    return not request.media or (bool(spans) and all(content for _, _, content in spans))
