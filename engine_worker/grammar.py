"""Constrained decoding inside the batch: each constrained request's grammar
(llguidance) allows a set of tokens at every step, and every other token's
logit becomes -inf before sampling.

The masks are computed while the device runs the step's forward pass: the
decode step (mlx_compat) starts the forward pass, then waits for the
previous step's tokens (which the forward pass needs anyway), advances each
grammar by its row's token and fills the rows' masks on the CPU, and only
then adds the masking and sampling to the graph. Rows without a grammar pay
nothing but that short wait, and a batch without one skips all of it.

Grammars are compiled by the core's reader thread (`compile`), not the
loop's. Everything else here runs on the loop's thread.
"""

from collections.abc import Callable

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from engine_worker import mlx_compat

_NEG_INF = -float("inf")  # a Python scalar: the select keeps the logits' dtype


def make_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (mlx-lm's TokenizerWrapper);
    `vocab_size` is the width of the logits, which may exceed the tokenizer's."""
    return llguidance.hf.from_tokenizer(mlx_compat.hf_tokenizer(tokenizer), n_vocab=vocab_size,
                                        eos_token=sorted(tokenizer.eos_token_ids))


def compile(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A matcher for `grammar` (llguidance's JSON form, as structured.py
    writes it); raises ValueError if it cannot be built."""
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    if matcher.is_error():
        raise ValueError(f"the grammar is invalid: {matcher.get_error()}")
    return matcher


class GrammarRow:
    """One running request's grammar. Its first token is sampled through
    `first_token` (a logits processor, dropped once that token is sampled:
    mlx_compat), by mlx-lm's own step as the request leaves prefill, or by
    the batch's next step where the request joins it primed; every later
    step hands `advance` the token its row sampled last, then fills its mask."""

    def __init__(self, matcher: llguidance.LLMatcher, failed: Callable[[str], None]):
        self.matcher = matcher
        self.failed = failed  # ends the request with an error after this step

    def first_token(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Masks the logits of the first token (it depends on no token, so
        nothing waits)."""
        vocab = logits.shape[-1]
        masks = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)
        _fill(self.matcher, masks[0])
        return _masked(_words(masks), logits)

    def advance(self, token: int) -> bool:
        """Feed the row's last token; False when the request cannot go on."""
        m = self.matcher
        if m.is_stopped():  # done; the token was its EOS
            return True
        if not m.consume_token(token):
            self.failed(f"the output left its grammar: {m.get_error() or 'token not allowed'}")
            return False
        return True


def mask_logits(logits: mx.array, inputs: mx.array, uids: list[int],
                rows: dict[int, GrammarRow]) -> mx.array:
    """`logits` (batch x vocab, the step's, not yet evaluated) with each
    constrained row's disallowed tokens at -inf. `inputs`: the tokens the
    step's rows were fed (the previous step's samples)."""
    constrained = [(i, rows[uid]) for i, uid in enumerate(uids) if uid in rows]
    if not constrained:
        return logits
    mx.async_eval(logits)  # the forward pass runs while the CPU fills the masks
    last = inputs.tolist()
    vocab = logits.shape[-1]
    masks = np.full((len(constrained), (vocab + 31) // 32), -1, dtype=np.int32)
    for k, (i, row) in enumerate(constrained):
        if row.advance(last[i]):
            _fill(row.matcher, masks[k])
    words = _words(masks)
    if len(constrained) == len(uids):  # one select, not a gather and a scatter
        return _masked(words, logits)
    at = mx.array([i for i, _ in constrained])
    logits[at] = _masked(words, logits[at])
    return logits


def _words(masks: np.ndarray) -> mx.array:
    # Unsigned, so that shifting right brings in zeros.
    return mx.array(masks.view(np.uint32))


@mx.compile
def _masked(words: mx.array, logits: mx.array) -> mx.array:
    """`logits` (rows x vocab) with -inf where the rows' mask words (bit j
    of word w: token 32w + j) hold a zero. Unpacked on the device, in one
    fused kernel with the select: the mask crosses as a 32nd of the
    vocabulary, and on a 2-core CPU the whole took a quarter of what
    numpy's unpacking and an unfused select did (49,152 tokens: 31 against
    123 us a row)."""
    bits = (words[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, :logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, _NEG_INF)


def _fill(matcher: llguidance.LLMatcher, row: np.ndarray) -> None:
    # llguidance writes the row in place (and releases the GIL meanwhile).
    matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
