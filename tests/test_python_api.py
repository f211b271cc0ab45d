"""vllm_mlx.models: the seed's Python API, in this process, on the tiny models;
and the same greedy text as the server gives for the same prompt."""

import json

import pytest
from openai import OpenAI

from vllm_mlx.models import MLXLanguageModel, MLXVisionLanguageModel

from .conftest import start_engine, start_gateway

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def model(tiny_model):
    with MLXLanguageModel(str(tiny_model)) as m:
        yield m


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("api-logs")
    engine = start_engine(tiny_model, logs)
    gateway = start_gateway(engine.address, logs)
    yield OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)
    gateway.stop()
    engine.stop()


def test_generate_returns_text_tokens_reason_and_usage(model):
    out = model.generate(PROMPT, max_tokens=12, temperature=0)
    assert out.text and len(out.tokens) == 12 and out.finish_reason == "length"
    assert out.usage["completion_tokens"] == 12
    assert out.usage["total_tokens"] == out.usage["prompt_tokens"] + 12 > 12


def test_the_api_and_the_server_give_the_same_greedy_text(model, server):
    ours = model.generate(PROMPT, max_tokens=16, temperature=0)
    theirs = server.completions.create(model="default", prompt=PROMPT, max_tokens=16,
                                       temperature=0)
    assert ours.text == theirs.choices[0].text
    reply = model.chat(MESSAGES, max_tokens=16, temperature=0)
    served = server.chat.completions.create(model="default", messages=MESSAGES, max_tokens=16,
                                            temperature=0)
    assert reply.text == served.choices[0].message.content


def test_streaming_adds_up_to_the_whole_text(model):
    whole = model.generate(PROMPT, max_tokens=20, temperature=0)
    chunks = list(model.stream_generate(PROMPT, max_tokens=20, temperature=0))
    assert len(chunks) > 2, "the text arrives in pieces"
    assert "".join(c.text for c in chunks) == whole.text
    assert sum(len(c.tokens) for c in chunks) == 20
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None
                                                         for c in chunks[:-1])
    streamed_chat = "".join(c.text for c in model.stream_chat(MESSAGES, max_tokens=10,
                                                               temperature=0))
    assert streamed_chat == model.chat(MESSAGES, max_tokens=10, temperature=0).text


def test_a_stop_string_ends_the_text_before_it(model):
    whole = model.generate(PROMPT, max_tokens=24, temperature=0).text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert stop.strip(), whole
    out = model.generate(PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == whole[:whole.index(stop)]


def test_a_seeded_sample_is_reproduced(model):
    a = model.generate(PROMPT, max_tokens=16, temperature=1.5, seed=7)
    b = model.generate(PROMPT, max_tokens=16, temperature=1.5, seed=7)
    c = model.generate(PROMPT, max_tokens=16, temperature=1.5, seed=8)
    greedy = model.generate(PROMPT, max_tokens=16, temperature=0)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens


def test_batch_generate_matches_one_by_one(model):
    prompts = [PROMPT, "The sea", "In a small town, there lived", "Numbers: 1, 2, 3,"]
    alone = [model.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    before = model.engine.stats.prefill_passes
    together = model.batch_generate(prompts, max_tokens=12, temperature=0)
    assert [o.text for o in together] == alone
    assert model.engine.stats.prefill_passes - before < len(prompts), "one batch, not four"


def test_bad_arguments_are_refused_not_ignored(model):
    with pytest.raises(TypeError, match="unknown sampling argument"):
        model.generate(PROMPT, temprature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(PROMPT, temperature=-1)
    with pytest.raises(RuntimeError, match="load"):
        MLXLanguageModel("unused").generate(PROMPT)


def test_vision_model_reads_images_and_videos_from_files(tiny_vlm, tmp_path):
    from vllm_mlx.bench.inputs import encode_clip, jpeg, photo_like

    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    small.write_bytes(jpeg(photo_like(64, 64, 1), 90))
    big.write_bytes(jpeg(photo_like(320, 240, 2), 90))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_clip(2, 4, 96, 64))
    with MLXVisionLanguageModel(str(tiny_vlm)) as vlm:
        assert vlm.describe_image(str(small), max_tokens=4, temperature=0)
        one = vlm.generate("Compare.", images=[str(small)], max_tokens=4, temperature=0)
        two = vlm.generate("Compare.", images=[str(small), str(big)], max_tokens=4,
                           temperature=0)
        assert two.usage["prompt_tokens"] > one.usage["prompt_tokens"]
        assert vlm.answer_about_image(str(big), "What colour?", max_tokens=4)
        assert vlm.describe_video(str(clip), fps=2.0, max_tokens=4, temperature=0)
        with pytest.raises(ValueError, match="not a recognised image"):
            bad = tmp_path / "bad.jpg"
            bad.write_bytes(b"not an image at all" * 10)
            vlm.describe_image(str(bad))


def test_output_constraints_as_the_server_enforces_them(model):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    out = model.chat([{"role": "user", "content": "A number?"}], json_schema=schema,
                     temperature=1.0, seed=3, max_tokens=50)
    assert out.finish_reason == "stop" and 1 <= json.loads(out.text)["n"] <= 9
    assert model.generate("Pick:", choice=["left", "right"], temperature=1.0, seed=1,
                          max_tokens=10).text in ("left", "right")
    with pytest.raises(TypeError, match="one output constraint"):
        model.generate("x", regex="a+", grammar='start: "a"')
