"""Log-probabilities of prompt tokens, taken from the prompt pass itself.

mlx-lm's PromptProcessingBatch runs the model over each chunk of the prompts
and keeps only the KV cache: the logits it returns are never evaluated, so
their last projection is never computed. For the rows whose requests asked
for prompt log-probabilities (evaluation clients scoring a text), `install`
catches those logits as the pass makes them and scores each position against
the prompt token that follows it: one forward pass, not a second scoring
pass, and rows that did not ask cost nothing more.

The generator's prompt batch is one object for its life (mlx-lm extends it
with each admitted group), so installing once per generator is enough, as
with mlx_compat.install_decode_step.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from engine_worker.messages import TokenLogprob


@dataclass
class PromptScores:
    """One request's prompt and what its prompt pass has scored so far."""
    prompt: list[int]
    top: int
    scored: list[TokenLogprob] = field(default_factory=list)


def install(prompt_batch, wanted: dict[int, PromptScores]) -> None:
    """Wrap `prompt_batch.prompt` (mlx-lm's PromptProcessingBatch).
    `wanted`: uid -> PromptScores for the rows that asked, kept by the caller."""
    run_pass = prompt_batch.prompt

    def prompt(tokens: list[list[int]]) -> None:
        rows = [(i, wanted[uid]) for i, uid in enumerate(prompt_batch.uids) if uid in wanted]
        if not rows or not tokens:
            return run_pass(tokens)
        # Where each row's chunk starts in its prompt: mlx-lm appends the
        # chunk to the row's tokens when the pass begins.
        starts = [len(prompt_batch.tokens[i]) for i, _ in rows]
        lengths = [len(tokens[i]) for i, _ in rows]
        model = prompt_batch.model
        prompt_batch.model = _scoring(model, rows, starts, lengths)
        try:
            run_pass(tokens)
        finally:
            prompt_batch.model = model

    prompt_batch.prompt = prompt


def _scoring(model, rows: list[tuple[int, PromptScores]], starts: list[int],
             lengths: list[int]) -> Callable:
    """The model, scoring each call's logits for `rows`. mlx-lm calls it once
    per prefill_step_size columns of the (right-padded) chunk."""
    done = [0]  # columns of the chunk already run

    def forward(inputs: mx.array, *args, **kwargs) -> mx.array:
        logits = model(inputs, *args, **kwargs)
        offset, width = done[0], inputs.shape[1]
        done[0] += width
        for (i, scores), start, length in zip(rows, starts, lengths):
            n = min(width, length - offset)  # the row's real (unpadded) columns
            if n > 0:
                at = start + offset  # prompt position of the first column
                _score(logits[i, :n], scores, at)
        return logits

    return forward


def _score(logits: mx.array, scores: PromptScores, at: int) -> None:
    """Logits of positions at..at+n-1 score prompt tokens at+1..at+n."""
    targets = mx.array(scores.prompt[at + 1:at + 1 + logits.shape[0]])
    logits = logits[:targets.size].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)
    ranks = (logprobs > chosen).sum(axis=-1) + 1
    k = scores.top
    if k > 0:
        top_ids = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
        top_values = mx.take_along_axis(logprobs, top_ids, axis=-1)
        mx.eval(chosen, ranks, top_ids, top_values)
        tops = [sorted(zip(ids, values), key=lambda t: -t[1])
                for ids, values in zip(top_ids.tolist(), top_values.tolist())]
    else:
        mx.eval(chosen, ranks)
        tops = [[] for _ in range(targets.size)]
    for token, value, rank, top in zip(targets.tolist(), chosen[:, 0].tolist(),
                                       ranks.tolist(), tops):
        scores.scored.append(TokenLogprob(token, value, top, rank))
