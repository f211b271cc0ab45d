"""Small random-weight vision-language models, built fully offline, one per family the
engine serves: mlx-vlm's own model class for the config, the family's own processor
configs (loaded by mlx-vlm's processors, which need no PyTorch), a tokenizer trained
in-process and a chat template that renders image parts as the family's real one does.

Each folder loads with ``mlx_vlm.load(path)`` (strictly: every weight present and used)
and ``mlx_vlm.utils.load_processor(path)``. Pass absolute paths: transformers needs one
offline.

Usage: python -m vllm_mlx.bench.test_models --out DIR --vlm FAMILY
Importable: ``build_vlm_model(out_dir, family="qwen2_vl", seed=0)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_mlx.bench.test_models import (
    EOS_TOKEN,
    PAD_TOKEN,
    SHAPES,
    SPECIAL_TOKENS,
    TRAINED_VOCAB_SIZE,
    _write_json,
    _write_tokenizer_config,
    build_tokenizer_json,
    random_parameters,
)

# The tiny language model every family shares. head_dim 16: the mrope sections (temporal,
# height, width) must sum to head_dim / 2.
VLM_TEXT_DIMS: dict[str, Any] = {**SHAPES["tiny"], "max_position_embeddings": 4096,
                                  "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
HIDDEN = VLM_TEXT_DIMS["hidden_size"]
# A two-layer vision tower 32 wide; most families see 56x56 pixels in 14-pixel patches.
VISION_WIDTH, IMAGE_SIZE, PATCH = 32, 56, 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]


def _pixels(mean: list[float] = HALF, std: list[float] = HALF) -> dict[str, Any]:
    return {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": mean, "image_std": std, "do_convert_rgb": True}


def _clip_vision(**extra) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "num_hidden_layers": 2,
            "hidden_size": VISION_WIDTH, "intermediate_size": 64, "num_attention_heads": 2,
            "image_size": IMAGE_SIZE, "patch_size": PATCH, "projection_dim": VISION_WIDTH,
            "num_channels": 3, "layer_norm_eps": 1e-5, **extra}


def _siglip_vision(**extra) -> dict[str, Any]:
    return {**_clip_vision(), "model_type": "siglip_vision_model", "layer_norm_eps": 1e-6,
            **extra}


def _text(model_type: str, **extra) -> dict[str, Any]:
    return {"model_type": model_type, **VLM_TEXT_DIMS, **extra}


def _template(open_turn: str, image: str, close_turn: str, generation: str,
              bos: str = "", video: str = "") -> str:
    """A chat template that renders each message as open_turn + content + close_turn
    (Jinja expressions, which may read `role`), its image parts as `image` (and video
    parts as `video`), in the order the parts come, as the families' own do."""
    video_part = (f"{{%- elif part.type == 'video' -%}}{{{{- {video!r} -}}}}" if video
                  else "")
    return (
        f"{{{{- {bos!r} -}}}}"
        "{%- for message in messages -%}{%- set role = message.role -%}"
        f"{{{{- {open_turn} -}}}}"
        "{%- if message.content is string -%}{{- message.content -}}{%- else -%}"
        "{%- for part in message.content -%}"
        f"{{%- if part.type == 'image' -%}}{{{{- {image!r} -}}}}{video_part}"
        "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        f"{{{{- {close_turn} -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {generation!r} -}}}}{{%- endif -%}}")


CHATML = dict(open_turn="'<|im_start|>' + role + '\\n'", close_turn="'<|im_end|>\\n'",
              generation="<|im_start|>assistant\n")


class Family:
    """How to write one family's folder: its extra special tokens (they follow the
    shared ones, so the first of them gets id len(SPECIAL_TOKENS)), its chat
    template, and, from the token ids, config.json and the processor's files."""

    def __init__(self, tokens: list[str], template: str,
                 config: Callable[[dict[str, int]], dict[str, Any]],
                 files: Callable[[dict[str, int]], dict[str, dict[str, Any]]],
                 tokenizer: dict[str, Any] | None = None):
        self.tokens, self.template = tokens, template
        self.config, self.files, self.tokenizer = config, files, tokenizer or {}


# -- Qwen2-VL, Qwen2.5-VL, Qwen3-VL --------------------------------------------------------

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
               "<|video_pad|>"]
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Renders content-part lists the way Qwen2-VL's template does: each image or video part
# becomes <|vision_start|><|image_pad|><|vision_end|> (or <|video_pad|>), which the
# processor then expands to one pad token per merged patch.
VLM_CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
  {%- if loop.first and message.role != 'system' -%}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
  {%- endif -%}
  {{- '<|im_start|>' + message.role + '\\n' -}}
  {%- if message.content is string -%}
    {{- message.content -}}
  {%- else -%}
    {%- for part in message.content or [] -%}
      {%- if part.type in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}
        {%- set image_count.value = image_count.value + 1 -%}
        {%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}
        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
      {%- elif part.type in ('video', 'video_url') or 'video' in part -%}
        {%- set video_count.value = video_count.value + 1 -%}
        {%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}
        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
      {%- elif 'text' in part -%}
        {{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

MROPE_SECTION = [2, 3, 3]
# Pixels per merged token: (patch_size * merge_size) ** 2. Images keep their size between
# 4 and 960 merged tokens (a 1920x1080 image is scaled down to at most 960); video frames
# between 4 and 128 per pair of frames. The low minimum keeps small frames from being
# upscaled (Qwen's own video minimum is 128 tokens).
MAX_IMAGE_TOKENS = 960
MAX_VIDEO_TOKENS = 128
MIN_TOKENS = 4


def _qwen_config(family: str, ids: dict[str, int]) -> dict[str, Any]:
    text = dict(VLM_TEXT_DIMS)
    special = {
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "bos_token_id": None,
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
    }
    patches = {"in_chans": 3, "in_channels": 3, "patch_size": 14, "spatial_patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32,
                  "hidden_size": text["hidden_size"],  # the merger's output: the LM's width
                  "mlp_ratio": 2,  # an int: transformers validates it
                  "num_heads": 2, **patches}
    else:
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64,
                  "out_hidden_size": text["hidden_size"], "num_heads": 2, **patches,
                  "tokens_per_second": 2, "window_size": 56, "fullatt_block_indexes": [1],
                  "hidden_act": "silu"}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {
            "architectures": [{"qwen2_vl": "Qwen2VLForConditionalGeneration",
                               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family]],
            "model_type": family,
            **text,
            **special,
            "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
            "sliding_window": 4096,
            "use_sliding_window": False,
            "torch_dtype": "float32",
            "vision_config": vision,
        }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        **special,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen3_vl_text",
            **text,
            "head_dim": text["hidden_size"] // text["num_attention_heads"],
            "hidden_act": "silu",
            "attention_bias": False,
            "rope_scaling": {"rope_type": "default", "mrope_section": MROPE_SECTION,
                             "mrope_interleaved": True},
            "bos_token_id": None,
            "eos_token_id": ids[EOS_TOKEN],
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": text["hidden_size"],
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # an 8x8 grid, interpolated per image
            "deepstack_visual_indexes": [0],
            "hidden_act": "gelu_pytorch_tanh",
        },
    }


