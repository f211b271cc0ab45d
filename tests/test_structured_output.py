"""Structured output, tool calling and reasoning through a real gateway and
engine with the tiny random-weight model: its unconstrained output is
garbage, so output that validates shows the grammar at work."""

import asyncio
import json
import re

import grpc
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI
from pydantic import BaseModel

from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import make_test_models, start_engine, start_gateway

MESSAGES = [{"role": "user", "content": "Describe a person."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "height", "role", "tags", "address", "active"],
    "additionalProperties": False,
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                  "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def reasoning_model(tmp_path_factory):
    """The tiny model, whose chat template renders Hermes-style tool calls
    and whose tokenizer has <think> and </think> as tokens."""
    return make_test_models.build_text_model(tmp_path_factory.mktemp("models") / "tiny-think",
                                             think_tokens=True)


def _stack(model, logs, *flags):
    engine = start_engine(model, logs, "--max-num-seqs", "64", *flags)
    gateway = start_gateway(engine.address, logs)
    return engine, gateway


@pytest.fixture(scope="module")
def stack(reasoning_model, tmp_path_factory):
    engine, gateway = _stack(reasoning_model, tmp_path_factory.mktemp("structured-logs"))
    yield engine, gateway
    gateway.stop()
    engine.stop()


@pytest.fixture(scope="module")
def thinking_client(reasoning_model, tmp_path_factory):
    """A stack started with --reasoning-parser qwen3."""
    engine, gateway = _stack(reasoning_model, tmp_path_factory.mktemp("reasoning-logs"),
                             "--reasoning-parser", "qwen3")
    yield OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)
    gateway.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack[1].url}/v1", api_key="x", max_retries=0, timeout=120)


def aclient(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack[1].url}/v1", api_key="x", max_retries=0, timeout=120)


def test_fifty_sampled_outputs_follow_a_nested_schema(stack):
    async def one(c: AsyncOpenAI, seed: int):
        return await c.chat.completions.create(
            model="default", messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=400,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON}})

    async def run():
        async with aclient(stack) as c:  # all 50 at once: they share the batch
            return await asyncio.gather(*[one(c, s) for s in range(50)])

    replies = asyncio.run(run())
    texts = [r.choices[0].message.content for r in replies]
    assert [r.choices[0].finish_reason for r in replies] == ["stop"] * 50, texts
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 40  # sampled, not one answer repeated


def test_json_object_output_parses(client):
    """Any object: the random model may nest on, so what max_tokens cuts
    short says so (finish_reason "length"); every other output parses."""
    finished = 0
    for seed in range(8):
        r = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0.7,
                                           seed=seed, max_tokens=500,
                                           response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "length":
            continue
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        finished += 1
    assert finished >= 4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_regex_choice_and_grammar_hold(client, seed):
    def text(so: dict) -> str:
        r = client.chat.completions.create(model="default", messages=MESSAGES, temperature=1.0,
                                           seed=seed, max_tokens=60,
                                           extra_body={"structured_outputs": so})
        return r.choices[0].message.content

    assert re.fullmatch(r"[A-Z]{2}-\d{3}", text({"regex": r"[A-Z]{2}-\d{3}"}))
    assert text({"choice": ["red", "green", "blue"]}) in {"red", "green", "blue"}
    lark = 'start: "(" NUM ("+" NUM){1,3} ")"\nNUM: /[1-9][0-9]?/'
    assert re.fullmatch(r"\(\d+(\+\d+){1,3}\)", text({"grammar": lark}))


def test_sdk_parse_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str
        population: int
        coastal: bool

    r = client.chat.completions.parse(model="default", messages=MESSAGES, response_format=City,
                                      temperature=0.5, seed=7, max_tokens=200)
    city = r.choices[0].message.parsed
    assert isinstance(city, City)
    assert City.model_validate_json(r.choices[0].message.content) == city


