"""The whole stack: a real engine process and a real gateway process on
loopback, driven by the official OpenAI SDK (sync and async), raw httpx and
curl. The tiny model's greedy output never hits EOS, so every generation runs
to max_tokens; its text is random bytes."""

import asyncio
import json
import subprocess
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import start_engine, start_gateway, wait_until

SERVED = "tiny-chat"
ALIASES = ["alias-a", "alias-b"]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about café culture."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-logs")
    engine = start_engine(tiny_model, logs, "--max-num-seqs", "64", "--max-queue", "256")
    gateway = start_gateway(engine.address, logs, "--served-model-name", SERVED,
                            *[f"--model-alias={a}" for a in ALIASES])
    yield engine, gateway
    gateway.stop()
    engine.stop()


@pytest.fixture(scope="module")
def engine(stack):
    return stack[0]


@pytest.fixture(scope="module")
def gateway(stack):
    return stack[1]


@pytest.fixture(scope="module")
def client(gateway) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        yield c


def aclient(gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                       timeout=120)


def running(engine) -> int:
    return engine.stub.GetStats(pb.GetStatsRequest(), timeout=5).running




def chat(client, **kw):
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("model", SERVED)
    # Unseeded sampling could end early on EOS and make counts flaky.
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


def greedy_text(client, max_tokens=24, **kw) -> str:
    return chat(client, max_tokens=max_tokens, **kw).choices[0].message.content


# -- models ---------------------------------------------------------------------------

def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [SERVED, *ALIASES]
    for name in (SERVED, *ALIASES):
        m = client.models.retrieve(name)
        assert (m.id, m.object, m.owned_by) == (name, "model", "vllm-mlx")
        assert m.modalities == ["text"]  # ours, not OpenAI's: the SDK keeps extra fields
        assert isinstance(m.created, int)
    assert client.models.retrieve("default").id == SERVED
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("model", [SERVED, "default", *ALIASES])
def test_model_names_accepted(client, model):
    r = chat(client, model=model, max_tokens=2)
    assert r.model == SERVED


def test_unknown_model_is_404_envelope(client, http):
    with pytest.raises(openai.NotFoundError):
        chat(client, model="nope", max_tokens=2)
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model 'nope' does not exist",
                                  "type": "invalid_request_error", "param": "model",
                                  "code": "model_not_found"}}


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# -- chat completions -------------------------------------------------------------------

def test_chat_non_streaming_shape(client):
    r = chat(client, max_tokens=12, **GREEDY, user="someone")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert abs(r.created - time.time()) < 60
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length" and c.logprobs is None
    assert c.message.role == "assistant" and c.message.content
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_streaming_matches_non_streaming(client):
    expected = greedy_text(client, 20)
    stream = chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True},
                  **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == chat(client, max_tokens=1).usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(chat(client, max_tokens=5, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_async_client_streaming_and_not(gateway, client):
    expected = greedy_text(client, 16)

    async def main():
        async with aclient(gateway) as ac:
            r = await ac.chat.completions.create(model=SERVED, messages=MESSAGES,
                                                 max_tokens=16, **GREEDY)
            stream = await ac.chat.completions.create(model=SERVED, messages=MESSAGES,
                                                      max_tokens=16, stream=True, **GREEDY)
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
            return r.choices[0].message.content, text

    assert asyncio.run(main()) == (expected, expected)


def test_max_tokens_and_max_completion_tokens(client):
    assert chat(client, max_tokens=7).usage.completion_tokens == 7
    assert chat(client, max_completion_tokens=5).usage.completion_tokens == 5
    # The newer field wins, as in OpenAI's API.
    assert chat(client, max_tokens=9, max_completion_tokens=3).usage.completion_tokens == 3


def test_content_part_arrays_equal_strings(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Tell me about café culture."}]}]
    assert greedy_text(client, messages=parts) == greedy_text(client)


def test_every_role(client):
    messages = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather?", "name": "ann"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Thanks"},
    ]
    r = chat(client, messages=messages, max_tokens=3)
    assert r.usage.prompt_tokens > chat(client, max_tokens=1).usage.prompt_tokens


def test_chat_template_kwargs_reach_the_template(client):
    """The tiny model's template lists `tools` from its variables: passing
    them through chat_template_kwargs must lengthen the prompt."""
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    plain = chat(client, max_tokens=1).usage.prompt_tokens
    with_tools = chat(client, max_tokens=1,
                      extra_body={"chat_template_kwargs": {"tools": tools}}).usage.prompt_tokens
    assert with_tools > plain + 10


def test_seeded_sampling(client):
    def sample(**kw):
        kw.setdefault("temperature", 1.5)
        return chat(client, max_tokens=20, **kw).choices[0].message.content

    greedy = greedy_text(client, 20)
    assert sample(seed=7) == sample(seed=7)
    assert sample(seed=7) != sample(seed=8)
    assert sample(seed=7) != greedy
    # Filters that leave only the most likely token make sampling greedy.
    assert sample(seed=7, top_p=0.001) == greedy
    assert sample(seed=7, extra_body={"top_k": 1}) == greedy
    assert sample(seed=7, extra_body={"min_p": 1.0}) == greedy
    # Left out, temperature is OpenAI's default of 1, not greedy decoding.
    default = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=20,
                                             seed=7)
    assert default.choices[0].message.content == sample(seed=7, temperature=1.0)


