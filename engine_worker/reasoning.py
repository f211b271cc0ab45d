"""Splitting a reasoning model's thinking from its answer, as text streams.

Qwen3 and the DeepSeek-R1 family think between `<think>` and `</think>`.
DeepSeek-R1's chat template opens the block in the prompt itself, so its
output starts inside it; Qwen3 opens it in the output, or, asked not to
think (`chat_template_kwargs={"enable_thinking": false}`), gets an empty,
closed block in the prompt. So whether the output starts inside the block is
read off the prompt (`starts_thinking`), and a block may also open at the
output's very start. Text that may be the start of a tag is held back until
the next piece settles it, so a tag never leaks into either part.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkTags:
    open: str = "<think>"
    close: str = "</think>"

    @property
    def markup(self) -> set[str]:
        return {self.open, self.close}


TAGS = ThinkTags()


def starts_thinking(prompt_tail: str, tags: ThinkTags = TAGS) -> bool:
    """True when the prompt (its rendered end) leaves a think block open."""
    return prompt_tail.rfind(tags.open) > prompt_tail.rfind(tags.close)


class ReasoningSplitter:
    """Feed text pieces; get (reasoning, answer) pieces back."""

    def __init__(self, thinking: bool, tags: ThinkTags = TAGS):
        self.tags = tags
        self._thinking = thinking
        self._at_start = not thinking  # a block may open only before any answer text
        self._pending = ""
        self._after_tag = False  # newlines right after a tag belong to neither part

    def add(self, text: str) -> tuple[str, str]:
        reasoning, answer = [], []
        pending = self._pending + text
        self._pending = ""
        while pending:
            if self._after_tag:
                pending = pending.lstrip("\n")
                if not pending:
                    break
                self._after_tag = False
            if self._thinking:
                cut = pending.find(self.tags.close)
                if cut < 0:
                    keep = _partial_suffix(pending, self.tags.close)
                    reasoning.append(pending[:len(pending) - keep])
                    self._pending = pending[len(pending) - keep:]
                    break
                reasoning.append(pending[:cut])
                pending = pending[cut + len(self.tags.close):]
                self._thinking, self._at_start, self._after_tag = False, False, True
                continue
            if self._at_start:
                stripped = pending.lstrip()
                if stripped.startswith(self.tags.open):
                    pending = stripped[len(self.tags.open):]
                    self._thinking, self._at_start, self._after_tag = True, False, True
                    continue
                if self.tags.open.startswith(stripped):  # too early to tell
                    self._pending = pending
                    break
                self._at_start = False
            answer.append(pending)
            break
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the output ends."""
        pending, self._pending = self._pending, ""
        return (pending, "") if self._thinking else ("", pending)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
