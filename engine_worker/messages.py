"""What crosses between the engine's front end and its core: requests in,
each decode step's outputs out, and the refusals either side raises.

The front end (server.py) and the core (core.py, loop.py) meet here
only; both pickle these over one pipe, once per request and once per step.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from engine_worker.sampling import SamplingParams


class QueueFull(Exception):
    """More than max_num_seqs + max_queue requests in flight. The front end
    checks first; the core's own refusal reaches the client the same way
    (RESOURCE_EXHAUSTED, a 429), finish reason "rejected"."""


class DuplicateRequest(Exception):
    pass


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int = 0  # set for prompt tokens (1: the most likely)


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    include_stop: bool = False
    # Log-probabilities of the prompt's tokens after the first, with this
    # many alternatives each; None: not asked for (see prefill.py).
    prompt_logprobs: int | None = None
    # Vision-language models: each image or video of the prompt, in prompt
    # order, as its processor's tensors by name (pixel_values, image_grid_thw,
    # ...); the prompt already holds each item's placeholder tokens. From the
    # front end they cross the pipe as vllm_mlx.ipc.shared_tensors.SharedTensors;
    # the core's reader thread makes them the model's MLX arguments
    # (vision.py's media_inputs), so the loop's thread does not copy them.
    media: list[dict[str, np.ndarray]] | dict[str, Any] = field(default_factory=list)
    # Where each item's tokens lie in the prompt, with its content hash
    # (blocks.MediaSpan): what lets the prefix cache tell pictures apart.
    media_spans: list[tuple[int, int, str]] = field(default_factory=list)
    # Constrained decoding: the grammar the output follows, in llguidance's
    # JSON form ("": none). The core's reader thread compiles it into
    # `matcher` (grammar.compile) before the loop sees the request.
    grammar: str = ""
    matcher: Any = None
    # Block keys of all but the prompt's last token (blocks.py), set by the
    # core when the prefix cache may serve it.
    prefix_keys: list[int] = field(default_factory=list)


class Output(NamedTuple):
    """One step's news for one request: a token, a finish, or both. A tuple,
    since one batch of these crosses a process boundary every decode step."""

    request_id: str
    token: int | None
    # stop (EOS or a stop token id: `token` is it), length, abort, error
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None
    error: str = ""
    # With the request's first token, when it asked: one per prompt token
    # after the first.
    prompt_logprobs: list[TokenLogprob] | None = None


class StepOutputs:
    """One step's outputs, in order, kept as they cross the pipe: the plain
    ones (a token, no finish, no logprob: nearly all) as two columns, request
    ids and tokens; the others whole, each with its position among the plain
    ones. The loop appends to the columns directly, and pickling two lists
    costs a fraction of a tuple per output: this runs every decode step
    (docs/benchmarks.md). Iterating gives the `Output`s in order."""

    __slots__ = ("ids", "tokens", "others")

    def __init__(self, ids: list[str] | None = None, tokens: list[int] | None = None,
                 others: list[tuple[int, Output]] | None = None):
        self.ids = [] if ids is None else ids
        self.tokens = [] if tokens is None else tokens
        self.others = [] if others is None else others

    def add(self, out: Output) -> None:
        if out.finish_reason is None and out.logprob is None and out.prompt_logprobs is None:
            self.ids.append(out.request_id)
            self.tokens.append(out.token)
        else:
            self.others.append((len(self.ids), out))

    def __len__(self) -> int:
        return len(self.ids) + len(self.others)

    def __iter__(self) -> Iterator[Output]:
        ids, tokens, done = self.ids, self.tokens, 0
        for at, out in self.others:
            for i in range(done, at):
                yield Output(ids[i], tokens[i])
            done = at
            yield out
        for i in range(done, len(ids)):
            yield Output(ids[i], tokens[i])

    def to_wire(self) -> tuple:
        """Plain lists and tuples, for pickle; `from_wire` undoes it."""
        return self.ids, self.tokens, [(at, tuple(out)) for at, out in self.others]

    @classmethod
    def from_wire(cls, ids: list[str], tokens: list[int],
                  others: list[tuple[int, tuple]]) -> "StepOutputs":
        return cls(ids, tokens, [(at, Output._make(out)) for at, out in others])