@pytest.mark.parametrize("kw", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                {"extra_body": {"repetition_penalty": 1.5}}])
def test_penalties_change_greedy_output(client, kw):
    assert greedy_text(client, 40, **kw) != greedy_text(client, 40)


def test_logit_bias(client):
    r = chat(client, max_tokens=8, **GREEDY, logprobs=True, logit_bias={"300": 100})
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert r.choices[0].message.content == tokens[0] * 8


def test_special_tokens_are_left_out_of_the_text_unless_asked(client, tiny_model):
    """skip_special_tokens (vLLM's, default true): a special token the model
    samples counts as a token but is no text; asked to keep them, it is."""
    from tokenizers import Tokenizer

    start = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).token_to_id("<|im_start|>")
    kw = dict(max_tokens=4, **GREEDY, logit_bias={str(start): 100})
    skipped = chat(client, **kw)
    kept = chat(client, **kw, extra_body={"skip_special_tokens": False})
    assert skipped.usage.completion_tokens == kept.usage.completion_tokens == 4
    assert skipped.choices[0].message.content == ""
    assert kept.choices[0].message.content == "<|im_start|>" * 4


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(client, as_list):
    full = greedy_text(client, 30)
    stop = full[6:9]
    cut = full[: full.index(stop)]
    r = chat(client, max_tokens=30, **GREEDY, stop=[stop, "\x00never"] if as_list else stop)
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    chunks = list(chat(client, max_tokens=30, **GREEDY, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices(client):
    r = chat(client, max_tokens=10, n=3, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3, "seeds seed+i give distinct choices"
    assert r.usage.completion_tokens == 30
    assert r.usage.prompt_tokens == chat(client, max_tokens=1).usage.prompt_tokens
    # Same seed, same choices.
    again = chat(client, max_tokens=10, n=3, temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == texts
    # Streamed, the choices interleave by index and each has its finish chunk.
    chunks = list(chat(client, max_tokens=10, n=3, temperature=1.0, seed=11, stream=True,
                       stream_options={"include_usage": True}))
    by_index = {0: "", 1: "", 2: ""}
    finished = []
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.append(c.index)
    assert [by_index[i] for i in range(3)] == texts
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 30


def test_chat_logprobs(client):
    r = chat(client, max_tokens=6, **GREEDY, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token, "greedy picks the most likely token"
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True)
    stream = chat(client, max_tokens=6, **GREEDY, logprobs=True, top_logprobs=2, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    # logprobs alone: no alternatives.
    r = chat(client, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)


def test_vllm_extensions(client):
    """ignore_eos, stop_token_ids and include_stop_str_in_output pass through."""
    full = greedy_text(client, 30)
    stop = full[6:9]
    r = chat(client, max_tokens=30, **GREEDY, stop=stop,
             extra_body={"include_stop_str_in_output": True, "ignore_eos": True})
    assert r.choices[0].message.content == full[: full.index(stop) + len(stop)]
    # Token 300, forced by the bias, is a stop token: generation ends on it.
    r = chat(client, max_tokens=10, **GREEDY, extra_body={"stop_token_ids": [300]},
             logit_bias={"300": 100})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_request_id_header(http):
    r = http.post("/v1/chat/completions", headers={"X-Request-Id": "my-id-1"},
                  json={"model": SERVED, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-id-1" and r.json()["id"] == "chatcmpl-my-id-1"


def test_a_request_id_that_is_not_printable_ascii_is_replaced(gateway):
    """Raw bytes in the header (invalid UTF-8) were echoed into the response
    id as Latin-1 mojibake; the gateway makes its own id instead."""
    import http.client

    host, port = gateway.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": SERVED, "messages": MESSAGES, "max_tokens": 2})
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("X-Request-Id", b"id-\xff\xfe-x")
    conn.endheaders(body.encode())
    r = conn.getresponse()
    data = json.loads(r.read())
    assert r.status == 200
    rid = r.getheader("x-request-id")
    assert rid.isascii() and rid.isalnum() and len(rid) == 32
    assert data["id"] == f"chatcmpl-{rid}"
    conn.close()


def test_a_data_url_over_4_mib_reaches_the_engine(engine):
    """gRPC's default 4 MiB receive limit refused data: URLs above ~3 MB
    although media may be 50 MB: a 6 MB one must be read and judged (this
    text model refuses images), not cut off by the transport."""
    import grpc

    from vllm_mlx.v1 import media_pb2

    url = "data:image/png;base64," + "A" * (6 << 20)
    req = pb.GenerateRequest(max_tokens=2, chat=pb.ChatInput(messages=[pb.ChatMessage(
        role="user", parts=[pb.ContentPart(media=media_pb2.MediaSource(
            kind=media_pb2.MEDIA_KIND_IMAGE, url=url))])]))
    with pytest.raises(grpc.RpcError) as info:
        list(engine.stub.Generate(req, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "text only" in info.value.details()


# -- completions ---------------------------------------------------------------------------

def complete(client, **kw):
    kw.setdefault("model", SERVED)
    kw.setdefault("temperature", 0)
    return client.completions.create(**kw)


def test_completion_shapes_and_prompt_forms(client):
    r = complete(client, prompt="Once upon a time", max_tokens=8, **GREEDY)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    text = r.choices[0].text
    # A list of strings: one choice per prompt, in order.
    r2 = complete(client, prompt=["Once upon a time", "Hello"], max_tokens=8, **GREEDY)
    assert [c.index for c in r2.choices] == [0, 1] and r2.choices[0].text == text
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens
    # Token ids, single and batched.
    ids = [1, 50, 60, 70, 80]
    r3 = complete(client, prompt=ids, max_tokens=5, **GREEDY)
    assert r3.usage.prompt_tokens == 5
    r4 = complete(client, prompt=[ids, ids[:3]], max_tokens=5, **GREEDY)
    assert r4.choices[0].text == r3.choices[0].text and r4.usage.prompt_tokens == 8


def test_completion_default_max_tokens_is_16(client):
    assert complete(client, prompt="x").usage.completion_tokens == 16


def test_completion_echo(client):
    r = complete(client, prompt="Echo me", max_tokens=5, **GREEDY)
    e = complete(client, prompt="Echo me", max_tokens=5, echo=True, **GREEDY)
    assert e.choices[0].text == "Echo me" + r.choices[0].text
    chunks = list(complete(client, prompt="Echo me", max_tokens=5, echo=True, stream=True,
                           **GREEDY))
    assert chunks[0].choices[0].text == "Echo me"
    assert "".join(c.choices[0].text for c in chunks) == e.choices[0].text


def test_completion_logprobs(client):
    r = complete(client, prompt="Logprobs", max_tokens=6, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert abs(top[token] - value) < 1e-4 and len(top) <= 3
    chunks = list(complete(client, prompt="Logprobs", max_tokens=6, logprobs=2, stream=True,
                           **GREEDY))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_completion_stream_n_and_usage(client):
    chunks = list(complete(client, prompt=["a", "b"], n=2, max_tokens=4, stream=True,
                           stream_options={"include_usage": True}, **GREEDY))
    indexes = {c.choices[0].index for c in chunks if c.choices}
    assert indexes == {0, 1, 2, 3}
    assert chunks[-1].usage.completion_tokens == 16
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finals == ["length"] * 4


def test_completion_sampling_fields(client):
    kw = dict(prompt="sample", max_tokens=12, temperature=1.2, seed=3, top_p=0.9,
              frequency_penalty=0.5, presence_penalty=0.5, stop=["\x00"],
              logit_bias={"10": -5}, user="u")
    a = complete(client, **kw)
    b = complete(client, **kw)
    assert a.choices[0].text == b.choices[0].text
    assert complete(client, **kw, best_of=1).choices[0].text == a.choices[0].text


# -- SSE framing, seen by curl -------------------------------------------------------------

def test_sse_framing_with_curl(gateway):
    # Greedy: sampling could end the stream at EOS before its 6 tokens.
    body = json.dumps({"model": SERVED, "messages": MESSAGES, "max_tokens": 6, "stream": True,
                       "temperature": 0, "stream_options": {"include_usage": True}})
    out = subprocess.run(
        ["curl", "-sS", "-N", "-D", "-", "-H", "Content-Type: application/json",
         "--data-binary", body, f"{gateway.url}/v1/chat/completions"],
        capture_output=True, timeout=60, check=True).stdout.decode()
    head, _, raw = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert payloads[-2]["choices"][0]["delta"] == {}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6
    for p in payloads[1:-2]:
        assert p["choices"][0]["finish_reason"] is None and "content" in p["choices"][0]["delta"]


# -- errors ------------------------------------------------------------------------------

CHAT_OK = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# Sampling can pick EOS (the tiny model's greedy choice never does): a
# request that must run long says so.
LONG = {"max_tokens": 1900, "ignore_eos": True}


@pytest.mark.parametrize("patch, param, needle", [
    ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_completion_tokens": -3}, "max_completion_tokens", "greater than or equal to 1"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 1000}, "n", "less than or equal to 128"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "wizard"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://x/a.png"}}]}]},
     "messages[0].content[0]", "this model does not accept images"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url",
                                                 "video_url": {"url": "http://x/a.mp4"}}]}]},
     "messages[0].content[0]", "does not accept videos"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "required"),
    ({"max_tokens": 5000}, "messages", "context length of 2048"),
    ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "ignore_eos": True}, "ignore_eos", "constrained output"),
    ({"tool_choice": "required"}, None, "tool_choice requires tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None, "'g'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, None, "distinct"),
    ({"tools": [{"type": "function", "function": {"name": "f f"}}]},
     "tools[0].function.name", "pattern"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "integer", "minimum": "low"}}}}, "response_format", "cannot be enforced"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls", "not valid JSON"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"top_logprobs": 3}, "top_logprobs", "requires logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"stop": ""}, "stop", "must not be empty"),
    ({"stop": [1, 2]}, "stop[0]", "valid string"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc", "should match pattern"),
    ({"logit_bias": {"5": 500}}, "logit_bias.5", "less than or equal to 100"),
    ({"logit_bias": {"99999": 5}}, "logit_bias", "outside the vocabulary"),
    ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({"seed": "x"}, "seed", "valid integer"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "valid dictionary"),
    ({"model": None}, "model", "valid string"),
    ({"messages": [{"role": "user", "content": "x"}] * 5000}, "messages", "more than the 4096"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 1100}]},
     "messages[0].content", "more than the 1024"),
    ({"stop": ["x"] * 65}, "stop", "more than the 64"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, None, "not valid Unicode"),
])
def test_bad_chat_requests_are_400_naming_the_field(http, patch, param, needle):
    # json.dumps escapes a lone surrogate; httpx's own encoder would refuse it.
    r = http.post("/v1/chat/completions", content=json.dumps({**CHAT_OK, **patch}),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert needle in error["message"], error


@pytest.mark.parametrize("patch, param, needle", [
    ({"prompt": []}, "prompt", "must not be empty"),
    ({"prompt": [[]]}, "prompt", "must not be empty"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [1, -5]}, "prompt[1]", "greater than or equal to 0"),
    ({"prompt": [1, 999999]}, "prompt", "999999"),
    ({"prompt": [5] * 2100}, "prompt", "context length"),
    ({"logprobs": 50}, "logprobs", "less than or equal to 20"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "x" * (4 * 1024 * 1024 + 1)}, "prompt", "more than the 4194304"),
    ({"n": 100, "prompt": ["a", "b"]}, "n", "choices"),
])
def test_bad_completion_requests(http, patch, param, needle):
    r = http.post("/v1/completions", json={"model": SERVED, "prompt": "x", "max_tokens": 2,
                                           **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


@pytest.mark.parametrize("content, headers", [
    (b"{not json", {"Content-Type": "application/json"}),
    (b"[1, 2]", {"Content-Type": "application/json"}),
    (b"", {"Content-Type": "application/json"}),
    (b"model=x", {"Content-Type": "application/x-www-form-urlencoded"}),
    (b"\xff\xfe garbage", {"Content-Type": "application/json"}),
    (b'{"model": "tiny-chat", "messages": [' * 3000, {"Content-Type": "application/json"}),
])
def test_malformed_bodies(http, content, headers):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = http.post(path, content=content, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.delete("/v1/models")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openai_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, temperature=5)
    assert info.value.body["param"] == "temperature"


def test_duplicate_request_id_is_409(http, gateway):
    async def main():
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as c:
            body = {**CHAT_OK, **LONG, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=body,
                                headers={"X-Request-Id": "dup-1"}) as first:
                assert first.status_code == 200
                # Keep the line iterator referenced: a dropped one is closed,
                # and closing it hangs up the connection (an abort).
                lines = first.aiter_lines()
                await lines.__anext__()
                second = await c.post("/v1/chat/completions", json=CHAT_OK,
                                      headers={"X-Request-Id": "dup-1"})
                return second

    second = asyncio.run(main())
    assert second.status_code == 409, second.text
    assert second.json()["error"]["code"] == "request_id_in_use"


# -- client disconnects abort the engine request -----------------------------------------

def generated(engine) -> int:
    return engine.stub.GetStats(pb.GetStatsRequest(), timeout=5).generation_tokens_total


def test_stream_disconnect_aborts(gateway, engine):
    assert wait_until(lambda: running(engine) == 0)
    before = generated(engine)
    body = {**CHAT_OK, **LONG, "stream": True}
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            # GetStats may lag a beat behind the decode loop.
            assert wait_until(lambda: running(engine) == 1, timeout=2)
    assert wait_until(lambda: running(engine) == 0, timeout=1.0), "the engine still decodes"
    assert 0 < generated(engine) - before < 1900


def test_non_streaming_disconnect_aborts(gateway, engine):
    assert wait_until(lambda: running(engine) == 0)
    before = generated(engine)
    body = {**CHAT_OK, **LONG}
    with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(60, read=0.4)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)
    # The request ran (the client may be gone before a stats snapshot shows it
    # running) and the client hung up after 0.4 s; 1900 tokens take seconds.
    assert wait_until(lambda: generated(engine) > before, timeout=2)
    assert wait_until(lambda: running(engine) == 0, timeout=1.0)
    assert 0 < generated(engine) - before < 1900


def test_n_stream_disconnect_aborts_every_choice(gateway, engine):
    assert wait_until(lambda: running(engine) == 0)
    body = {**CHAT_OK, **LONG, "stream": True, "n": 4}
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            # GetStats may lag a beat behind the decode loop.
            assert wait_until(lambda: running(engine) == 4, timeout=2)
    assert wait_until(lambda: running(engine) == 0, timeout=1.0)


# -- concurrency ---------------------------------------------------------------------------

def test_64_concurrent_streams(gateway, engine):
    async def one(ac, i):
        max_tokens = 8 + i % 9
        stream = await ac.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": f"Question {i}"}],
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            **GREEDY)
        text, finish, usage = "", None, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
            if c.usage:
                usage = c.usage
        return max_tokens, text, finish, usage

    async def main():
        async with aclient(gateway) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for max_tokens, text, finish, usage in results:
        assert finish == "length" and text
        assert usage.completion_tokens == max_tokens
        assert usage.total_tokens == usage.prompt_tokens + max_tokens
    assert wait_until(lambda: running(engine) == 0)


