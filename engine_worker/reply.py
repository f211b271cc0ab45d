"""A reply's text split into what its client sees apart: the reasoning (a
think block), the content, and tool calls. Runs in the front end on the
text deltas TokenStream settles, first the think block off, then calls out
of the answer."""

from engine_worker.reasoning import ReasoningSplitter
from engine_worker.tool_calls import ParsedCall, ToolCallParser


class ReplyParser:
    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallParser | None):
        self._reasoning = reasoning
        self._tools = tools

    @property
    def markup(self) -> set[str]:
        """The strings it reads: the text must keep them."""
        tags = set()
        if self._reasoning is not None:
            tags |= self._reasoning.tags.markup
        if self._tools is not None:
            tags |= self._tools.fmt.markup
        return tags

    @property
    def calls(self) -> list[ParsedCall]:
        """Every call parsed so far."""
        return self._tools.calls if self._tools else []

    def add(self, text: str, final: bool) -> tuple[str, str, list[ParsedCall]]:
        """(content, reasoning, calls completed) of the next text delta;
        `final`: the reply ends with it, so nothing is held back."""
        reasoning, content = "", text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.add(text)
            if final:
                more_reasoning, more_content = self._reasoning.finish()
                reasoning, content = reasoning + more_reasoning, content + more_content
        calls: list[ParsedCall] = []
        if self._tools is not None:
            content, calls = self._tools.add(content)
            if final:
                rest, more = self._tools.finish()
                content, calls = content + rest, calls + more
        return content, reasoning, calls
