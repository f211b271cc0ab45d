"""The tiny Qwen vision-language test models: they load with mlx-vlm (strictly) and with
the processors the media workers use, offline (the other families' models are checked by
test_vision_families.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_test_vlms


@pytest.mark.parametrize("family", make_test_vlms.QWEN_FAMILIES)
def test_tiny_vlm_loads_and_generates(family, tmp_path):
    import mlx_vlm
    from transformers import AutoConfig

    path = make_test_vlms.build_vlm_model(tmp_path / family, family=family).resolve()
    AutoConfig.from_pretrained(str(path))  # transformers validates config.json
    model, processor = mlx_vlm.load(str(path))  # strict: every weight present and used
    config = json.loads((path / "config.json").read_text())
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<|image_pad|>"] == config["image_token_id"]
    assert vocab["<|video_pad|>"] == config["video_token_id"]
    assert vocab["<|vision_start|>"] == config["vision_start_token_id"]

    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this?"},
        {"type": "video"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in text
    assert "<|vision_start|><|video_pad|><|vision_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")

    image = Image.new("RGB", (1920, 1080), (200, 30, 30))
    out = processor.image_processor(images=[image])
    merged = int(np.prod(np.array(out["image_grid_thw"][0]))) // 4
    assert merged <= 1000, f"a 1080p image takes {merged} tokens"
    frames = np.zeros((4, 60, 80, 3), np.uint8)  # small frames are not upscaled
    video = processor.video_processor(videos=[frames])
    t, h, w = np.array(video["video_grid_thw"][0]).tolist()
    assert (t, h * w) == (2, 24 if family != "qwen3_vl" else 16)

    result = mlx_vlm.generate(model, processor, text.replace(
        "<|vision_start|><|video_pad|><|vision_end|>", ""), image=[Image.new("RGB", (64, 48))],
        max_tokens=4, verbose=False)
    assert result.generation_tokens == 4


def test_tiny_vlm_is_deterministic(tmp_path):
    a = make_test_vlms.build_vlm_model(tmp_path / "a", seed=3)
    b = make_test_vlms.build_vlm_model(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