# -- metrics and schema -----------------------------------------------------------------

def test_metrics(http, client):
    chat(client, max_tokens=3)
    complete(client, prompt="x", max_tokens=2)
    http.post("/v1/chat/completions", json={**CHAT_OK, "n": 0})
    http.post("/v1/chat/completions", json={**CHAT_OK, "model": "nope"})
    text = http.get("/metrics").text
    assert 'vllm_mlx_gateway_requests_total{method="POST",route="/v1/chat/completions",' \
           'status="200"}' in text
    assert 'status="400"' in text and 'status="404"' in text

    def value(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(prefix))

    assert value('vllm_mlx_gateway_time_to_first_token_seconds_count{endpoint="chat"}') > 0
    assert value('vllm_mlx_gateway_inter_token_latency_seconds_count{endpoint="chat"}') > 0
    assert value('vllm_mlx_gateway_e2e_request_latency_seconds_count{endpoint="completions"}') > 0
    assert value('vllm_mlx_gateway_generation_tokens_total{endpoint="chat"}') >= 3
    assert value('vllm_mlx_gateway_prompt_tokens_total{endpoint="chat"}') > 0
    assert value("vllm_mlx_engine_up") == 1
    assert "vllm_mlx_engine_running " in text and "vllm_mlx_engine_waiting " in text


