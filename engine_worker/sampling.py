"""Per-request samplers and logits processors.

Each request in the shared batch keeps its own sampler and processors; the
batch generator calls them row by row. A greedy request without processors
gets `None`, so an all-greedy batch samples in one batched argmax.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import (
    LogitsProcessor,
    Sampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
)


class SamplingError(ValueError):
    """A sampling parameter out of range: `field` names it (as in
    SamplingParams), the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    # None: the penalties see the whole sequence so far.
    penalty_context_size: int | None = None

    def validate(self, vocab_size: int) -> None:
        """Refuse what cannot be honoured; a top_k of the vocabulary or more
        keeps every token, so it becomes 0 (off) rather than an error."""
        if self.top_k >= vocab_size:
            self.top_k = 0
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("penalty_context_size",
             self.penalty_context_size is None or self.penalty_context_size > 0, "must be > 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingError(name, f"{name} {why}")
        for token, bias in self.logit_bias.items():
            if not 0 <= token < vocab_size:
                raise SamplingError("logit_bias", f"logit_bias token {token} is outside the "
                                                  f"vocabulary (0..{vocab_size - 1})")
            if not -100 <= bias <= 100:
                raise SamplingError("logit_bias", f"logit_bias value {bias} must be in "
                                                  "[-100, 100]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def make_sampler(params: SamplingParams) -> Sampler | None:
    """A sampler with its own random key, so a seeded request draws the same
    tokens whatever else shares the batch."""
    if params.is_greedy:
        return None
    filters = []
    if params.top_p < 1:
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    key = [mx.random.key(seed)]
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        key[0], step_key = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=step_key)

    return sample


def make_processors(params: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """The request's logits processors. The batch generator hands them the
    whole sequence so far, prompt then output (`prompt_len` tokens of prompt).

    repetition_penalty looks at both, as vLLM's does; presence and frequency
    penalties count only generated tokens, as OpenAI defines them (counting
    the prompt penalised the chat template's end-of-turn token, and a reply
    ran on to max_tokens)."""
    context = params.penalty_context_size or 1 << 30  # "all of it"
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
        repetition_context_size=context,
    )
    if params.presence_penalty or params.frequency_penalty:
        processors.append(_output_penalties(params.presence_penalty, params.frequency_penalty,
                                            prompt_len, context))
    return processors


def _output_penalties(presence: float, frequency: float, prompt_len: int,
                      context: int) -> LogitsProcessor:
    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        start = max(prompt_len, tokens.size - context)
        if start >= tokens.size:
            return logits
        generated = tokens[start:]
        if presence:
            logits[:, generated] -= presence  # once per distinct token
        if frequency:
            logits = logits.at[:, generated].subtract(frequency)  # once per occurrence
        return logits

    return penalize


def guarded(params: SamplingParams, prompt_len: int, failed: Callable[[str], None],
            inject_fault: bool = False, first_token: LogitsProcessor | None = None,
            ) -> tuple[Sampler | None, list[LogitsProcessor]]:
    """The request's sampler and processors, wrapped so that one raising
    reports it through `failed` and lets the step go on: one request fails,
    not the whole batch. `first_token`: a processor for the first token
    only, run after the request's own (its grammar's mask; later tokens are
    masked by the decode step, grammar.mask_logits); its wrapper is marked
    `first_token_only`. `inject_fault`: a processor that raises after two
    generated tokens (tests, through VLLM_MLX_FAULT_INJECTION)."""
    sampler = make_sampler(params)
    processors = make_processors(params, prompt_len)
    if first_token is not None:
        processors.append(first_token)
    if inject_fault:
        processors.append(_fault_after(prompt_len + 2))

    def guard_processor(p: LogitsProcessor) -> LogitsProcessor:
        def run(tokens: mx.array, logits: mx.array) -> mx.array:
            try:
                return p(tokens, logits)
            except Exception as e:
                failed(f"logits processor failed: {e}")
                return logits
        run.first_token_only = p is first_token
        return run

    def guard_sampler(s: Sampler) -> Sampler:
        def run(logprobs: mx.array) -> mx.array:
            try:
                return s(logprobs)
            except Exception as e:
                failed(f"sampler failed: {e}")
                return mx.argmax(logprobs, axis=-1)
        return run

    return (guard_sampler(sampler) if sampler else None,
            [guard_processor(p) for p in processors])


def _fault_after(n_tokens: int) -> LogitsProcessor:
    def fault(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size > n_tokens:
            raise RuntimeError("injected fault")
        return logits
    return fault