def _qwen_files(family: str) -> dict[str, dict[str, Any]]:
    """preprocessor_config.json and video_preprocessor_config.json for the family."""
    patch = 16 if family == "qwen3_vl" else 14
    token_pixels = (patch * 2) ** 2
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                       "qwen3_vl": "Qwen3VLProcessor"}[family]
    mean, std = (HALF, HALF) if family == "qwen3_vl" else (CLIP_MEAN, CLIP_STD)
    common = {
        "processor_class": processor_class,
        "do_resize": True,
        **_pixels(mean, std),
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }

    def pixels(max_tokens: int) -> dict[str, Any]:
        lo, hi = MIN_TOKENS * token_pixels, max_tokens * token_pixels
        return {"min_pixels": lo, "max_pixels": hi,
                "size": {"shortest_edge": lo, "longest_edge": hi}}

    image = {"image_processor_type": "Qwen2VLImageProcessor", **common,
             **pixels(MAX_IMAGE_TOKENS)}
    video_type = "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor"
    # Frames are sampled by the media workers; the processor takes them all.
    video = {"video_processor_type": video_type, **common, **pixels(MAX_VIDEO_TOKENS),
             "do_sample_frames": False}
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def _qwen(family: str) -> Family:
    return Family(QWEN_TOKENS, VLM_CHAT_TEMPLATE, lambda ids: _qwen_config(family, ids),
                  lambda ids: _qwen_files(family))