def test_event_loop_lags_are_watched_while_requests_are_in_flight(http, client):
    """The gateway's and the engine front end's event loops are checked every
    few ms while they answer requests, and left asleep while idle."""
    def counts() -> tuple[float, float]:
        lines = dict(line.rsplit(" ", 1) for line in http.get("/metrics").text.splitlines()
                     if line.endswith(tuple("0123456789.")) and not line.startswith("#"))
        return (float(lines["vllm_mlx_gateway_event_loop_lag_seconds_count"]),
                float(lines["vllm_mlx_engine_front_end_event_loop_lag_seconds_count"]))

    gateway, front_end = counts()
    r = http.post("/v1/chat/completions", json={**CHAT_OK, "max_tokens": 24, "stream": True})
    assert r.status_code == 200
    time.sleep(0.1)  # the front end's stream ends just after the gateway's response
    busy = counts()
    # 24 tokens take tens of ms even here; each process looks every 5 ms.
    assert busy[0] > gateway and busy[1] > front_end
    time.sleep(0.5)  # idle: about 100 checks each, were they not left asleep
    idle = counts()
    # Each /metrics request is in flight in the gateway and may see a check;
    # a check under way when the last request ended still counts.
    assert idle[0] - busy[0] <= 3 and idle[1] - busy[1] <= 1


