"""OpenAI behaviours written from the API reference, through a real gateway
and engine: a completion continues its prompt (leading space and all), with
a byte-level BPE and a SentencePiece-style tokenizer; presence and frequency
penalties count generated tokens only; null means "not given" for every
optional field; the prompt's log-probabilities (echo + logprobs, vLLM's
prompt_logprobs) match a separate scoring pass; and the requests
lm-evaluation-harness sends for loglikelihood tasks are answered as it
parses them."""

import asyncio

import httpx
import mlx.core as mx
import pytest
from mlx_lm import load
from openai import AsyncOpenAI, OpenAI

from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import make_test_models, needs_smollm2, start_engine, start_gateway

PROMPTS = ["The capital of France is", "Once upon a time there was", "def add(a, b):",
           "We met at a café in", "Numbers like 3.14159"]


class Stack:
    def __init__(self, model, logs):
        self.model_path = model
        self.engine = start_engine(model, logs)
        self.gateway = start_gateway(self.engine.address, logs)
        self.client = OpenAI(base_url=f"{self.gateway.url}/v1", api_key="x", max_retries=0,
                             timeout=120)
        self.model, self.tokenizer = load(str(model))
        # Random weights pick byte-fallback tokens that form invalid UTF-8,
        # whose U+FFFD count differs between decoders; text tests ban them.
        vocab = self.tokenizer.get_vocab()
        self.no_bytes = {vocab[f"<0x{b:02X}>"]: -100.0 for b in range(256)
                         if f"<0x{b:02X}>" in vocab}

    def stop(self) -> None:
        self.gateway.stop()
        self.engine.stop()

    def generated_ids(self, prompt, max_tokens: int, **sampling) -> list[int]:
        """The token ids a greedy completion produces, from the engine's gRPC API."""
        req = pb.GenerateRequest(max_tokens=max_tokens,
                                 sampling=pb.SamplingParams(temperature=0, **sampling))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return [t for m in self.engine.stub.Generate(req, timeout=60) for t in m.token_ids]

    def scores(self, ids: list[int]) -> list[float]:
        """A separate scoring pass: log-probability of each token after the first."""
        logits = self.model(mx.array([ids]))[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


@pytest.fixture(scope="module", params=["bpe", "spm"])
def stack(request, tiny_model, tmp_path_factory):
    if request.param == "bpe":
        model = tiny_model
    else:
        model = make_test_models.build_text_model(
            tmp_path_factory.mktemp("models") / "tiny-spm", tokenizer="spm")
    s = Stack(model, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


def _space_token(tokenizer) -> int:
    """A token whose text starts with a space: what the first completion
    token usually is after a prompt that ends in a word."""
    return next(t for t in tokenizer.encode("The capital of France is Paris")[1:]
                if tokenizer.decode([t]).startswith(" ")
                or tokenizer.convert_ids_to_tokens(t).startswith(("Ġ", "▁")))


def _texts(stack, prompt: str, stream: bool, **kw) -> tuple[str, str]:
    """(completion text, echoed text) from the OpenAI SDK."""
    out = []
    for echo in (False, True):
        args = dict(model="default", prompt=prompt, max_tokens=6, temperature=0, echo=echo,
                    **kw)
        if stream:
            out.append("".join(c.choices[0].text for c in
                               stack.client.completions.create(stream=True, **args)
                               if c.choices))
        else:
            out.append(stack.client.completions.create(**args).choices[0].text)
    return out[0], out[1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_continues_its_prompt(stack, stream):
    tok = stack.tokenizer
    space = _space_token(tok)
    cases = [(p, stack.no_bytes) for p in PROMPTS] + [(PROMPTS[0], {space: 100})]
    leading_spaces = 0
    for prompt, bias in cases:
        ids = stack.generated_ids(prompt, 6, logit_bias=bias)
        whole = tok.decode(tok.encode(prompt) + ids)
        assert whole.startswith(prompt)
        text, echoed = _texts(stack, prompt, stream,
                              logit_bias={str(k): v for k, v in bias.items()})
        assert prompt + text == whole, (prompt, text)
        assert echoed == whole
        leading_spaces += text.startswith(" ")
    assert leading_spaces >= 1  # the case at stake was exercised


def test_a_chat_reply_starts_its_own_text(stack):
    """A reply is a text of its own: a leading space of its first token is
    dropped, as before."""
    space = _space_token(stack.tokenizer)
    r = stack.client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        temperature=0, logit_bias={str(space): 100})
    assert r.choices[0].message.content == stack.tokenizer.decode([space] * 3).removeprefix(" ")
    assert not r.choices[0].message.content.startswith(" ")


# -- penalties -------------------------------------------------------------------------

def test_penalties_see_generated_tokens_only():
    from engine_worker.sampling import SamplingParams, make_processors

    logits = mx.zeros((1, 8))
    (process,) = make_processors(SamplingParams(presence_penalty=0.5, frequency_penalty=1.0), 3)
    prompt_only = process(mx.array([1, 2, 3]), mx.array(logits))
    assert prompt_only.tolist() == logits.tolist()
    after = process(mx.array([1, 2, 3, 4, 4, 1]), mx.array(logits))[0].tolist()
    assert after == [0, -1.5, 0, 0, -2.5, 0, 0, 0]


def test_penalties_reduce_repeats_and_leave_a_repeat_free_output_alone(stack):
    def ids(prompt, **kw):
        return stack.generated_ids(prompt, 64, **kw)

    plain = ids(PROMPTS[1])
    assert len(plain) - len(set(plain)) > 3  # the tiny model repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = ids(PROMPTS[1], **kw)
        assert len(penalized) - len(set(penalized)) < len(plain) - len(set(plain))
    # Up to its first repeat, greedy output cannot change under a penalty:
    # every token it picks has not been generated before.
    for prompt in PROMPTS:
        out = stack.generated_ids(prompt, 24)
        n = next((i for i, t in enumerate(out) if t in out[:i]), len(out))
        if n >= 2:
            assert stack.generated_ids(prompt, n, frequency_penalty=2.0,
                                       presence_penalty=2.0) == out[:n]


@needs_smollm2
def test_penalties_do_not_count_the_prompt_smollm2(smollm2_folder, tmp_path_factory):
    """The acceptance run's case: a repeat-free answer whose words and
    end-of-turn token are all in the templated prompt."""
    logs = tmp_path_factory.mktemp("logs")
    engine = start_engine(smollm2_folder, logs)
    gateway = start_gateway(engine.address, logs)
    try:
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)

        def ask(**kw):
            return client.chat.completions.create(
                model="default", temperature=0, max_tokens=40,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                **kw).choices[0]

        plain = ask()
        assert "Paris" in plain.message.content and plain.finish_reason == "stop"
        for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
            penalized = ask(**kw)
            assert (penalized.message.content, penalized.finish_reason) == (
                plain.message.content, "stop")
        # And a completion's leading space, on a real model.
        c = client.completions.create(model="default", prompt="The capital of France is",
                                      max_tokens=2, temperature=0)
        assert c.choices[0].text.startswith(" Paris")
    finally:
        gateway.stop()
        engine.stop()


# -- null, store, metadata -------------------------------------------------------------

BASE = {
    "ChatCompletionRequest": ("/v1/chat/completions",
                              {"model": "default", "max_tokens": 2,
                               "messages": [{"role": "user", "content": "hi"}]}),
    "CompletionRequest": ("/v1/completions", {"model": "default", "prompt": "hi",
                                              "max_tokens": 2}),
}


@pytest.mark.parametrize("schema", sorted(BASE))
def test_every_optional_field_takes_null(stack, schema):
    spec = httpx.get(f"{stack.gateway.url}/openapi.json").json()["components"]["schemas"]
    props, required = spec[schema]["properties"], set(spec[schema].get("required", ()))
    path, base = BASE[schema]
    optional = sorted(set(props) - required)
    assert {"n", "stream", "logprobs", "max_tokens", "temperature"} <= set(optional)
    for name in optional:
        assert {"type": "null"} in props[name].get("anyOf", ()), (schema, name)
        body = {**base, name: None}
        if name == "max_tokens" and schema == "ChatCompletionRequest":
            body["max_completion_tokens"] = 2
        r = httpx.post(stack.gateway.url + path, json=body, timeout=60)
        assert r.status_code == 200, (name, r.text)
    r = httpx.post(stack.gateway.url + path,
                   json={**base, "stream_options": {"include_usage": None}}, timeout=60)
    assert r.status_code == 400 and "only allowed when stream" in r.text  # null is not true


def test_store_and_metadata_are_accepted(stack):
    r = stack.client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        store=True, metadata={"team": "eval", "run": "7"})
    assert r.choices[0].finish_reason == "length"
    c = stack.client.completions.create(model="default", prompt="hi", max_tokens=2,
                                        extra_body={"store": False, "metadata": {"a": "b"}})
    assert c.usage.completion_tokens == 2


