"""What each vision-language family (an mlx-vlm model type) asks of a prompt: which
token its chat template renders where an image or a video goes, and what one request
may hold. Plain data, read by the media workers (which expand each item's token) and
by the engine's front end (which refuses what a family cannot take, naming the part).
The engine core's side of a family, its tensors and batching, is engine_worker/vision.py.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    # The token the chat template renders for each image; None: the template renders
    # none, and the images go before the whole prompt (as Molmo's processor puts them).
    image_token: str | None
    video_token: str | None = None  # None: the family takes no video
    max_images: int | None = None  # per request, where mlx-vlm's model takes only so many
    # mlx-vlm's embedding step takes a request's images or its videos, not both.
    one_media_kind: bool = False


_QWEN2 = Family("<|image_pad|>", "<|video_pad|>", one_media_kind=True)
_QWEN3 = Family("<|image_pad|>", "<|video_pad|>")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": _QWEN2,
    "qwen2_5_vl": _QWEN2,
    "qwen3_vl": _QWEN3,
    "qwen3_vl_moe": _QWEN3,
    "llava": Family("<image>"),
    # mlx-vlm's LLaVA-NeXT and PaliGemma place one image (its SINGLE_IMAGE_ONLY_MODELS).
    "llava_next": Family("<image>", max_images=1),
    "llava_onevision": Family("<image>", "<video>"),
    "idefics2": Family("<image>"),
    "idefics3": Family("<image>"),
    "smolvlm": Family("<image>"),
    "paligemma": Family("<image>", max_images=1),
    "gemma3": Family("<start_of_image>"),
    "pixtral": Family("[IMG]"),
    "mistral3": Family("[IMG]"),
    # mlx-vlm's Molmo processor pairs each image with its own copy of the text.
    "molmo": Family(None, max_images=1),
    "deepseek_vl_v2": Family("<image>"),
}