# -- LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision ------------------------------------------------

LLAVA_TEMPLATE = _template("role.upper() + ': '", "<image>\n", "'<|im_end|>\\n'",
                           "ASSISTANT:")
# LLaVA-NeXT's tiles: a 56x56 base image plus the best fit among these.
PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def _llava_config(model_type: str, architecture: str, **extra):
    def config(ids: dict[str, int]) -> dict[str, Any]:
        return {"architectures": [architecture], "model_type": model_type,
                "text_config": _text("llama"), "vision_config": _clip_vision(),
                "image_token_index": ids["<image>"], "vision_feature_layer": -2,
                "vision_feature_select_strategy": "default",
                "vocab_size": TRAINED_VOCAB_SIZE, "eos_token_id": ids[EOS_TOKEN],
                "pad_token_id": ids[PAD_TOKEN], **extra}
    return config


def _llava_files(processor: str, image_processor: str, **extra):
    def files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
        return {
            "preprocessor_config.json": {
                "image_processor_type": image_processor, "processor_class": processor,
                "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
                "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                **_pixels(CLIP_MEAN, CLIP_STD), **extra},
            "processor_config.json": {
                "processor_class": processor, "patch_size": PATCH, "image_token": "<image>",
                "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}}
    return files


ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _onevision_config(ids: dict[str, int]) -> dict[str, Any]:
    return {"architectures": ["LlavaOnevisionForConditionalGeneration"],
            "model_type": "llava_onevision", "text_config": _text("qwen2"),
            "vision_config": _siglip_vision(vision_use_head=False),
            "image_token_index": ids["<image>"], "video_token_index": ids["<video>"],
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": ONEVISION_PINPOINTS,
            "vocab_size": TRAINED_VOCAB_SIZE, "tie_word_embeddings": True,
            "eos_token_id": ids[EOS_TOKEN], "pad_token_id": ids[PAD_TOKEN]}


def _onevision_files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return {
        "preprocessor_config.json": {
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "processor_class": "LlavaOnevisionProcessor", "do_resize": True, "size": size,
            "do_pad": True, "image_grid_pinpoints": ONEVISION_PINPOINTS, **_pixels()},
        "video_preprocessor_config.json": {"size": size, "image_mean": HALF, "image_std": HALF},
        "processor_config.json": {
            "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>",
            "video_token": "<video>", "vision_feature_select_strategy": "full",
            "num_image_tokens": (IMAGE_SIZE // PATCH) ** 2}}


# -- Idefics2, Idefics3, SmolVLM ---------------------------------------------------------

IDEFICS_TOKENS = (["<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>"]
                  + [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)])
IDEFICS_TEMPLATE = _template("role | capitalize + ':'", "<image>", "'<end_of_utterance>\\n'",
                             "Assistant:", bos="<|im_start|>")


def _idefics2_config(ids: dict[str, int]) -> dict[str, Any]:
    return {"architectures": ["Idefics2ForConditionalGeneration"], "model_type": "idefics2",
            "text_config": _text("mistral", tie_word_embeddings=False),
            "vision_config": {"model_type": "idefics2", "hidden_size": VISION_WIDTH,
                              "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": IMAGE_SIZE,
                              "patch_size": PATCH},
            "perceiver_config": {"model_type": "idefics2", "resampler_n_latents": 8,
                                 "resampler_depth": 1, "resampler_n_heads": 2,
                                 "resampler_head_dim": 16, "num_key_value_heads": 1},
            "image_token_id": ids["<image>"], "vocab_size": TRAINED_VOCAB_SIZE,
            "eos_token_id": ids["<end_of_utterance>"], "pad_token_id": ids[PAD_TOKEN]}


def _idefics3_config(model_type: str, architecture: str):
    def config(ids: dict[str, int]) -> dict[str, Any]:
        return {"architectures": [architecture], "model_type": model_type,
                "text_config": _text("llama", tie_word_embeddings=False),
                "vision_config": {"model_type": f"{model_type}_vision",
                                  "hidden_size": VISION_WIDTH, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "image_size": IMAGE_SIZE, "patch_size": PATCH},
                "scale_factor": 2, "image_token_id": ids["<image>"],
                "vocab_size": TRAINED_VOCAB_SIZE, "eos_token_id": ids["<end_of_utterance>"],
                "pad_token_id": ids[PAD_TOKEN]}
    return config


def _idefics_files(name: str, image: dict[str, Any], seq_len: int):
    def files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
        return {"preprocessor_config.json": {
                    "image_processor_type": f"{name}ImageProcessor",
                    "processor_class": f"{name}Processor", "do_resize": True, "do_pad": True,
                    **_pixels(), **image},
                "processor_config.json": {"processor_class": f"{name}Processor",
                                          "image_seq_len": seq_len}}
    return files


# Idefics3 and SmolVLM split an image into up to 2x2 crops of 56 pixels plus the whole.
SPLIT_IMAGES = {"size": {"longest_edge": 2 * IMAGE_SIZE},
                "max_image_size": {"longest_edge": IMAGE_SIZE},
                "do_image_splitting": True, "resample": 1}


# -- PaliGemma, Gemma 3 ----------------------------------------------------------------------

# PaliGemma's prompt is its images, <bos>, the question and a newline (its processor's
# layout); it keeps no conversation, so the template renders the last message.
PALIGEMMA_TEMPLATE = (
    "{%- set m = messages[-1] -%}"
    "{%- if m.content is string -%}{{- '<bos>' + m.content + '\\n' -}}{%- else -%}"
    "{%- for part in m.content if part.type == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    "{{- '<bos>' -}}"
    "{%- for part in m.content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}"
    "{{- '\\n' -}}{%- endif -%}")


def _paligemma_config(ids: dict[str, int]) -> dict[str, Any]:
    # use_bidirectional_attention is left unset, as in the published checkpoints:
    # mlx-vlm then attends over the whole prompt both ways (a prefix LM).
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "text_config": _text("gemma", head_dim=16),
            "vision_config": _siglip_vision(projection_dim=HIDDEN),
            "image_token_index": ids["<image>"], "vocab_size": TRAINED_VOCAB_SIZE,
            "hidden_size": HIDDEN, "projection_dim": HIDDEN, "pad_token_id": ids[PAD_TOKEN],
            "bos_token_id": ids["<bos>"], "eos_token_id": ids[EOS_TOKEN]}


def _square_image_files(image_processor: str, processor: str, tokens: int, **extra):
    """A processor that resizes every image to IMAGE_SIZE square, `tokens` a image."""
    def files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
        return {"preprocessor_config.json": {
                    "image_processor_type": image_processor, "processor_class": processor,
                    "do_resize": True, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                    **_pixels(), **extra},
                "processor_config.json": {"processor_class": processor,
                                          "image_seq_length": tokens}}
    return files


GEMMA3_TOKENS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>",
                 "<end_of_turn>", "<bos>"]
GEMMA3_TEMPLATE = _template(
    "'<start_of_turn>' + ('model' if message.role == 'assistant' else role) + '\\n'",
    "<start_of_image>", "'<end_of_turn>\\n'", "<start_of_turn>model\n", bos="<bos>")
# 2x2 pooled tokens per image; layers alternate sliding-window (16 tokens) and global
# attention, as Gemma 3's five-to-one pattern does.
GEMMA3_IMAGE_TOKENS = 4


def _gemma3_config(ids: dict[str, int]) -> dict[str, Any]:
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": _text("gemma3_text", head_dim=16, query_pre_attn_scalar=16,
                                 sliding_window=16, sliding_window_pattern=2,
                                 mm_tokens_per_image=GEMMA3_IMAGE_TOKENS),
            "vision_config": _siglip_vision(),
            "image_token_index": ids["<image_soft_token>"],
            "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS,
            "boi_token_index": ids["<start_of_image>"], "eoi_token_index": ids["<end_of_image>"],
            "vocab_size": TRAINED_VOCAB_SIZE, "pad_token_id": ids[PAD_TOKEN],
            "eos_token_id": [ids[EOS_TOKEN], ids["<end_of_turn>"]]}


GEMMA3_TOKENIZER = {"bos_token": "<bos>", "extra_special_tokens": {
    "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>"}}


# -- Pixtral, Mistral 3 ----------------------------------------------------------------------

PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "<s>"]
PIXTRAL_TEMPLATE = _template("'[INST]' if role == 'user' else ''", "[IMG]",
                             "'[/INST]' if role == 'user' else '<|im_end|>'", "", bos="<s>")


