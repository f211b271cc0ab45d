"""The grammar a request's output must follow, from what it asks for: a
StructuredOutput (JSON Schema, any JSON object, regex, choice, Lark or GBNF
grammar), or tool_choice "required" or a named function. Written in
llguidance's JSON form and checked here, in the front end, so that a bad
schema is a 400 naming what is wrong; the core compiles it again
(grammar.compile) and enforces it.

With a reasoning model the thinking stays free: the grammar is "anything,
up to and including the end of the think block, then the answer".
"""

import json
from dataclasses import dataclass

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from engine_worker.reasoning import ThinkTags
from engine_worker.tool_calls import ToolFormat, calls_grammar, lark_literal
from vllm_mlx.v1 import engine_pb2 as pb

# Compact JSON, as OpenAI's structured outputs are: a model left free to
# add whitespace can spend every remaining token on it.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ValueError):
    """`field`: the GenerateRequest field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class Constraint:
    """What a request's output must be: `answer` (llguidance's grammar entry,
    a dict), and with `thinking` the free think block before it."""
    answer: dict
    field: str


def from_structured_output(so: pb.StructuredOutput) -> Constraint | None:
    kind = so.WhichOneof("kind")
    field = f"structured_output.{kind}"
    if kind is None:
        return None
    if kind == "json_object":
        return Constraint({"json_schema": {"type": "object", "x-guidance": JSON_LAYOUT}}, field)
    if kind == "json_schema":
        try:
            schema = json.loads(so.json_schema)
        except json.JSONDecodeError as e:
            raise GrammarError(field, f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(field, "the JSON schema must be an object")
        return Constraint({"json_schema": {**schema, "x-guidance": JSON_LAYOUT}}, field)
    if kind == "regex":
        # \d, \w and \s mean ASCII, as in JSON Schema patterns (and what
        # clients expect of [0-9]-like classes), not Unicode's hundreds of digits.
        lark = f"start: /{llguidance.regex_to_lark(so.regex, 'dw')}/"
        return Constraint({"lark_grammar": lark}, field)
    if kind == "choice":
        if not so.choice.options:
            raise GrammarError(field, "choice needs at least one option")
        lark = "start: " + " | ".join(json.dumps(o) for o in so.choice.options)
        return Constraint({"lark_grammar": lark}, field)
    try:
        lark = any_to_lark(so.grammar)  # GBNF becomes Lark; Lark stays as it is
    except Exception as e:
        raise GrammarError(field, f"the grammar could not be read: {e}") from None
    return Constraint({"lark_grammar": lark}, field)


def from_tool_choice(tools: list[dict], choice: pb.ToolChoice, parallel: bool,
                     fmt: ToolFormat | None, special_ids: dict[str, int]) -> Constraint | None:
    """The grammar that makes the reply calls: None for "auto" and "none"."""
    field = "chat.tool_choice"
    if choice.mode not in (pb.ToolChoice.MODE_REQUIRED, pb.ToolChoice.MODE_FUNCTION):
        return None
    if fmt is None:
        raise GrammarError(field, "this model's chat template has no known tool-call format; "
                                  "start the server with --tool-call-parser")
    if choice.mode == pb.ToolChoice.MODE_FUNCTION:
        tools = [t for t in tools if t["function"]["name"] == choice.function]
        if not tools:
            raise GrammarError(field, f"tool_choice names {choice.function!r}, which is not "
                                      f"among the tools")
        parallel = False
    return Constraint({"lark_grammar": calls_grammar(tools, fmt, parallel, special_ids)}, field)


def grammar(constraint: Constraint, thinking: bool | None, tags: ThinkTags,
            special_ids: dict[str, int]) -> str:
    """llguidance's JSON form. `thinking`: None without a reasoning parser;
    True when the prompt leaves a think block open, False when the output
    may open one."""
    if thinking is None:
        return json.dumps({"grammars": [constraint.answer]})
    close = lark_literal(tags.close, special_ids)
    if close.startswith("<["):
        think = f"think: /(?s:.*)/ {close}\n"
    else:
        think = f"think[lazy]: /(?s:.*){_regex_escape(tags.close)}/\n"
    opening = "" if thinking else f"({lark_literal(tags.open, special_ids)} think)?"
    start = f"start: {opening or 'think'} @answer\n"
    return json.dumps({"grammars": [{"lark_grammar": start + think},
                                    {**constraint.answer, "name": "answer"}]})


def check(grammar_json: str, tokenizer: llguidance.LLTokenizer, field: str) -> None:
    error = llguidance.LLMatcher.validate_grammar(grammar_json, tokenizer)
    if error:
        raise GrammarError(field, f"{field.rsplit('.', 1)[-1]} cannot be enforced: {error}")


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\/.^$*+?()[]{}|" else c for c in text)