# -- prompt log-probabilities ------------------------------------------------------------

def _check_echo_logprobs(stack, prompt_ids, choice, max_tokens):
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    generated = stack.generated_ids(prompt_ids, max_tokens)
    reference = stack.scores(prompt_ids + generated)
    assert lp.token_logprobs[1:] == pytest.approx(reference, abs=1e-3)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= value - 1e-6


def test_echo_with_logprobs_scores_every_prompt_token(stack):
    tok = stack.tokenizer
    for prompt in PROMPTS[:3]:
        c = stack.client.completions.create(model="default", prompt=prompt, max_tokens=3,
                                            temperature=0, echo=True, logprobs=2)
        _check_echo_logprobs(stack, tok.encode(prompt), c.choices[0], 3)
        assert c.choices[0].text.startswith(prompt)
    # Streamed: the first chunk carries the echo and the prompt's logprobs.
    chunks = [c for c in stack.client.completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True,
        logprobs=1, stream=True) if c.choices]
    first = chunks[0].choices[0]
    assert first.text == PROMPTS[0]
    assert len(first.logprobs.tokens) == len(tok.encode(PROMPTS[0]))
    assert first.logprobs.token_logprobs[0] is None


def test_prompt_logprobs_inside_a_mixed_batch(stack):
    """Prompts of different lengths scored together in one prefill pass
    (right-padded), beside requests that did not ask, which keep their
    output."""
    tok = stack.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode(" ".join(PROMPTS))]
    bias = [{} if i % 2 == 0 else stack.no_bytes for i in range(len(prompts))]
    solo = [stack.generated_ids(p, 4, logit_bias=b) for p, b in zip(prompts, bias)]

    async def burst():
        client = AsyncOpenAI(base_url=f"{stack.gateway.url}/v1", api_key="x", max_retries=0,
                             timeout=120)
        calls = []
        for i, p in enumerate(prompts):
            kw = ({"echo": True, "logprobs": 1} if i % 2 == 0 else
                  {"logit_bias": {str(k): v for k, v in bias[i].items()}})
            calls.append(client.completions.create(model="default", prompt=p, max_tokens=4,
                                                   temperature=0, **kw))
        return await asyncio.gather(*calls)

    for i, r in enumerate(asyncio.run(burst())):
        if i % 2 == 0:
            _check_echo_logprobs(stack, prompts[i], r.choices[0], 4)
            assert r.choices[0].text.startswith(tok.decode(prompts[i]))
        else:
            assert r.choices[0].logprobs is None
            assert r.choices[0].text == stack.tokenizer.decode(prompts[i] + solo[i])[
                len(tok.decode(prompts[i])):]


