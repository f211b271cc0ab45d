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
life and extends with each prefilled group. A group's first token still
comes from mlx-lm's own step, when the group leaves prefill; every later
token comes from here.
"""

import importlib
import importlib.metadata
import types
from collections.abc import Callable, Collection

import mlx.core as mx
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
                        mask_logits: Callable) -> None:
    """Replace `decoding._step` (mlx-lm's GenerationBatch). `wants_logprobs`:
    the uids whose requests asked for log-probabilities; `grammars`: uid ->
    the grammar of a constrained request (grammar.GrammarRow), applied by
    `mask_logits` (grammar.mask_logits); both kept by the caller. Rows
    joining it leave their first-token-only processors behind
    (sampling.guarded marks them): their first token is sampled by then,
    and a row with no processor left skips the per-row path of every step."""
    decoding._step = lambda: _step(decoding, wants_logprobs, grammars, mask_logits)
    join = decoding.extend

    def extend(batch) -> None:
        if batch.logits_processors:
            batch.logits_processors = [
                [p for p in row if not getattr(p, "first_token_only", False)]
                for row in batch.logits_processors]
        join(batch)

    decoding.extend = extend


def _step(b, wants_logprobs: Collection[int], grammars: dict,
          mask_logits: Callable) -> tuple[list[int], list]:
    # What the last call started becomes this step's result; this call
    # starts the next token's computation before waiting for it.
    b._current_tokens, b._current_logprobs = b._next_tokens, b._next_logprobs
    inputs = b._current_tokens
    logits = b.model(inputs[:, None], cache=b.prompt_cache)[:, -1, :]
    if grammars:
        logits = mask_logits(logits, inputs, b.uids, grammars)
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