def test_every_engine_stat_is_a_metric(http, client):
    """The proto's Stats defines the engine's figures once: /metrics exports
    each field, with the value GetStats reports."""
    from gateway.metrics import ENGINE_METRICS, HISTOGRAM_PARTS

    parts = {field.removesuffix("_counts") + part for field, (_, kind, _) in ENGINE_METRICS.items()
             if kind == "histogram" for part in HISTOGRAM_PARTS}
    assert set(ENGINE_METRICS) | parts == {f.name for f in pb.Stats.DESCRIPTOR.fields}
    chat(client, max_tokens=16)  # long enough for the front end's lag watch to look
    text = http.get("/metrics").text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith("vllm_mlx_engine_")}
    for field, (name, kind, _) in ENGINE_METRICS.items():
        metric = f"vllm_mlx_engine_{name}" + ("_total" if kind == "counter" else "")
        if field == "loop_seconds":
            assert lines[metric + '{phase="step"}'] > 0
        elif kind == "histogram":
            metric = f"vllm_mlx_engine_{name}"
            assert lines[metric + '_bucket{le="+Inf"}'] == lines[metric + "_count"] > 0
            assert lines[metric + "_sum"] > 0
        else:
            assert metric in lines, metric
    assert lines["vllm_mlx_engine_steps_total"] >= 3
    # Each step's iteration is counted in the step-time histogram once.
    assert lines["vllm_mlx_engine_step_seconds_count"] == lines["vllm_mlx_engine_steps_total"]
    assert lines["vllm_mlx_engine_generation_tokens_total"] >= 3


