"""Tool calls: the formats models write them in, the grammar that enforces
`tool_choice` "required" or a named function, and the parser that takes
calls out of the text as it streams.

Formats (`--tool-call-parser`, or detected from the chat template):
- hermes (Qwen2.5, Qwen3, Hermes, many fine-tunes):
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block
  per call.
- llama3_json (Llama 3.1 to 3.3): the reply is `{"name": "f", "parameters":
  {...}}`, optionally after `<|python_tag|>`, calls joined by "; ".
- mistral: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`.

Text before a call's markup is content; the markup never is. A call that
does not parse is left in the content as the model wrote it.
"""

import json
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str        # the markup that opens the calls
    end: str          # what closes one call's block ("" : the output's end)
    arguments: str    # the key of the arguments object
    separator: str    # between two calls
    only_at_start: bool = False  # the markup counts only at the reply's start

    @property
    def markup(self) -> set[str]:
        return {self.start, self.end} - {""}


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", "\n"),
    "llama3_json": ToolFormat("llama3_json", "<|python_tag|>", "", "parameters", "; ",
                              only_at_start=True),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", ", "),
}


def detect(chat_template: str | None) -> ToolFormat | None:
    """The format a chat template renders tool calls in, if it names one."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if "<|python_tag|>" in t or "ipython" in t:
        return FORMATS["llama3_json"]
    return None


def call_schema(tool: dict, fmt: ToolFormat) -> dict:
    """JSON Schema of one call of `tool` (an OpenAI tool definition)."""
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object",
            "properties": {"name": {"const": fn["name"]}, fmt.arguments: params},
            "required": ["name", fmt.arguments], "additionalProperties": False}


def lark_literal(text: str, special_ids: dict[str, int]) -> str:
    """`text` in Lark: a special token by id (the only way a grammar can
    produce one), else a string."""
    if text in special_ids:
        return f"<[{special_ids[text]}]>"
    return json.dumps(text)


def calls_grammar(tools: list[dict], fmt: ToolFormat, parallel: bool,
                  special_ids: dict[str, int]) -> str:
    """A Lark grammar for one call or more (`parallel`) of `tools`, in `fmt`."""
    schema = {"anyOf": [call_schema(t, fmt) for t in tools]}
    compact = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    call = "%json " + json.dumps({**schema, "x-guidance": compact})
    start = lark_literal(fmt.start, special_ids)
    sep = json.dumps(fmt.separator)
    more = f"({sep} call)*" if parallel else ""
    if fmt.name == "hermes":
        end = lark_literal(fmt.end, special_ids)
        return (f'start: block{more.replace("call", "block")}\n'
                f'block: {start} "\\n" call "\\n" {end}\ncall: {call}\n')
    if fmt.name == "mistral":
        return f'start: {start} "[" call {more} "]"\ncall: {call}\n'
    return f"start: call {more}\ncall: {call}\n"  # llama3_json: bare JSON


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text


def parse_calls(body: str, fmt: ToolFormat) -> list[ParsedCall] | None:
    """The calls in `body` (what follows the opening markup, for hermes one
    block's inside); None unless every one parses."""
    text = body.strip()
    if fmt.name == "mistral":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return None
        items = items if isinstance(items, list) else [items]
    elif fmt.name == "llama3_json":
        items = []
        for part in text.split(fmt.separator) if text else []:
            try:
                items.append(json.loads(part))
            except json.JSONDecodeError:
                return None
    else:
        try:
            items = [json.loads(text)]
        except json.JSONDecodeError:
            return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get(fmt.arguments, item.get("arguments", item.get("parameters", {})))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ParsedCall(f"call_{uuid.uuid4().hex[:24]}", item["name"],
                                json.dumps(args, ensure_ascii=False)))
    return calls or None


class ToolCallParser:
    """Feed text pieces; `add` returns the content to show now and the calls
    completed so far (each whole: id, name and arguments). `parallel` False
    keeps only the first call."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True):
        self.fmt = fmt
        self.parallel = parallel
        self.calls: list[ParsedCall] = []
        self._pending = ""     # text that may begin the markup
        self._body: str | None = None  # inside the markup
        self._opened = ""  # the markup that opened it, as written
        self._seen_text = False

    def add(self, text: str) -> tuple[str, list[ParsedCall]]:
        fmt = self.fmt
        new: list[ParsedCall] = []
        content = []
        pending = self._pending + text
        self._pending = ""
        while pending:
            if self._body is not None:
                self._body += pending
                pending = ""
                if fmt.end:  # one block at a time (hermes)
                    while (cut := self._body.find(fmt.end)) >= 0:
                        block, rest = self._body[:cut], self._body[cut + len(fmt.end):]
                        calls = parse_calls(block, fmt)
                        if calls is None:  # malformed: the model's text, as written
                            content.append(self._opened + block + fmt.end)
                        else:
                            new += calls
                        self._body = None
                        pending = rest
                        break
                continue
            at = self._opening(pending)
            if at is None:  # no markup yet; hold back what may begin it
                keep = 0 if (fmt.only_at_start and self._seen_text) else _held(pending, fmt)
                content.append(pending[:len(pending) - keep])
                self._pending = pending[len(pending) - keep:]
                if pending[:len(pending) - keep].strip():
                    self._seen_text = True
                break
            start, skip = at
            content.append(pending[:start])
            self._body, self._opened = "", pending[start:start + skip]
            pending = pending[start + skip:]
        shown = "".join(content)
        if self._opened and not shown.strip():  # the whitespace between calls
            shown = ""
        return shown, self._keep(new)

    def _opening(self, text: str) -> tuple[int, int] | None:
        """Where the markup starts in `text` and how long it is."""
        fmt = self.fmt
        if fmt.only_at_start:
            if self._seen_text:
                return None
            stripped = text.lstrip()
            lead = len(text) - len(stripped)
            if stripped.startswith(fmt.start):
                return lead, len(fmt.start)
            if stripped.startswith("{"):
                return lead, 0
            return None
        at = text.find(fmt.start)
        return None if at < 0 else (at, len(fmt.start))

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The end of the output: calls without a closing markup, and what
        was held back."""
        pending, self._pending = self._pending, ""
        body, self._body = self._body, None
        if body is None:
            return pending, []
        calls = parse_calls(body, self.fmt) if body.strip() else None
        if calls is None:  # malformed or cut short: the model's text, as written
            return self._opened + body, []
        return pending, self._keep(calls)

    def _keep(self, new: list[ParsedCall]) -> list[ParsedCall]:
        if not self.parallel:
            new = new[:max(0, 1 - len(self.calls))]
        self.calls += new
        return new


def _held(text: str, fmt: ToolFormat) -> int:
    """The length of the end of `text` that may be the start of the markup."""
    if fmt.only_at_start:
        stripped = text.strip()
        return len(text) if (not stripped or fmt.start.startswith(stripped)) else 0
    for n in range(min(len(fmt.start) - 1, len(text)), 0, -1):
        if fmt.start.startswith(text[-n:]):
            return n
    return 0
