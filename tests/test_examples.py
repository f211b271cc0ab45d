"""Each script in examples/ runs as the README says, against the tiny models
(servers started here), exits 0 and prints something."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import start_engine, start_gateway

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def sections(out: str) -> list[str]:
    """The text under each '== ' heading; every one must be non-empty."""
    parts = [p.split("\n", 1) for p in out.split("== ")[1:]]
    for title, *body in parts:
        assert body and body[0].strip(), f"section {title!r} printed nothing:\n{out}"
    return [title for title, *_ in parts]


@pytest.fixture(scope="module")
def text_server(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("example-logs")
    engine = start_engine(tiny_model, logs)
    gateway = start_gateway(engine.address, logs)
    yield f"{gateway.url}/v1"
    gateway.stop()
    engine.stop()




def test_simple_generate(tiny_model):
    out = run("simple_generate.py", "--model", str(tiny_model), "--max-tokens", "12")
    assert sections(out) == ["generate", "stream_generate", "chat"]


def test_mllm_example_with_and_without_an_image(tiny_vlm, tmp_path):
    from vllm_mlx.bench.inputs import jpeg, photo_like

    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg(photo_like(96, 64, 3), 90))
    with_image = run("mllm_example.py", str(image), "--model", str(tiny_vlm),
                     "--max-tokens", "6")
    assert sections(with_image) == ["describe_image", "answer_about_image", "a custom prompt"]
    text_only = run("mllm_example.py", "--model", str(tiny_vlm), "--max-tokens", "6")
    assert sections(text_only) == ["text only (no image given)"]


def test_demo_openai_text(text_server):
    out = run("demo_openai_text.py", "--base-url", text_server, "--max-tokens", "12")
    assert sections(out) == ["a simple completion", "a system message", "streaming",
                             "a multi-turn conversation", "temperature"]


def test_demo_openai_image_and_video(vision_stack):
    image = run("demo_openai_image.py", "--base-url", vision_stack, "--max-tokens", "6")
    assert sections(image) == ["the image (base64)", "a follow-up question"]
    video = run("demo_openai_video.py", "--base-url", vision_stack, "--max-tokens", "6")
    assert sections(video) == ["describe the video", "a specific question, then a follow-up"]