def test_the_engine_accounts_for_its_memory(engine, client):
    """Weights, the batch's KV, the prefix cache and MLX's buffer cache, with
    the core's resident set, in GetStats and /metrics; the accounted parts
    stay under the limit."""
    chat(client, max_tokens=3)
    assert wait_until(lambda: engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)
                      .rss_bytes > 0, 5)
    s = engine.stub.GetStats(pb.GetStatsRequest(), timeout=5)
    info = engine.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert s.weights_bytes == info.weights_bytes > 0
    assert s.memory_limit_bytes == info.memory_limit_bytes
    assert (s.weights_bytes + s.kv_bytes + s.cache_bytes + s.allocator_cache_bytes
            <= s.memory_limit_bytes)
    assert s.cache_bytes > 0  # the finished chat's KV sits in the prefix cache
    assert s.rss_bytes > s.weights_bytes
    text = httpx.get(f"{client.base_url}".removesuffix("/v1/") + "/metrics").text
    for name in ("weights_bytes", "kv_bytes", "allocator_cache_bytes", "core_rss_bytes",
                 "active_memory_bytes", "memory_limit_bytes"):
        assert f"vllm_mlx_engine_{name} " in text, name


def test_openapi_schema(http):
    spec = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}",
            "/health", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
    assert "ErrorResponse" in schemas


