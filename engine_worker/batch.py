"""The running batch: mlx-lm's BatchGenerator and the requests inside it.

`insert` puts admitted requests in (each starting from its longest cached
prefix; a media request once the encoder's thread has encoded its media and,
where it can, run its prompt pass (`take_encoded`), unless the cache holds the
KV of all its media), `step` takes one decode step and turns its tokens into
outputs, `remove` takes one out early.
A prompt's KV goes to the prefix cache as its prompt pass ends (and a long
prompt's along the way), a finished request's as it finishes. Only the loop's thread calls it.
"""

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from engine_worker import grammar, mlx_compat, prefill
from engine_worker.admission import BatchState
from engine_worker.blocks import BLOCK_TOKENS, MediaSpan, media_end
from engine_worker.messages import Output, Request, StepOutputs, TokenLogprob
from engine_worker.prefix_cache import BatchRow, PrefixCache, batch_kv, gather_rows
from engine_worker.sampling import guarded
from engine_worker.vision import (
    BatchedVisionLM,
    Encoding,
    Prefill,
    Prefilled,
    SequenceMedia,
    for_prefix_cache,
    resumed,
)
from vllm_mlx.settings import EngineSettings, fault_injection
from vllm_mlx.v1 import engine_pb2 as pb

log = logging.getLogger("engine")

FAULT_INJECTION = fault_injection()

# A prompt pass is one evaluation, and the core reports nothing while it
# runs: one that outlasts the liveness timeout gets the engine killed as
# hung (on the 2-core CPU, the 2,048-token pass of a SmolLM2-135M prompt
# was; a 70B model's on a small Mac would be too). So a
# pass is planned to take at most this share of the timeout, at the speed
# of the last pass, and never fewer than MIN_CHUNK tokens a prompt. The
# share leaves room for a pass's cost growing faster than its length
# (attention over a longer context): on that CPU a 364-token pass ran at
# 319 tokens/s and the next, 1,735 tokens, at 116. The floor binds only
# where tokens are slow enough that a pass's fixed cost does not matter;
# at 32, a busy 2-core CPU took over 5 s for one pass of the bfloat16
# SmolLM2 (about 70 ms a token quiet), past a 5 s timeout.
PASS_SHARE_OF_LIVENESS = 1 / 16
MIN_CHUNK = 8


@dataclass
class _Running:
    request: Request
    failure: str = ""  # set by a guarded sampler or processor that raised
    rule: grammar.GrammarRow | None = None  # a constrained request's grammar

    def failed(self, message: str) -> None:
        self.failure = self.failure or message


@dataclass
class _Prefilling:
    """A prompt in the generator's prefill batch, and how much of it the
    prefix cache holds (see Batch._keep_prompt_kv)."""
    keys: list[int]  # block keys of all but its last token
    cached: int  # tokens
    media: list[MediaSpan]


