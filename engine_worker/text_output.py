"""Turning one request's token stream into text deltas, with stop strings.

Text that might be the start of a stop string is held back until the next
token settles it, so a stop string never reaches the client, even when it is
split across tokens. Partial UTF-8 characters are held back by the
detokenizer itself.
"""

from mlx_lm.tokenizer_utils import StreamingDetokenizer


class TextOutput:
    def __init__(self, detokenizer: StreamingDetokenizer, stop: list[str]):
        self._detok = detokenizer
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._pending = ""

    def add(self, token: int) -> tuple[str, str | None]:
        """Feed one token; returns (text safe to emit, the stop string that matched)."""
        self._detok.add_token(token)
        return self._scan(self._detok.last_segment)

    def finish(self) -> str:
        """Flush what was held back once the request ends for a reason other
        than a stop string."""
        self._detok.finalize()
        text, matched = self._scan(self._detok.last_segment)
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
