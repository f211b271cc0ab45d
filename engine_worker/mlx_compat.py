"""Every use of mlx-lm's internals, in one module.

The engine leans on a few of mlx-lm's private objects and fields: the
generator's decoding and prompt batches, its prompt timing, a batch KV
cache's end offsets, and its own decode step. They change without notice
between releases, so they are used here and nowhere else (a test scans the
code for private names), this module was written against the versions in
WRITTEN_FOR (pyproject.toml pins them), and importing it checks that those
are the ones installed. To move to a new mlx-lm: bump the pins, then the
loop tests (which compare the decode step with mlx-lm's own) and
tests/test_mlx_compat.py say what broke.

The decode step is mlx-lm's, less the work no request asked for. mlx-lm's
GenerationBatch splits every step's log-probabilities into one array per
row and evaluates them all, and normalizes logits even when every row
samples greedily. A tiny model's step is CPU-bound (launching kernels), so
those per-row arrays showed as per-row cost (docs/benchmarks.md). Here a row
gets its log-probabilities only if its request asked for them, and an
all-greedy batch that wants none takes the argmax of the raw logits (the
same token: normalizing subtracts one constant per row). It goes on the
generator's decoding batch, the one object mlx-lm keeps for the generator's
life and extends with each prefilled group.

A prefilled group joining a batch that decodes is primed
(`install_primed_joins`): it joins with its prompt's last token as its next
input, and the batch's next step computes its first token along with every
other row's next one. mlx-lm runs a forward pass of the group's own for that
token as it joins, which every stream in the batch waited for: on a tiny
model's CPU-bound step, a join step took twice a plain one
(docs/benchmarks.md). A group joining an idle batch still gets its first
token from mlx-lm's own step, a step sooner.
"""

import importlib
import importlib.metadata
import types
from collections.abc import Callable, Collection

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import TokenBuffer
from mlx_lm.sample_utils import greedy_sampler

WRITTEN_FOR = {"mlx-lm": "0.32.2", "mlx-vlm": "0.7.10"}


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise ImportError, naming both versions, unless the installed mlx-lm
    and mlx-vlm are those this module was written against."""
    for package, wanted in WRITTEN_FOR.items():
        have = (installed or {}).get(package) or importlib.metadata.version(package)
        if have != wanted:
            raise ImportError(
                f"vllm-mlx's engine was written against {package} {wanted} "
                f"(engine_worker/mlx_compat.py), but {package} {have} is installed: "
                f"pip install '{package}=={wanted}'")


check_versions()


def decoding_batch(gen):
    """The generator's GenerationBatch: one object for the generator's life."""
    return gen._generation_batch


def prompt_batch(gen):
    """The generator's PromptProcessingBatch: one object for its life too."""
    return gen._prompt_batch


def prompt_seconds(gen) -> float:
    """Time mlx-lm has spent in prompt passes (its own counter)."""
    counters = getattr(gen, "_counters", None)
    return counters.prompt_time if counters else 0.0


def prompt_tokens(gen) -> int:
    """Prompt tokens mlx-lm has prefilled (its own counter)."""
    counters = getattr(gen, "_counters", None)
    return counters.prompt_tokens if counters else 0


def prompts_to_prefill(gen) -> int:
    """Prompts in the generator's prefill batch or waiting to join it."""
    return len(gen._prompt_batch) + len(gen._unprocessed_sequences)


def kv_end(cache):
    """Where each row of a BatchKVCache ends (its write offset)."""
    return cache._idx


def keep_freed_buffers_in_generate() -> None:
    """mlx-lm empties MLX's buffer cache after every prefill pass; give its
    generate module a view of mlx.core whose clear_cache does nothing
    (memory.keep_allocator_cache says why)."""
    # (mlx_lm.generate, the attribute, is the function of that name)
    generate = importlib.import_module("mlx_lm.generate")
    if getattr(generate.mx, "clear_cache", None) is mx.clear_cache:
        view = types.ModuleType(mx.__name__)
        view.__dict__.update(vars(mx))
        view.clear_cache = lambda: None
        generate.mx = view


def hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper."""
    return tokenizer._tokenizer


def install_decode_step(decoding, wants_logprobs: Collection[int], grammars: dict,
                        mask_logits: Callable, priming: Collection[int] = ()) -> None:
    """Replace `decoding._step` (mlx-lm's GenerationBatch). `wants_logprobs`:
    the uids whose requests asked for log-probabilities; `grammars`: uid ->
    the grammar of a constrained request (grammar.GrammarRow), applied by
    `mask_logits` (grammar.mask_logits); `priming`: the uids of primed rows
    (`install_primed_joins`) whose first token is not sampled yet; all kept
    by the caller. Rows joining it leave their first-token-only processors
    behind (sampling.guarded marks them) once their first token is sampled
    (`first_token_sampled`, for primed rows): a row with no processor left
    skips the per-row path of every step."""
    decoding._step = lambda: _step(decoding, wants_logprobs, grammars, mask_logits, priming)
    join = decoding.extend

    def extend(batch) -> None:
        if batch.logits_processors:
            batch.logits_processors = [
                row if uid in priming else _after_first_token(row)
                for uid, row in zip(batch.uids, batch.logits_processors)]
        join(batch)

    decoding.extend = extend


def _after_first_token(processors: list) -> list:
    return [p for p in processors if not getattr(p, "first_token_only", False)]


def first_token_sampled(decoding, uid: int) -> None:
    """A primed row's first token is sampled: its first-token-only
    processors go."""
    i = decoding.uids.index(uid)
    if decoding.logits_processors and decoding.logits_processors[i]:
        decoding.logits_processors[i] = _after_first_token(decoding.logits_processors[i])


class _AfterPriming:
    """A primed row's stop matcher: its first emission is its prompt's last
    token, which no stop sequence may end on."""

    def __init__(self, matcher):
        self._matcher, self._primed = matcher, True

    def advance(self, token: int) -> bool:
        if self._primed:
            self._primed = False
            return False
        return self._matcher.advance(token)


def install_primed_joins(gen, priming: set[int]) -> None:
    """Prime each group that leaves prefill while other rows decode (see the
    module's notes), noting its uids in `priming`: the caller drops each
    primed row's first emission (its prompt's last token) and then calls
    `first_token_sampled`."""
    prompts = gen._prompt_batch
    split = prompts.split

    def split_primed(indices):
        group = split(indices)
        if len(gen._generation_batch):
            group.generate = lambda tokens: _primed(group, tokens, priming)
        return group

    prompts.split = split_primed


def _primed(group, tokens: list[list[int]], priming: set[int]) -> GenerationBatch:
    """mlx-lm's PromptProcessingBatch.generate, less the forward pass."""
    if any(len(t) > 1 for t in tokens):
        group.prompt([t[:-1] for t in tokens])
    rows = GenerationBatch(group.model, [], mx.array([], dtype=mx.uint32), [], [], [],
                           group.fallback_sampler, [], [], [])
    n = len(group.uids)
    rows.uids, rows.prompt_cache, rows.tokens = group.uids, group.prompt_cache, group.tokens
    rows.samplers, rows.logits_processors = group.samplers, group.logits_processors
    rows.stop_sequences, rows.max_tokens = group.stop_sequences, group.max_tokens
    rows._next_tokens = mx.array([t[-1] for t in tokens])
    rows._next_logprobs = [None] * n
    rows._token_context = [TokenBuffer(t) for t in group.tokens]
    rows._num_tokens = [-1] * n  # the priming emission is no generated token
    rows._matchers = [_AfterPriming(ss.matcher()) for ss in group.stop_sequences]
    priming.update(rows.uids)
    group.uids, group.prompt_cache, group.tokens = [], [], []
    group.samplers, group.logits_processors, group.max_tokens = [], [], []
    return rows


def _step(b, wants_logprobs: Collection[int], grammars: dict,
          mask_logits: Callable, priming: Collection[int]) -> tuple[list[int], list]:
    # What the last call started becomes this step's result; this call
    # starts the next token's computation before waiting for it.
    b._current_tokens, b._current_logprobs = b._next_tokens, b._next_logprobs
    inputs = b._current_tokens
    logits = b.model(inputs[:, None], cache=b.prompt_cache)[:, -1, :]
    if grammars:
        # A primed row's input is its prompt's last token, no grammar's:
        # its first-token processor masks this step's logits.
        active = {u: g for u, g in grammars.items() if u not in priming} if priming \
            else grammars
        if active:
            logits = mask_logits(logits, inputs, b.uids, active)
    contexts = []
    # Only the rows with processors are cut out and put back: one request
    # with a penalty or a grammar costs the batch one row's work, not B.
    processed = [i for i, processors in enumerate(b.logits_processors) if processors]
    if processed:
        rows = []
        for i in processed:
            row = logits[i:i + 1]
            context = b._token_context[i].update_and_fetch(inputs[i:i + 1])
            contexts.append(context)
            for process in b.logits_processors[i]:
                row = process(context, row)
            rows.append(row)
        if len(processed) == len(b.uids):
            logits = mx.concatenate(rows, axis=0)
        else:
            logits[mx.array(processed)] = mx.concatenate(rows, axis=0)
    samplers = [b.fallback_sampler if s is None else s for s in b.samplers or ()]
    one_sampler = not samplers or all(s is samplers[0] for s in samplers)
    sampler: Callable = samplers[0] if samplers else b.fallback_sampler
    asking = [i for i, uid in enumerate(b.uids) if uid in wants_logprobs] if wants_logprobs else []
    b._next_logprobs = [None] * len(b.uids)
    if one_sampler and sampler is greedy_sampler and not asking:
        b._next_tokens = mx.argmax(logits, axis=-1)
    else:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if one_sampler:
            b._next_tokens = sampler(logprobs)
        else:
            b._next_tokens = mx.concatenate(
                [s(logprobs[i:i + 1]) for i, s in enumerate(samplers)], axis=0)
        for i in asking:
            b._next_logprobs[i] = logprobs[i]
    mx.async_eval(b._next_tokens, [b._next_logprobs[i] for i in asking], contexts)
    mx.eval(inputs, [lp for lp in b._current_logprobs if lp is not None])
    tokens = inputs.tolist()
    for kept, token in zip(b.tokens, tokens):
        kept.append(token)
    return tokens, b._current_logprobs