def test_vllm_prompt_logprobs(stack):
    tok = stack.tokenizer
    ids = tok.encode(PROMPTS[0])
    r = httpx.post(f"{stack.gateway.url}/v1/completions", timeout=60, json={
        "model": "default", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0,
        "prompt_logprobs": 3}).json()
    entries = r["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    reference = stack.scores(ids)
    for token, value, entry in zip(ids[1:], reference, entries[1:]):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(value, abs=1e-3)
        assert mine["decoded_token"] == tok.decode([token])
        ranked = sorted((e for e in entry.values()), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked][:3] == [1, 2, 3] or mine["rank"] <= 3
        assert max(e["logprob"] for e in entry.values()) == ranked[0]["logprob"]
        assert mine["rank"] == 1 + sum(v["logprob"] > mine["logprob"]
                                       for v in entry.values()) or mine["rank"] > 3
    chat = httpx.post(f"{stack.gateway.url}/v1/chat/completions", timeout=60, json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == \
        chat["usage"]["prompt_tokens"]
    assert "prompt_logprobs" not in stack.client.completions.create(
        model="default", prompt="hi", max_tokens=1).choices[0].model_dump(exclude_unset=True)


def test_lm_evaluation_harness_loglikelihood_requests(stack):
    """What lm-evaluation-harness's `local-completions` model sends for a
    loglikelihood task (lm_eval 0.4.13, tokenized requests: context +
    continuation ids, max_tokens 1, echo, logprobs 1), parsed as it parses
    the answer: the continuation's summed logprob and whether it is greedy."""
    tok = stack.tokenizer
    docs = [("The capital of France is", " Paris"), ("Once upon a time", " there was"),
            ("def add(a, b):", "\n    return a + b")]
    contexts = [tok.encode(c) for c, _ in docs]
    wholes = [tok.encode(c + x) for c, x in docs]
    r = httpx.post(f"{stack.gateway.url}/v1/completions", timeout=60, json={
        "model": "default", "prompt": wholes, "temperature": 0, "max_tokens": 1,
        "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for ctx, whole, choice in zip(contexts, wholes, choices):
        ctxlen = len(ctx)
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        scores = stack.scores(whole)
        assert sum(lps) == pytest.approx(sum(scores[ctxlen - 1:]), abs=1e-3)
        logits = stack.model(mx.array([whole]))[0]
        greedy = all(mx.argmax(logits[i]).item() == whole[i + 1]
                     for i in range(ctxlen - 1, len(whole) - 1))
        assert greedy == all(v == max(t.values()) for v, t in zip(lps, tops))
        assert choice["text"] == tok.decode(whole) + choice["text"][len(tok.decode(whole)):]