# -- API key, and several workers on one port ----------------------------------------------

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def keyed(engine, tmp_path_factory):
    """A second gateway on the same engine: key from the environment, two
    uvicorn workers sharing its port."""
    g = start_gateway(engine.address, tmp_path_factory.mktemp("keyed-logs"), "--workers", "2",
                      "--served-model-name", SERVED,
                      env={"VLLM_MLX_API_KEY": KEY})
    yield g
    g.stop()


def worker_pids(gateway) -> list[int]:
    children = []
    for stat in __import__("pathlib").Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == gateway.proc.pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"x-api-key": KEY[:-1]}, {"Authorization": KEY}])
@pytest.mark.parametrize("method, path", [("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models"), ("GET", "/metrics"),
                                          ("GET", "/openapi.json"), ("GET", "/v1/nothing")])
def test_api_key_required(keyed, headers, method, path):
    r = httpx.request(method, f"{keyed.url}{path}", headers=headers, json=CHAT_OK)
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


def test_api_key_accepted(keyed):
    sdk = OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert chat(sdk, max_tokens=3).usage.completion_tokens == 3
    r = httpx.post(f"{keyed.url}/v1/completions", headers={"x-api-key": KEY},
                   json={"model": SERVED, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    # The health probe stays open.
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_workers_share_the_port_and_metrics(keyed):
    assert len(worker_pids(keyed)) >= 2
    headers = {"Authorization": f"Bearer {KEY}"}

    async def main():
        async with httpx.AsyncClient(base_url=keyed.url, headers=headers, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT_OK)
                                        for _ in range(12)))
            assert all(r.status_code == 200 for r in rs)
            return [(await c.get("/metrics")).text for _ in range(6)]

    route = 'vllm_mlx_gateway_requests_total{method="POST",route="/v1/chat/completions",' \
            'status="200"}'
    for text in asyncio.run(main()):
        # Multi-process mode: every worker answers with the sum of all.
        counts = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(route)]
        assert counts and counts[0] >= 12


