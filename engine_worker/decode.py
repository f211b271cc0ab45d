"""The engine's decode step: mlx-lm's, less the work no request asked for.

mlx-lm's GenerationBatch splits every step's log-probabilities into one array
per row and evaluates them all, and normalizes logits even when every row
samples greedily. A tiny model's step is CPU-bound (launching kernels), so
those per-row arrays showed as per-row cost (docs/benchmarks.md). Here a row
gets its log-probabilities only if its request asked for them, and an
all-greedy batch that wants none takes the argmax of the raw logits (the
same token: normalizing subtracts one constant per row).

`install` puts the step on the generator's decoding batch, the one object
mlx-lm keeps for the generator's life and extends with each prefilled group.
A group's first token still comes from mlx-lm's own step, when the group
leaves prefill; every later token comes from here. It reads and writes the
batch's own fields, as mlx-lm's `_step` does, so it is tied to the pinned
mlx-lm version (pyproject.toml); the scheduler tests pin its behaviour.
"""

from collections.abc import Callable, Collection

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler


def install(decoding, wants_logprobs: Collection[int]) -> None:
    """Replace `decoding._step` (mlx-lm's GenerationBatch). `wants_logprobs`:
    the uids whose requests asked for log-probabilities, kept by the caller."""
    decoding._step = lambda: _step(decoding, wants_logprobs)


def _step(b, wants_logprobs: Collection[int]) -> tuple[list[int], list]:
    # What the last call started becomes this step's result; this call
    # starts the next token's computation before waiting for it.
    b._current_tokens, b._current_logprobs = b._next_tokens, b._next_logprobs
    inputs = b._current_tokens
    logits = b.model(inputs[:, None], cache=b.prompt_cache)[:, -1, :]
    contexts = []
    if any(b.logits_processors):
        rows = []
        for i, processors in enumerate(b.logits_processors):
            row = logits[i:i + 1]
            if processors:
                context = b._token_context[i].update_and_fetch(inputs[i:i + 1])
                contexts.append(context)
                for process in processors:
                    row = process(context, row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
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