def test_invalid_schema_is_a_400_naming_it(client):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})
    assert e.value.body["param"] == "response_format"
    assert "frobnicate" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=5,
                                       extra_body={"structured_outputs": {"regex": "([a-"}})
    assert e.value.body["param"] == "structured_outputs"


def test_named_and_required_tool_choice_give_valid_calls(client):
    named = client.chat.completions.create(
        model="default", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=5,
        max_tokens=200, tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])
    for seed in range(4):
        r = client.chat.completions.create(model="default", messages=MESSAGES, tools=TOOLS,
                                           tool_choice="required", temperature=1.0, seed=seed,
                                           max_tokens=300, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert "<tool_call>" not in (r.choices[0].message.content or "")


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(client):
    kwargs = dict(model="default", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                  temperature=1.0, seed=11, max_tokens=300)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert c["id"] is None, "id comes once, in the call's first delta"
                c["id"], c["name"] = d.id, d.function.name
            c["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and "<tool_call>" not in content
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole]
    assert all(c["id"] for c in calls.values())


def test_two_round_tool_loop_with_the_sdk(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="default", messages=messages, tools=TOOLS, max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "sky": "clear"})})
    second = client.chat.completions.create(model="default", messages=messages, tools=TOOLS,
                                            max_tokens=20, temperature=0)
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason in ("stop", "length")
    # The second prompt carries the call and its result through the template.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_mixed_batch_constrained_unconstrained_and_invalid(stack, client):
    plain = dict(model="default", messages=MESSAGES, temperature=0, max_tokens=40)
    alone = client.chat.completions.create(**plain).choices[0].message.content

    async def run():
        async with aclient(stack) as c:
            constrained = [c.chat.completions.create(
                model="default", messages=MESSAGES, temperature=1.0, seed=s, max_tokens=400,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "p", "schema": PERSON}})
                for s in range(6)]
            unconstrained = [c.chat.completions.create(**plain) for _ in range(6)]
            invalid = [c.chat.completions.create(
                model="default", messages=MESSAGES, max_tokens=5,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "bad", "schema": {"minimum": "x"}}})]
            return await asyncio.gather(*constrained, *unconstrained, *invalid,
                                        return_exceptions=True)

    results = asyncio.run(run())
    for r in results[:6]:
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert [r.choices[0].message.content for r in results[6:12]] == [alone] * 6
    assert isinstance(results[12], BadRequestError)


def test_grpc_clients_get_the_same_guarantee(stack):
    engine = stack[0]
    req = pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="hi")]),
        max_tokens=400, sampling=pb.SamplingParams(temperature=1.0, seed=4),
        structured_output=pb.StructuredOutput(json_schema=json.dumps(PERSON)))
    text = "".join(m.text for m in engine.stub.Generate(req, timeout=60))
    jsonschema.validate(json.loads(text), PERSON)
    bad = pb.GenerateRequest(text="x", structured_output=pb.StructuredOutput(regex="(["))
    with pytest.raises(grpc.RpcError) as e:
        list(engine.stub.Generate(bad, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reasoning_is_split_and_the_schema_applies_after_it(thinking_client, reasoning_model):
    """The assistant's reply is continued inside an open think block; a bias
    on </think> makes the random model close it soon. The thinking comes
    back as reasoning_content, the answer after it follows the schema."""
    from transformers import AutoTokenizer
    close = AutoTokenizer.from_pretrained(reasoning_model).convert_tokens_to_ids("</think>")
    kwargs = dict(
        model="default", temperature=1.0, seed=2, max_tokens=400,
        messages=[*MESSAGES, {"role": "assistant", "content": "<think>\nLet me see."}],
        extra_body={"continue_final_message": True},
        logit_bias={str(close): 4},
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    client = thinking_client
    whole = client.chat.completions.create(**kwargs).choices[0]
    reasoning = whole.message.model_extra["reasoning_content"]
    assert "</think>" not in reasoning and "</think>" not in whole.message.content
    jsonschema.validate(json.loads(whole.message.content), PERSON)
    streamed_reasoning, streamed_content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        streamed_content += delta.content or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, whole.message.content)