def test_cli_flag_for_the_key():
    from gateway.__main__ import parse_args

    s = parse_args(["--api-key", "k", "--model-alias", "a", "--model-alias", "b",
                    "--served-model-name", "m", "--workers", "3"])
    assert (s.api_key, s.model_aliases, s.served_model_name, s.workers) == (
        "k", ["a", "b"], "m", 3)


def test_gateway_logs_are_clean(gateway, keyed):
    for g in (gateway, keyed):
        log = g.log()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_a_slow_reader_gets_tokens_coalesced_not_lost(engine):
    """Real engine streams read through the gateway's merge: messages that
    arrive while the consumer is busy come as one per choice, with every
    token, in order, equal to each stream read one message at a time."""
    from gateway.engine_client import EngineClient
    from gateway.serving import merged

    def request(seed: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(text="Tell me about café culture.", max_tokens=40,
                                  sampling=pb.SamplingParams(temperature=0.8, seed=seed))

    async def read(seeds: list[int], pause: float) -> tuple[list[list[int]], list[str], int]:
        client = EngineClient(engine.address, 60, 5)
        await client.start()
        try:
            gens = [client.generate(request(s)) for s in seeds]
            ids, texts, messages = [[] for _ in seeds], ["" for _ in seeds], 0
            async for i, msg in merged(gens):
                ids[i] += msg.token_ids
                texts[i] += msg.text
                messages += 1
                await asyncio.sleep(pause)
            return ids, texts, messages
        finally:
            await client.close()

    fast_ids, fast_texts, _ = asyncio.run(read([1, 2], 0))
    slow_ids, slow_texts, messages = asyncio.run(read([1, 2], 0.05))
    assert [len(x) for x in slow_ids] == [40, 40]
    assert slow_ids == fast_ids and slow_texts == fast_texts
    assert fast_ids[0] != fast_ids[1]  # two different streams, not one twice
    assert messages < 40, f"{messages} messages for 2 x 40 tokens: nothing coalesced"


@pytest.mark.parametrize("kwargs, name", [
    ({"return_tensors": "np"}, "return_tensors"),
    ({"padding": "max_length", "max_length": 10_000_000}, "max_length"),
    ({"tokenize": False}, "tokenize"),
    ({"chat_template": "{{ 'x' }}"}, "chat_template"),
])
def test_chat_template_kwargs_cannot_set_tokenizer_arguments(http, kwargs, name):
    """Template variables only: tokenizer arguments gave a 500 (return_tensors)
    or took the engine front end to 1.2 GB (padding to max_length)."""
    r = http.post("/v1/chat/completions", json={**CHAT_OK, "chat_template_kwargs": kwargs})
    assert r.status_code == 400, r.text
    assert repr(name) in r.json()["error"]["message"]


def test_sse_events_survive_unicode_line_breaks(gateway):
    """U+0085, U+2028 and U+2029 are legal unescaped in JSON, but httpx's
    iter_lines (str.splitlines) ends a line at each: an event holding one,
    in the echo here or in generated text, must still be one line."""
    from gateway.responses import ChatChunkChoice, ChatCompletionChunk, ChatDelta
    from gateway.sse import TEXT_HOLE, TextChunk

    prompt = "a\u2028b\x85c\u2029d"
    with httpx.Client(base_url=gateway.url, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"model": SERVED, "prompt": prompt, "echo": True,
                                             "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert json.loads(lines[0][6:])["choices"][0]["text"] == prompt
    event = TextChunk(ChatCompletionChunk(id="x", created=0, model="m", choices=[
        ChatChunkChoice(index=0, delta=ChatDelta(content=TEXT_HOLE))]))(prompt)
    assert len([line for line in event.decode().splitlines() if line]) == 1
    assert json.loads(event.decode()[6:])["choices"][0]["delta"]["content"] == prompt
