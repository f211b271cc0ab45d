"""Turning one request's token stream into text deltas, with stop strings.

Text that might be the start of a stop string is held back until the next
token settles it, so a stop string never reaches the client, even when it is
split across tokens. Partial UTF-8 characters are held back by the
detokenizer itself.
"""

import copy

from mlx_lm.tokenizer_utils import StreamingDetokenizer

# Prompt tokens a continuation's detokenizer starts from (vLLM's choice too):
# enough for any word or character to be whole.
PRIMING_TOKENS = 6


class TextOutput:
    """`context`: the prompt's tokens when the output continues it (a
    completion) rather than starting a text of its own (a chat reply)."""

    def __init__(self, detokenizer: StreamingDetokenizer, stop: list[str],
                 context: list[int] | None = None):
        self._detok = detokenizer
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._pending = ""
        self._skip = self._prime(context[-PRIMING_TOKENS:]) if context else 0

    def _prime(self, tail: list[int]) -> int:
        """mlx-lm's detokenizers drop a leading space of the first token, as a
        text's start should; a continuation must keep it (" Paris" after "The
        capital of France is"). So the detokenizer first reads the prompt's
        last tokens, and what it renders of them is skipped: its length is
        that of a copy fed the same tokens and flushed (a held-back space
        belongs to the prompt)."""
        alone = copy.copy(self._detok)
        alone.reset()
        for t in tail:
            self._detok.add_token(t)
            alone.add_token(t)
        alone.finalize()
        return len(alone.text)

    def _read(self) -> str:
        segment = self._detok.last_segment
        if self._skip:
            cut = min(self._skip, len(segment))
            segment, self._skip = segment[cut:], self._skip - cut
        return segment

    def add(self, token: int) -> tuple[str, str | None]:
        """Feed one token; returns (text safe to emit, the stop string that matched)."""
        self._detok.add_token(token)
        return self._scan(self._read())

    def finish(self) -> str:
        """Flush what was held back once the request ends for a reason other
        than a stop string."""
        self._detok.finalize()
        text, matched = self._scan(self._read())
        if matched is None:
            text, self._pending = text + self._pending, ""
        return text

    def _scan(self, segment: str) -> tuple[str, str | None]:
        if not self._stop:
            return segment, None
        pending = self._pending + segment
        hits = [(i, s) for s in self._stop if (i := pending.find(s)) >= 0]
        if hits:
            index, matched = min(hits)
            self._pending = ""
            return pending[:index], matched
        hold = 0
        for n in range(min(self._longest - 1, len(pending)), 0, -1):
            tail = pending[-n:]
            if any(s.startswith(tail) for s in self._stop):
                hold = n
                break
        self._pending = pending[len(pending) - hold:]
        return pending[: len(pending) - hold], None


class TokenStream:
    """One request's tokens from the engine core, turned into what its client
    sees: text deltas with stop strings held back, the completion count, and
    why it finished. Runs in the front end, so the decode loop never
    detokenizes. `skipped`: token ids left out of the text (special tokens)."""

    def __init__(self, tokenizer, stop: list[str], include_stop: bool,
                 context: list[int] | None = None, skipped: frozenset[int] = frozenset()):
        self._tokenizer = tokenizer
        self._text = TextOutput(tokenizer.detokenizer, stop, context)
        self._include_stop = include_stop
        self._skipped = skipped
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # stop, length, abort, error
        self.stop_reason = ""                  # the stop string or stop token id
        self.error = ""
        self.stopped_by_string = False         # the core must be told to end it
        self.prompt_logprobs = None            # from the first output, when asked for

    def take(self, outputs) -> tuple[list[int], str, list]:
        """Consume outputs (messages.Output) in order; returns the new token
        ids, the text they settle and their logprobs. Outputs after the finish
        (the core runs on until it hears of a stop string) are dropped."""
        ids: list[int] = []
        pieces: list[str] = []
        logprobs = []
        for out in outputs:
            if self.finish_reason is not None:
                break
            reason = out.finish_reason
            if out.prompt_logprobs is not None:
                self.prompt_logprobs = out.prompt_logprobs
            if out.token is not None:
                self.completion_tokens += 1
                ids.append(out.token)
                if out.logprob is not None:
                    logprobs.append(out.logprob)
                if reason == "stop":  # EOS or a stop token id: not part of the text
                    pieces.append(self._text.finish())
                    if self._include_stop:
                        pieces.append(self._tokenizer.decode([out.token]))
                    self.finish_reason, self.stop_reason = "stop", str(out.token)
                    break
                if out.token in self._skipped:
                    piece, matched = "", None
                else:
                    piece, matched = self._text.add(out.token)
                pieces.append(piece)
                if matched is not None:
                    if self._include_stop:
                        pieces.append(matched)
                    self.finish_reason, self.stop_reason = "stop", matched
                    self.stopped_by_string = True
                    break
            if reason is not None:
                if reason == "length":
                    pieces.append(self._text.finish())
                self.finish_reason, self.error = reason, out.error
        return ids, "".join(pieces), logprobs