def _pixtral_config(model_type: str, architecture: str, **extra):
    def config(ids: dict[str, int]) -> dict[str, Any]:
        return {"architectures": [architecture], "model_type": model_type,
                "text_config": _text("mistral", head_dim=16, tie_word_embeddings=False),
                "vision_config": {"model_type": "pixtral", "num_hidden_layers": 2,
                                  "hidden_size": VISION_WIDTH, "head_dim": 16,
                                  "intermediate_size": 64, "num_attention_heads": 2,
                                  "image_size": 2 * IMAGE_SIZE, "patch_size": PATCH},
                "image_token_index": ids["[IMG]"], "vision_feature_layer": -1,
                "vocab_size": TRAINED_VOCAB_SIZE, "pad_token_id": ids[PAD_TOKEN],
                "eos_token_id": ids[EOS_TOKEN], **extra}
    return config


def _pixtral_files(processor: str, merge: int):
    def files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
        return {"preprocessor_config.json": {
                    "image_processor_type": "PixtralImageProcessor", "processor_class": processor,
                    "size": {"longest_edge": 2 * IMAGE_SIZE},
                    "patch_size": {"height": PATCH, "width": PATCH}, "do_resize": True,
                    **_pixels(CLIP_MEAN, CLIP_STD)},
                "processor_config.json": {
                    "processor_class": processor, "patch_size": PATCH,
                    "spatial_merge_size": merge, "image_token": "[IMG]",
                    "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}}
    return files


# -- Molmo ----------------------------------------------------------------------------------

MOLMO_TOKENS = ["<im_patch>", "<im_col>", "<im_start>", "<im_end>"]
# Molmo's template renders text only; its processor puts the image before the prompt.
MOLMO_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- ' User: ' if message.role == 'user' else ' ' + message.role | capitalize + ': ' -}}"
    "{%- if message.content is string -%}{{- message.content -}}{%- else -%}"
    "{%- for part in message.content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' Assistant:' -}}{%- endif -%}")