class Batch:
    def __init__(self, settings: EngineSettings, model, prefix: PrefixCache | None,
                 kv_bytes: Callable[[Request], int], stats: pb.Stats,
                 finish: Callable[[Request, Output], None],
                 encoded: Callable[[], None] = lambda: None):
        """`kv_bytes(request)`: the KV a request reserves; `finish(request,
        output)`: a request's last output (the loop's bookkeeping);
        `encoded()`: called on the encoder's thread as a media request's
        encoding ends (the loop's wake-up)."""
        self.settings, self.model, self.prefix = settings, model, prefix
        self._kv_bytes, self._stats, self._finish = kv_bytes, stats, finish
        self._encoded_wake = encoded
        self.running: dict[int, _Running] = {}  # BatchGenerator uid -> state
        self.state = BatchState()  # what admission needs, as the last step left it
        self._logprob_uids: set[int] = set()  # running requests that asked for logprobs
        # Running requests that asked for their prompt's logprobs, until their
        # first token carries them out.
        self._prompt_scores: dict[int, prefill.PromptScores] = {}
        self._awaiting_first: set[int] = set()  # text requests without a token yet
        self._priming: set[int] = set()  # rows whose next emission is their prompt's (mlx_compat)
        self._prefilling: dict[int, _Prefilling] = {}  # prompts the cache is to hold
        self._grammars: dict[int, grammar.GrammarRow] = {}  # constrained requests' grammars
        self._dropped_from: tuple | None = None  # (uids, KV); see _new_generator
        self._copies_to_evaluate: list[mx.array] = []  # see _keep_kv
        self._prefill_rate: float | None = None  # tokens/s of the last long enough pass
        # Media requests on the encoder's thread, in admission order; then
        # their encoded media until `_initial_cache` takes it.
        self.encoding: deque[tuple[Request, Encoding]] = deque()
        self._encoded: dict[str, SequenceMedia | Prefilled] = {}
        self.gen = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        s = self.settings
        gen = BatchGenerator(self.model, completion_batch_size=s.max_num_seqs,
                             prefill_batch_size=min(s.prefill_batch_size, s.max_num_seqs),
                             prefill_step_size=s.prefill_step_size)
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
        mlx_compat.install_decode_step(decoding, self._logprob_uids, self._grammars,
                                       grammar.mask_logits, self._priming)
        mlx_compat.install_primed_joins(gen, self._priming)
        prefill.install(mlx_compat.prompt_batch(gen), self._prompt_scores)
        return gen

    def admission_state(self) -> BatchState:
        s = self.state
        s.running, s.text_awaiting_first = len(self.running), bool(self._awaiting_first)
        s.running += len(self.encoding)
        s.kv_reserved = sum(self._kv_bytes(st.request) for st in self.running.values())
        s.prefill_keys = {k for p in self._prefilling.values()
                          for k in p.keys[p.cached // BLOCK_TOKENS:]}
        s.kv_reserved += sum(self._kv_bytes(r) for r, _ in self.encoding)
        s.encoding = bool(self.encoding)
        return s

    def take_encoded(self) -> None:
        """Put the media requests whose encoding has ended into the batch,
        and let the encoder go on: a slice beside this step while text rows
        decode, else as fast as it can."""
        while self.encoding and self.encoding[0][1].done():
            r, job = self.encoding.popleft()
            try:
                self._encoded[r.request_id] = job.result()
            except Exception as e:
                self._encoding_failed(r, e)
                continue
            self.insert([r])
        if self.encoding:
            self.model.pace(any(not st.request.media for st in self.running.values()))

    def _encoding_failed(self, r: Request, e: Exception) -> None:
        log.exception("request %s: encoding its media failed", r.request_id)
        self._finish(r, Output(r.request_id, None, "error",
                               error=f"encoding the media failed: {e}"))

    def insert(self, requests: list[Request]) -> None:
        # Each prompt prefills only what follows its longest cached prefix.
        batch, caches, cached = [], [], []
        for r in requests:
            try:
                if r.media and r.request_id not in self._encoded:
                    if not isinstance(self.model, BatchedVisionLM):
                        raise ValueError("this model takes text only")
                    cache, n = self._media_cached(r)
                    if cache is None:
                        job = self.model.start_encoding(r.prompt, r.media,
                                                        self._prefill_on_encoder(r))
                        job.add_done_callback(lambda _: self._encoded_wake())
                        self.encoding.append((r, job))
                        continue
                else:
                    cache, n = self._initial_cache(r)
            except Exception as e:  # bad media tensors: this request only
                self._encoding_failed(r, e)
                continue
            state = _Running(r)
            fault = FAULT_INJECTION and r.request_id.startswith("fault-")
            rule = r.matcher and grammar.GrammarRow(r.matcher, state.failed)
            state.rule = rule
            batch.append((r, state, guarded(r.sampling, len(r.prompt), state.failed, fault,
                                            first_token=rule and rule.first_token)))
            caches.append(cache)
            cached.append(n)
        if not batch:
            return
        uids = self.gen.insert(
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
        for uid, (r, state, _) in zip(uids, batch):
            self.running[uid] = state
            if r.logprobs:
                self._logprob_uids.add(uid)
            if state.rule:
                self._grammars[uid] = state.rule
            if r.prompt_logprobs is not None:
                self._prompt_scores[uid] = prefill.PromptScores(r.prompt, r.prompt_logprobs)
            if not r.media:
                self._awaiting_first.add(uid)
            if self.prefix is not None and len(r.prefix_keys) * BLOCK_TOKENS > n:
                self._prefilling[uid] = _Prefilling(r.prefix_keys, n, r.media_spans)
            self._stats.prompt_tokens_total += len(r.prompt)

    def _prefill_on_encoder(self, r: Request) -> Prefill | None:
        """The prompt pass a media request's encoding is to run after its
        encoder, from the longest cached prefix: off the loop, beside the
        steps of the requests decoding. None where the loop's pass must run
        it: a family whose requests run one at a time, a prefix LM's prompt
        (one pass, attending both ways) and a prompt to be scored (its
        logprobs come from the loop's pass)."""
        model = self.model
        if not model.batchable or model.prefix_lm or r.prompt_logprobs is not None:
            return None
        cache, n = self._cached_prefix(r)
        if cache is not None:  # a copy made on this thread's stream: made here
            mx.eval([c.state for c in cache[:-1]])
        s = self.settings
        return Prefill(cache, n, min(s.prefill_step_size, s.prefill_chunk_while_decoding))

    def _cached_prefix(self, r: Request) -> tuple[list | None, int]:
        """A private copy of the longest cached prefix of a request's prompt,
        and its length ((None, 0): none, or no prefix cache)."""
        if self.prefix is None or not r.prefix_keys:
            return None, 0
        return self.prefix.fetch(r.prompt, r.prefix_keys, r.media_spans)

    def _initial_cache(self, r: Request) -> tuple[list | None, int]:
        """The cache a request starts from and how many prompt tokens it
        holds: its longest cached prefix (a media request's once its media
        is encoded, or the cache its encoding prefilled). A prefix LM's
        prompts, text ones too, are embedded whole up front: they are
        prefilled in one pass (vision.py)."""
        if getattr(self.model, "prefix_lm", False):
            return self.model.cache_for(r.prompt, r.media), 0
        done = self._encoded.get(r.request_id)
        if isinstance(done, Prefilled):
            del self._encoded[r.request_id]
            if self.prefix is not None and r.prefix_keys:  # as a pass's end does
                self.prefix.insert([(r.prompt[:done.tokens], for_prefix_cache(done.cache),
                                     r.prefix_keys, r.media_spans)])
            return done.cache, done.tokens
        cache, n = self._cached_prefix(r)
        seq = self._encoded.pop(r.request_id) if r.media else None
        if cache is None:
            return (self.model.cache_with(seq), 0) if seq else (None, 0)
        return resumed(cache, seq), n

    def _media_cached(self, r: Request) -> tuple[list | None, int]:
        """A media request's cache and its length where the prefix cache
        holds the KV of all its media (the second turn of a chat about a
        picture): its encoder need not run. (None, 0) otherwise."""
        if self.prefix is None or not r.prefix_keys or self.prefix.cached_tokens(
                r.prompt, r.prefix_keys, r.media_spans) < media_end(r.media_spans):
            return None, 0
        cache, n = self.prefix.fetch(r.prompt, r.prefix_keys, r.media_spans)
        row = cache[-1].rows[0]
        return resumed(cache, row and row.after(n)), n

    def step(self) -> tuple[list, list]:
        """One generator step: what mlx-lm returns, for `handle`."""
        gen = self.gen
        prompt_time = mlx_compat.prompt_seconds(gen)  # mlx-lm's own timing
        prompt_tokens = mlx_compat.prompt_tokens(gen)
        self._dropped_from = None
        # (mlx-lm cuts each prompt's next chunk at this size as it steps.)
        gen.prefill_step_size = self._prefill_chunk()
        prompt_responses, responses = gen.next()
        self.evaluate_copies()
        spent = mlx_compat.prompt_seconds(gen) - prompt_time
        self._stats.loop_seconds["prefill"] += spent
        passed = mlx_compat.prompt_tokens(gen) - prompt_tokens
        if passed >= MIN_CHUNK and spent > 0:
            self._prefill_rate = passed / spent
        return prompt_responses, responses

    def _prefill_chunk(self) -> int:
        """The prompt tokens each prompt may prefill in this step's pass:
        prefill_step_size, less while other requests decode (their streams
        wait for the pass), and less again where the pass would take too
        long for the liveness check (PASS_SHARE_OF_LIVENESS). A prefix LM's
        prompt is prefilled whole, however long."""
        s, gen = self.settings, self.gen
        chunk = s.prefill_step_size
        if getattr(self.model, "prefix_lm", False):
            return chunk
        if len(mlx_compat.decoding_batch(gen)):
            chunk = min(chunk, s.prefill_chunk_while_decoding)
        rate = self._prefill_rate
        if rate is None and mlx_compat.prompt_seconds(gen) > 0:  # warm-up's prompts
            rate = mlx_compat.prompt_tokens(gen) / mlx_compat.prompt_seconds(gen)
        if rate:
            rows = max(1, mlx_compat.prompts_to_prefill(gen))
            fits = rate * s.liveness_timeout_s * PASS_SHARE_OF_LIVENESS / rows
            chunk = min(chunk, max(MIN_CHUNK, int(fits)))
        return chunk

    def handle(self, prompt_responses: list, responses: list, outbox: StepOutputs) -> None:
        """Turn a step's tokens into outputs; plain tokens go straight into
        `outbox`'s columns."""
        self._note_prefill(prompt_responses)
        self._handle(responses, outbox)

    def _note_prefill(self, prompt_responses) -> None:
        # The loop inserts plain prompts, which mlx-lm splits into two
        # segments (all but the last token, then the last token): one whose
        # first segment has just ended moves to decoding on the next step.
        staying = [p for p in prompt_responses if not p.end_of_prompt]
        self._stats.prefill_passes += bool(staying)
        self.state.prefilling = len(staying)
        self.state.prefill_turning = any(p.end_of_segment for p in staying)
        if self._prefilling and staying:
            self._keep_prompt_kv(staying)

    def _keep_prompt_kv(self, staying: list) -> None:
        """Offer the KV of prompts whose pass just ran to later ones, as vLLM
        offers each block it has computed: what a pass computed is right
        whatever becomes of its request. A prompt's all but last token (the
        prefill proper) is kept when its pass ends; a long one's, prefilled
        a chunk a step, also each time it has doubled since it was last
        kept, so that the copies add up to at most twice the prompt."""
        prompts = mlx_compat.prompt_batch(self.gen)
        row_of = {uid: i for i, uid in enumerate(prompts.uids)}
        taken = []  # (uid, row, tokens held, whether its prefill is over)
        for p in staying:
            tracked = self._prefilling.get(p.uid)
            if tracked is None or p.uid not in row_of:
                continue
            row = row_of[p.uid]
            held = len(prompts.tokens[row])
            if p.end_of_segment or held >= 2 * tracked.cached:
                taken.append((p.uid, row, held, p.end_of_segment))
        if not taken:
            return
        kv = batch_kv(prompts.prompt_cache)
        if kv is None:  # a vision model: a copy per layer and row, as mlx-lm makes them
            caches = [for_prefix_cache(prompts.extract_cache(row)) for _, row, _, _ in taken]
        else:  # its pass has been evaluated: so can the copies be, at once
            caches = gather_rows(kv, [row for _, row, _, _ in taken])
            mx.async_eval([a for keys, values, _ in caches[0].layers for a in (keys, values)])
        entries = []
        for (uid, row, held, over), cache in zip(taken, caches):
            tracked = self._prefilling[uid]
            entries.append((prompts.tokens[row], cache, tracked.keys[:held // BLOCK_TOKENS],
                            tracked.media))
            tracked.cached = held
            if over:
                del self._prefilling[uid]
        self.prefix.insert(entries)

    def _handle(self, responses, outbox: StepOutputs) -> None:
        running = self.running
        ids, tokens = outbox.ids, outbox.tokens
        produced = 0
        finished_kv = []
        awaiting = self._awaiting_first
        priming = self._priming
        for resp in responses:
            state = running.get(resp.uid)
            if state is None:
                continue
            if resp.uid in priming and not state.failure:
                # Its prompt's last token: its first is sampled now.
                priming.discard(resp.uid)
                mlx_compat.first_token_sampled(mlx_compat.decoding_batch(self.gen), resp.uid)
                continue
            awaiting.discard(resp.uid)
            produced += 1
            r = state.request
            if state.failure:
                if resp.finish_reason is None:
                    self.gen.remove([resp.uid])
                self._finish_uid(resp.uid, "error", error=state.failure)
                continue
            try:
                logprob = (_logprob(resp.logprobs, resp.token, r.top_logprobs)
                           if r.logprobs else None)
            except Exception as e:  # this request only
                log.exception("request %s failed", r.request_id)
                if resp.finish_reason is None:
                    self.gen.remove([resp.uid])
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
                finished_kv.append((resp.all_tokens, resp.prompt_cache, resp.uid, r.media_spans))
                self._finish_uid(resp.uid, resp.finish_reason, resp.token, logprob,
                                 prompt_logprobs=prompt_logprobs)
        self._keep_kv(finished_kv, in_step=True)
        self._stats.generation_tokens_total += produced

    def remove(self, request_id: str, keep_kv: bool) -> bool:
        """End a running request early (finish reason "abort"). `keep_kv`: its
        KV may serve later prompts."""
        for i, (r, job) in enumerate(self.encoding):
            if r.request_id == request_id:
                del self.encoding[i]
                job.stop()
                self._finish(r, Output(request_id, None, "abort"))
                return True
        for uid, state in self.running.items():
            if state.request.request_id == request_id:
                r = state.request
                keep_kv = keep_kv and self.prefix is not None and bool(r.prefix_keys)
                kept = self.gen.remove([uid], return_prompt_caches=keep_kv)
                if keep_kv and uid in kept:
                    cache, tokens = kept[uid]
                    self._keep_kv([(tokens, cache, uid, r.media_spans)])
                self._finish_uid(uid, "abort")
                return True
        return False

    def fail_all(self, message: str) -> None:
        while self.encoding:
            r, job = self.encoding.popleft()
            job.stop()
            self._finish(r, Output(r.request_id, None, "error", error=message))
        for uid in list(self.running):
            self._finish_uid(uid, "error", error=message)

    def close(self) -> None:
        """At the loop's end: the vision encoder's thread ends too."""
        if isinstance(self.model, BatchedVisionLM):
            self.model.close()

    def restart(self, message: str) -> None:
        """After a step failed as a whole: fail every request, start afresh."""
        self.fail_all(message)
        self.gen = self._new_generator()
        self._note_prefill([])

    def _keep_kv(self, finished: list[tuple[list[int] | None, list | None, int, list[MediaSpan]]],
                 in_step: bool = False) -> None:
        """Offer finished requests' KV (of prompt + completion; with their
        uids and media) to later ones. `in_step`: the step just taken
        finished them."""
        dropped_from, self._dropped_from = self._dropped_from, None
        if self.prefix is None or not finished:
            return
        if in_step and dropped_from is not None:
            # One copy per layer for all of them, not one per layer and row.
            uids, kv = dropped_from
            row_of = {uid: i for i, uid in enumerate(uids)}
            rows = gather_rows(kv, [row_of[uid] for _, _, uid, _ in finished])
            # Evaluated after the next step: the KV they copy comes from the
            # step still in flight, and evaluating now waited for it (0.4 ms
            # a time on the 2-core CPU, whatever the number of rows).
            self._copies_to_evaluate += [a for keys, values, _ in rows[0].layers
                                         for a in (keys, values)]
            finished = [(t, row, uid, m) for (t, _, uid, m), row in zip(finished, rows)]
        entries = [(t, c if isinstance(c, BatchRow) else for_prefix_cache(c), None, m)
                   for t, c, _, m in finished if t and c]
        if entries:
            self.prefix.insert(entries)

    def evaluate_copies(self) -> None:
        if self._copies_to_evaluate:
            mx.async_eval(self._copies_to_evaluate)
            self._copies_to_evaluate = []

    def _finish_uid(self, uid: int, reason: str, token: int | None = None,
                    logprob: TokenLogprob | None = None, error: str = "",
                    prompt_logprobs: list[TokenLogprob] | None = None) -> None:
        self._awaiting_first.discard(uid)
        self._priming.discard(uid)
        self._logprob_uids.discard(uid)
        self._grammars.pop(uid, None)
        self._prompt_scores.pop(uid, None)
        self._prefilling.pop(uid, None)
        r = self.running.pop(uid).request
        self._finish(r, Output(r.request_id, token, reason, logprob, error, prompt_logprobs))


def _logprob(logprobs: mx.array, token: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        ids = mx.argpartition(-logprobs, k - 1)[:k]
        values = logprobs[ids]
        top = sorted(zip(ids.tolist(), values.tolist()), key=lambda t: -t[1])
    return TokenLogprob(token, logprobs[token].item(), top)
