"""The served model's own preprocessing, loaded from its folder through mlx-vlm, and
the tokens each item takes in the prompt.

The chat template renders one token where an image or a video goes (its family's
token, vllm_mlx.vision_families); the item's tokens replace it. They are what the
family's processor puts there: the processor is run on that token alone and whatever
it adds around it (a BOS, say) is taken off again. A few families differ:
- Qwen: the image or video processor alone, one pad token per merged patch (the
  processor's own video expansion adds frame timestamps the engine does not place);
- PaliGemma: the processor also adds <bos> and a newline (the template renders those);
- DeepSeek-VL2: its processor lays the whole prompt out itself; its image mask counts;
- LLaVA-NeXT: mlx-vlm's model places two rows of features per tile (the tile's own and
  a newline row) whatever the processor counted, so that many tokens.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from media_worker.errors import MediaError
from vllm_mlx.vision_families import FAMILIES, Family

# Files whose content shapes the tensors; their hash goes into content hashes.
_CONFIG_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                 "processor_config.json")
# Processor outputs about the text, not the item: the engine builds the prompt itself.
_TEXT_OUTPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "labels",
                           "target_ids", "images_seq_mask", "num_image_tokens", "seq_lens",
                           "batch_num_images"})
# Families whose image and video processors are called alone (see the module's doc).
_SUB_PROCESSOR_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})


@dataclass
class Prepared:
    tensors: dict[str, np.ndarray]
    placeholder_token_id: int  # the token the template renders for it (0: none, Molmo)
    token_ids: list[int]  # what stands for it in the prompt


def _merged_patches(outputs: dict[str, np.ndarray], pre: "Preprocessor", kind: str) -> int:
    grid = outputs["image_grid_thw" if kind == "image" else "video_grid_thw"]
    sub = pre.processor.image_processor if kind == "image" else pre.processor.video_processor
    merge = int(getattr(sub, "merge_size", 2))
    return int(np.prod(grid[0])) // (merge * merge)


def _llava_next_rows(outputs: dict[str, np.ndarray], pre: "Preprocessor", kind: str) -> int:
    vision = pre.config["vision_config"]
    per_tile = (vision["image_size"] // vision["patch_size"]) ** 2
    if pre.config.get("vision_feature_select_strategy", "default") != "default":
        per_tile += 1  # the class token is kept
    return 2 * outputs["pixel_values"].shape[1] * per_tile


# Copies of the family's token an item takes, where the processor's own expansion is
# not what the engine places (the module's doc says why).
COUNTS: dict[str, Callable[[dict[str, np.ndarray], "Preprocessor", str], int]] = {
    **{family: _merged_patches for family in _SUB_PROCESSOR_FAMILIES},
    "paligemma": lambda outputs, pre, kind: int(pre.processor.image_seq_length),
    "deepseek_vl_v2": lambda outputs, pre, kind: int(np.sum(outputs["images_seq_mask"])),
    "llava_next": _llava_next_rows,
}


class Preprocessor:
    """Loaded once per worker; its calls are safe from several threads (the
    processors keep no state between calls)."""

    def __init__(self, model_path: str):
        # The model is a local folder; nothing may reach for the Hub (read at import).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from mlx_vlm.utils import get_model_and_args, get_model_type, load_processor

        path = Path(model_path).resolve()
        self.config = json.loads((path / "config.json").read_text())
        model_type = get_model_type(self.config)
        if model_type not in FAMILIES:
            raise SystemExit(f"the media worker does not know model type {model_type!r} "
                             f"yet (known: {', '.join(sorted(FAMILIES))})")
        self.model_type = model_type
        self.family: Family = FAMILIES[model_type]
        # Importing the architecture registers mlx-vlm's own (numpy) processor
        # for it with AutoProcessor; transformers' video processors need torch.
        get_model_and_args(self.config, path)
        self.processor = load_processor(str(path), add_detokenizer=False)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id = self._token_id(self.family.image_token)
        self.video_token_id = self._token_id(self.family.video_token)
        digest = hashlib.sha256(model_type.encode())
        for name in _CONFIG_FILES:
            if (path / name).exists():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        self.fingerprint = digest.hexdigest()

    def _token_id(self, token: str | None) -> int:
        if token is None:
            return 0
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise SystemExit(f"the model's tokenizer has no {token!r} token")
        return int(token_id)

    def image(self, img: Image.Image) -> Prepared:
        if self.model_type in _SUB_PROCESSOR_FAMILIES:
            outputs = _numpy(self.processor.image_processor(images=[img], return_tensors="np"))
            return self._prepared(outputs, "image", self.image_token_id, None)
        token = self.family.image_token or ""
        return self._run(token, self.image_token_id, "image", images=[img])

    def video(self, frames: list[np.ndarray]) -> Prepared:
        if (self.family.video_token is None
                or getattr(self.processor, "video_processor", None) is None):
            raise MediaError(f"the model ({self.model_type}) does not take video")
        if self.model_type in _SUB_PROCESSOR_FAMILIES:
            outputs = _numpy(self.processor.video_processor(videos=[frames], return_tensors="np"))
            return self._prepared(outputs, "video", self.video_token_id, None)
        return self._run(self.family.video_token, self.video_token_id, "video", videos=[frames])

    def _run(self, text: str, token_id: int, kind: str, **media) -> Prepared:
        """The whole processor on the family's token alone: its tensors, and the
        tokens it put where the token was."""
        outputs = _numpy(self.processor(text=text, **media))
        ids = [int(t) for t in np.asarray(outputs["input_ids"]).reshape(-1)]
        plain = list(self.tokenizer(text)["input_ids"])
        if token_id:
            at = plain.index(token_id)
            before, after = plain[:at], plain[at + 1:]
        else:  # no token: the processor's tokens come before the (empty) text's own
            before, after = [], plain
        inner = ids[len(before):len(ids) - len(after)]
        if ids[:len(before)] != before or ids[len(ids) - len(after):] != after:
            raise MediaError(f"{self.model_type}'s processor changed the text around the "
                             f"{kind}: it cannot be placed in a prompt")
        return self._prepared(outputs, kind, token_id, inner)

    def _prepared(self, outputs: dict[str, np.ndarray], kind: str, token_id: int,
                  ids: list[int] | None) -> Prepared:
        count = COUNTS.get(self.model_type)
        if count is not None:
            ids = [token_id] * count(outputs, self, kind)
        tensors = {k: v for k, v in outputs.items() if k not in _TEXT_OUTPUTS}
        return Prepared(tensors, token_id, ids)


def _numpy(outputs) -> dict[str, np.ndarray]:
    """A processor's outputs as C-order numpy arrays; what is not an array of numbers
    (DeepSeek-VL2's formatted prompt) is left out, and its `images` are pixel_values."""
    arrays = {}
    for key in outputs.keys():
        try:
            value = np.asarray(outputs[key])
        except ValueError:  # ragged: not a tensor
            continue
        if value.dtype.kind in "biuf":
            arrays["pixel_values" if key == "images" else key] = np.ascontiguousarray(value)
    return arrays
