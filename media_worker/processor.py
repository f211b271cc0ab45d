"""The served model's own preprocessing, loaded from its folder through
mlx-vlm, and what each model family needs to know on top of it: which token
stands in for an image or a video, and how many copies of it one item takes.
Adding a family is one entry in FAMILIES."""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from media_worker.errors import MediaError

# Files whose content shapes the tensors; their hash goes into content hashes.
_CONFIG_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                 "processor_config.json")


@dataclass(frozen=True)
class Family:
    image_token: str
    video_token: str | None
    # (the processor's outputs for one item, the processor, "image"|"video")
    # -> number of placeholder tokens.
    count: Callable[[dict[str, np.ndarray], object, str], int]


def _qwen_count(tensors: dict[str, np.ndarray], processor: object, kind: str) -> int:
    # One token per merge_size x merge_size block of patches in each frame group.
    grid = tensors["image_grid_thw" if kind == "image" else "video_grid_thw"]
    sub = processor.image_processor if kind == "image" else processor.video_processor
    merge = int(getattr(sub, "merge_size", 2))
    return int(np.prod(grid[0])) // (merge * merge)


_QWEN = Family("<|image_pad|>", "<|video_pad|>", _qwen_count)
FAMILIES: dict[str, Family] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "qwen3_vl_moe": _QWEN,
}


@dataclass
class Prepared:
    tensors: dict[str, np.ndarray]
    placeholder_token_id: int
    num_placeholder_tokens: int


class Preprocessor:
    """Loaded once per worker; its calls are safe from several threads (the
    processors keep no state between calls)."""

    def __init__(self, model_path: str):
        from mlx_vlm.utils import get_model_and_args, get_model_type, load_processor

        path = Path(model_path).resolve()
        config = json.loads((path / "config.json").read_text())
        model_type = get_model_type(config)
        if model_type not in FAMILIES:
            raise SystemExit(f"the media worker does not know model type {model_type!r} "
                             f"yet (known: {', '.join(sorted(FAMILIES))})")
        self.model_type = model_type
        self.family = FAMILIES[model_type]
        # Importing the architecture registers mlx-vlm's own (numpy) processor
        # for it with AutoProcessor; transformers' video processors need torch.
        get_model_and_args(config, path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.processor = load_processor(str(path), add_detokenizer=False)
        tokenizer = self.processor.tokenizer
        self.image_token_id = self._token_id(tokenizer, self.family.image_token)
        self.video_token_id = (self._token_id(tokenizer, self.family.video_token)
                               if self.family.video_token else None)
        digest = hashlib.sha256(model_type.encode())
        for name in _CONFIG_FILES:
            if (path / name).exists():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        self.fingerprint = digest.hexdigest()

    @staticmethod
    def _token_id(tokenizer, token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise SystemExit(f"the model's tokenizer has no {token!r} token")
        return int(token_id)

    def image(self, img: Image.Image) -> Prepared:
        out = _numpy(self.processor.image_processor(images=[img], return_tensors="np"))
        return Prepared(out, self.image_token_id, self.family.count(out, self.processor, "image"))

    def video(self, frames: list[np.ndarray]) -> Prepared:
        if self.video_token_id is None or getattr(self.processor, "video_processor", None) is None:
            raise MediaError(f"the model ({self.model_type}) does not take video")
        out = _numpy(self.processor.video_processor(videos=[frames], return_tensors="np"))
        return Prepared(out, self.video_token_id, self.family.count(out, self.processor, "video"))


def _numpy(outputs) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in dict(outputs).items()}
