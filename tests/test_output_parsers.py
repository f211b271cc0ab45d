"""The tool-call parsers and the reasoning splitter on outputs written the
way real models write them (the formats in their model cards and chat
templates), fed whole and in pieces of every size, as they stream. Malformed
calls stay content; nothing raises."""

import json

import pytest

from engine_worker.reasoning import ReasoningSplitter, starts_thinking
from engine_worker.reply import ReplyParser
from engine_worker.tool_calls import FORMATS, ToolCallParser, detect
from vllm_mlx.engine_args import TOOL_CALL_PARSERS

# (format, model output, expected content, expected [(name, arguments)])
RECORDED = [
    # Qwen2.5-7B-Instruct, two parallel calls (Qwen's function-calling guide).
    ("hermes",
     '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": '
     '"San Francisco, CA, USA"}}\n</tool_call>\n<tool_call>\n{"name": '
     '"get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
     '"date": "2024-10-01"}}\n</tool_call>',
     "", [("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA",
                                      "date": "2024-10-01"})]),
    # Hermes-2-Pro writes the arguments first, after some text.
    ("hermes",
     'Let me look that up.\n<tool_call>\n{"arguments": {"symbol": "TSLA"}, '
     '"name": "get_stock_fundamentals"}\n</tool_call>',
     "Let me look that up.\n", [("get_stock_fundamentals", {"symbol": "TSLA"})]),
    # Qwen3 stopping at EOS before the closing tag.
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "mlx"}}',
     "", [("search", {"q": "mlx"})]),
    # Malformed: a closing brace missing; left as the model wrote it.
    ("hermes", 'Sure.\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}\n</tool_call>',
     'Sure.\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}\n</tool_call>', []),
    # A "<" in prose is not markup.
    ("hermes", "Use a < b when a is smaller.", "Use a < b when a is smaller.", []),
    # Llama-3.1-8B-Instruct, JSON tool calling (its model card's format).
    ("llama3_json",
     '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
     '"unit": "Fahrenheit"}}',
     "", [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
    ("llama3_json",
     '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
     "", [("a", {"x": 1}), ("b", {})]),
    # Malformed: JSON-looking prose; and braces later in a plain answer.
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}',
     []),
    ("llama3_json", 'In JSON, write {"a": 1}.', 'In JSON, write {"a": 1}.', []),
    # Mistral-7B-Instruct-v0.3.
    ("mistral",
     '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
     '"format": "celsius"}}]',
     "", [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]),
    # Malformed: cut short by max_tokens.
    ("mistral", '[TOOL_CALLS][{"name": "get_current_weather", "argu',
     '[TOOL_CALLS][{"name": "get_current_weather", "argu', []),
]


def _run(parser: ToolCallParser, text: str, size: int) -> tuple[str, list]:
    content, calls = "", []
    for i in range(0, len(text), size):
        c, new = parser.add(text[i:i + size])
        content, calls = content + c, calls + new
    c, new = parser.finish()
    return content + c, calls + new


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
@pytest.mark.parametrize("size", [1, 2, 5, 13, 10_000])
def test_tool_call_parsers_on_recorded_outputs(fmt, text, content, calls, size):
    got_content, got_calls = _run(ToolCallParser(FORMATS[fmt]), text, size)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


def test_parallel_false_keeps_the_first_call():
    _, calls = _run(ToolCallParser(FORMATS["hermes"], parallel=False), RECORDED[0][1], 7)
    assert [c.name for c in calls] == ["get_current_temperature"]


def test_formats_are_detected_from_chat_templates_and_match_the_flag():
    assert detect("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}").name == \
        "hermes"
    assert detect("{{ '[TOOL_CALLS]' + calls | tojson }}").name == "mistral"
    assert detect("Environment: ipython{{ '<|python_tag|>' }}").name == "llama3_json"
    assert detect("{{ messages[0].content }}") is None
    assert tuple(FORMATS) == TOOL_CALL_PARSERS


# (whether the prompt leaves <think> open, output, reasoning, answer)
REASONING = [
    # Qwen3-8B thinking.
    (False, "<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\n"
            "The capital of France is Paris.",
     "The user asks for the capital of France. That is Paris.\n",
     "The capital of France is Paris."),
    # Qwen3 with enable_thinking=false: the template closed an empty block.
    (False, "The capital of France is Paris.", "", "The capital of France is Paris."),
    # DeepSeek-R1-Distill: the template opened the block; the output closes it.
    (True, "Okay, 2 + 2 is 4.\n</think>\n\nThe answer is **4**.", "Okay, 2 + 2 is 4.\n",
     "The answer is **4**."),
    # Cut short while thinking: all of it is reasoning.
    (True, "Hmm, let me consider </thi", "Hmm, let me consider </thi", ""),
]


@pytest.mark.parametrize("thinking,text,reasoning,answer", REASONING)
@pytest.mark.parametrize("size", [1, 3, 8, 10_000])
def test_reasoning_split_on_recorded_outputs(thinking, text, reasoning, answer, size):
    splitter = ReasoningSplitter(thinking)
    got_r, got_a = "", ""
    for i in range(0, len(text), size):
        r, a = splitter.add(text[i:i + size])
        got_r, got_a = got_r + r, got_a + a
    r, a = splitter.finish()
    assert (got_r + r, got_a + a) == (reasoning, answer)


def test_think_block_state_is_read_off_the_prompt():
    assert starts_thinking("<｜Assistant｜><think>\n")                    # DeepSeek-R1
    assert not starts_thinking("<|im_start|>assistant\n")                 # Qwen3 thinking
    assert not starts_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # not thinking


def test_reasoning_then_tool_calls_in_one_reply():
    parser = ReplyParser(ReasoningSplitter(False), ToolCallParser(FORMATS["hermes"]))
    text = ('<think>\nI should call the tool.\n</think>\n\n<tool_call>\n{"name": "f", '
            '"arguments": {"a": 1}}\n</tool_call>')
    pieces = [parser.add(text[i:i + 4], False) for i in range(0, len(text), 4)]
    pieces.append(parser.add("", True))
    assert "".join(p[1] for p in pieces) == "I should call the tool.\n"
    assert "".join(p[0] for p in pieces) == ""
    assert [(c.name, c.arguments) for p in pieces for c in p[2]] == [("f", '{"a": 1}')]