# 112-pixel crops of 8x8 patches pooled to 4x4 tokens, margins of 2 patches: the ratios
# of Molmo's own 336-pixel crops.
MOLMO_CROP = 112


def _molmo_config(ids: dict[str, int]) -> dict[str, Any]:
    patches = MOLMO_CROP // PATCH
    return {"architectures": ["MolmoForCausalLM"], "model_type": "molmo",
            "text_config": {"model_type": "molmo", "d_model": HIDDEN, "n_heads": 4,
                            "n_kv_heads": 2, "n_layers": 2, "mlp_ratio": 4,
                            "mlp_hidden_size": 256, "vocab_size": TRAINED_VOCAB_SIZE,
                            "embedding_size": TRAINED_VOCAB_SIZE, "additional_vocab_size": 128,
                            "max_sequence_length": 4096, "max_position_embeddings": 4096,
                            "weight_tying": False, "rope_theta": 10000.0},
            "vision_config": {"model_type": "molmo",
                              "image_default_input_size": [MOLMO_CROP, MOLMO_CROP],
                              "image_patch_size": PATCH, "image_pos_patch_size": PATCH,
                              "hidden_size": 128, "image_emb_dim": VISION_WIDTH,
                              "image_num_heads": 2, "image_num_key_value_heads": 2,
                              "image_num_layers": 2, "image_head_dim": 16, "image_mlp_dim": 64,
                              "image_num_pos": patches * patches + 1, "d_model": HIDDEN,
                              "vit_layers": [-1, -2]},
            "vocab_size": TRAINED_VOCAB_SIZE, "eos_token_id": ids[EOS_TOKEN],
            "pad_token_id": ids[PAD_TOKEN]}


def _molmo_files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
    pooled = MOLMO_CROP // PATCH // 2
    return {"preprocessor_config.json": {
                "image_processor_type": "MolmoImageProcessor", "processor_class": "MolmoProcessor",
                "max_crops": 4, "overlap_margins": [2, 2],
                "base_image_input_size": [MOLMO_CROP, MOLMO_CROP],
                "image_token_length_w": pooled, "image_token_length_h": pooled,
                "image_patch_size": PATCH, "image_padding_mask": True, "do_normalize": True,
                "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
            "processor_config.json": {"processor_class": "MolmoProcessor"}}


# -- DeepSeek-VL2 ---------------------------------------------------------------------------

DEEPSEEK_TOKENS = ["<image>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
                   "<|User|>", "<|Assistant|>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>",
                   "<|grounding|>"]
DEEPSEEK_TEMPLATE = _template(
    "'<|User|>: ' if role == 'user' else '<|Assistant|>: '", "<image>\n", "'\\n\\n'",
    "<|Assistant|>:", bos="<｜begin▁of▁sentence｜>")
DEEPSEEK_RESOLUTIONS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _deepseek_config(ids: dict[str, int]) -> dict[str, Any]:
    bos, eos = ids["<｜begin▁of▁sentence｜>"], ids["<｜end▁of▁sentence｜>"]
    # DeepSeek-V2's language model: multi-head latent attention. Its mixture-of-experts
    # layers are left out (first_k_dense_replace covers both layers): on the CPU,
    # mlx-vlm's sorted expert gather gave different tokens from run to run for the
    # same prompt (not when each expert layer's output was evaluated on its own).
    return {"architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2",
            "language_config": {
                "model_type": "deepseek_v2", "vocab_size": TRAINED_VOCAB_SIZE,
                "hidden_size": HIDDEN, "intermediate_size": 128, "moe_intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                "n_shared_experts": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
                "first_k_dense_replace": 2, "kv_lora_rank": 16, "q_lora_rank": None,
                "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 8,
                "max_position_embeddings": 4096, "topk_method": "greedy",
                "bos_token_id": bos, "eos_token_id": eos},
            "vision_config": {"model_type": "vision", "layers": 2, "width": VISION_WIDTH,
                              "intermediate_size": 64, "num_attention_heads": 2,
                              "image_size": IMAGE_SIZE, "patch_size": PATCH, "mlp_ratio": 2.0},
            "projector_config": {"projector_type": "downsample_mlp_gelu",
                                 "input_dim": VISION_WIDTH, "n_embed": HIDDEN, "depth": 2,
                                 "mlp_ratio": 1, "downsample_ratio": 2},
            "candidate_resolutions": DEEPSEEK_RESOLUTIONS, "tile_tag": "2D",
            "global_view_pos": "head", "image_token_index": ids["<image>"],
            "vocab_size": TRAINED_VOCAB_SIZE, "pad_id": ids["<｜▁pad▁｜>"],
            "bos_token_id": bos, "eos_token_id": eos}


def _deepseek_files(ids: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {"processor_config.json": {
        "processor_class": "DeepseekVLV2Processor",
        "candidate_resolutions": DEEPSEEK_RESOLUTIONS, "patch_size": PATCH,
        "downsample_ratio": 2, "image_mean": HALF, "image_std": HALF, "normalize": True,
        "image_token": "<image>", "pad_token": "<｜▁pad▁｜>", "add_special_token": False,
        "sft_format": "deepseek", "mask_prompt": False, "ignore_id": -100}}


DEEPSEEK_TOKENIZER = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                      "pad_token": "<｜▁pad▁｜>"}


FAMILIES: dict[str, Family] = {
    **{f: _qwen(f) for f in QWEN_FAMILIES},
    "llava": Family(["<image>"], LLAVA_TEMPLATE,
                    _llava_config("llava", "LlavaForConditionalGeneration"),
                    _llava_files("LlavaProcessor", "CLIPImageProcessor")),
    "llava_next": Family(["<image>"], LLAVA_TEMPLATE,
                         _llava_config("llava_next", "LlavaNextForConditionalGeneration",
                                       image_grid_pinpoints=PINPOINTS),
                         _llava_files("LlavaNextProcessor", "LlavaNextImageProcessor",
                                      image_grid_pinpoints=PINPOINTS, do_pad=True)),
    "llava_onevision": Family(["<image>", "<video>"],
                              _template(**CHATML, image="<image>\n", video="<video>\n"),
                              _onevision_config, _onevision_files),
    "idefics2": Family(IDEFICS_TOKENS, IDEFICS_TEMPLATE, _idefics2_config,
                       _idefics_files("Idefics2", {
                           "size": {"shortest_edge": IMAGE_SIZE // 2, "longest_edge": IMAGE_SIZE},
                           "do_image_splitting": False}, 8)),
    "idefics3": Family(IDEFICS_TOKENS, IDEFICS_TEMPLATE,
                       _idefics3_config("idefics3", "Idefics3ForConditionalGeneration"),
                       _idefics_files("Idefics3", SPLIT_IMAGES, 4)),
    "smolvlm": Family(IDEFICS_TOKENS, IDEFICS_TEMPLATE,
                      _idefics3_config("smolvlm", "SmolVLMForConditionalGeneration"),
                      _idefics_files("SmolVLM", SPLIT_IMAGES, 4)),
    "paligemma": Family(["<image>", "<bos>"], PALIGEMMA_TEMPLATE, _paligemma_config,
                        _square_image_files("SiglipImageProcessor", "PaliGemmaProcessor",
                                            (IMAGE_SIZE // PATCH) ** 2, resample=3,
                                            image_seq_length=(IMAGE_SIZE // PATCH) ** 2),
                        {"bos_token": "<bos>"}),
    "gemma3": Family(GEMMA3_TOKENS, GEMMA3_TEMPLATE, _gemma3_config,
                     _square_image_files("Gemma3ImageProcessor", "Gemma3Processor",
                                         GEMMA3_IMAGE_TOKENS, resample=2,
                                         do_pan_and_scan=False),
                     GEMMA3_TOKENIZER),
    "pixtral": Family(PIXTRAL_TOKENS, PIXTRAL_TEMPLATE,
                      _pixtral_config("pixtral", "LlavaForConditionalGeneration"),
                      _pixtral_files("PixtralProcessor", 1)),
    "mistral3": Family(PIXTRAL_TOKENS, PIXTRAL_TEMPLATE,
                       _pixtral_config("mistral3", "Mistral3ForConditionalGeneration",
                                       spatial_merge_size=2),
                       _pixtral_files("Mistral3Processor", 2)),
    "molmo": Family(MOLMO_TOKENS, MOLMO_TEMPLATE, _molmo_config, _molmo_files),
    "deepseek_vl_v2": Family(DEEPSEEK_TOKENS, DEEPSEEK_TEMPLATE, _deepseek_config,
                             _deepseek_files, DEEPSEEK_TOKENIZER),
}
VLM_FAMILIES = tuple(FAMILIES)


def build_vlm_model(out_dir: Path, *, family: str = "qwen2_vl", seed: int = 0,
                    dtype: str = "float32") -> Path:
    """Write a random-weight vision-language model folder of `family` (a model type
    of mlx-vlm, one of VLM_FAMILIES) loadable with ``mlx_vlm.load(out_dir)`` and
    mlx-vlm's processor for it. Pass an absolute path to both offline."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    if family not in FAMILIES:
        raise ValueError(f"unknown vision-language family {family!r}; choose from "
                         f"{VLM_FAMILIES}")
    spec = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    specials = SPECIAL_TOKENS + spec.tokens
    tokenizer_json = build_tokenizer_json(VLM_TEXT_DIMS["vocab_size"], specials)
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    ids = {t: vocab[t] for t in specials}
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    config = spec.config(ids)
    _write_json(out_dir / "config.json", config)
    eos = config.get("eos_token_id") or ids[EOS_TOKEN]
    _write_json(out_dir / "generation_config.json",
                {"eos_token_id": eos, "pad_token_id": ids[PAD_TOKEN]})
    _write_tokenizer_config(out_dir, specials, spec.template,
                            VLM_TEXT_DIMS["max_position_embeddings"], **spec.tokenizer)
    _write_json(out_dir / "chat_template.json", {"chat_template": spec.template})
    for name, content in spec.files(ids).items():
        _write_json(out_dir / name, content)

    # Parameter names and shapes come from mlx-vlm's own Model class; lazy, so its own
    # random init is never computed. Configured as mlx_vlm.utils.load_model does.
    module, _ = get_model_and_args(config)
    params = json.loads(json.dumps(config))
    params.setdefault("text_config", params.pop("language_config", {}))
    params.setdefault("vision_config", {})
    model_config = module.ModelConfig.from_dict(params)
    model_config = update_module_configs(model_config, module, params,
                                         ["text", "vision", "perceiver", "projector", "audio"])
    model = module.Model(model_config)
    shapes = [(k, v.shape) for k, v in tree_flatten(model.parameters())]
    weights = random_parameters(shapes, seed, HIDDEN, len(specials), dtype)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out_dir
