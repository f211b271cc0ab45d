"""Vision-language models inside mlx-lm's BatchGenerator.

The engine batches every request, text or media, with mlx-lm's BatchGenerator,
which calls `model(token_ids, cache=...)` and knows nothing of images. Two
pieces make a vision-language model fit that call:

- `MediaRows`, one extra entry at the end of each request's cache list. The
  generator merges, splits, filters, extends and extracts every cache entry
  row by row, so this entry always holds, in batch-row order, each
  sequence's own vision state (`SequenceMedia`), or None for a text-only one.
  A request's media can therefore never be applied to another row.
- `BatchedVisionLM`, the model the generator is given: it embeds the tokens,
  swaps in each media row's precomputed prompt embeddings (vision features
  merged by mlx-vlm's own `get_input_embeddings`), builds per-row mrope
  positions (the prompt's 3-D positions while prefilling, then
  `cache offset + that row's rope delta`), and runs the language model.

Only the mrope families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL with deepstack) are
built and verified here; `supports_batching` says which model types those are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

# mlx-vlm model types whose language model takes explicit mrope position ids and
# whose embeddings come from `get_input_embeddings` (verified with tiny models).
BATCHED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


# Families whose embedding step (mlx-vlm's get_input_embeddings) takes the
# images or the videos of a request, not both.
ONE_MEDIA_KIND = ("qwen2_vl", "qwen2_5_vl")


def is_vision_config(config: dict[str, Any]) -> bool:
    """Whether a model folder's config.json describes a vision-language model
    that mlx-vlm can load."""
    import importlib.util

    if not config.get("vision_config"):
        return False
    model_type = str(config.get("model_type", "")).replace("-", "_")
    return importlib.util.find_spec(f"mlx_vlm.models.{model_type}") is not None


def supports_batching(model_type: str) -> bool:
    return model_type in BATCHED_FAMILIES


@dataclass
class SequenceMedia:
    """One sequence's vision state: its whole prompt's embeddings (vision
    features merged in), mrope positions and the position delta for what
    follows the prompt."""

    embeds: mx.array  # [prompt length, hidden]
    positions: mx.array  # [3, prompt length]
    delta: int  # position of token k after the prompt: prompt length + k + delta
    # Qwen3-VL deepstack: the prompt's visual-token mask (numpy, [prompt
    # length]) and, per decoder layer, the features added at those tokens.
    visual_mask: np.ndarray | None = None
    deepstack: list[mx.array] | None = None
    # Set once every prompt token but the last (always text) is in the KV cache.
    prefilled: bool = False

    @property
    def nbytes(self) -> int:
        n = self.embeds.nbytes + self.positions.nbytes
        return n + sum(d.nbytes for d in self.deepstack or [])


class MediaRows:
    """The cache entry that carries per-row vision state through the batch.
    It stores no tokens: positions derive from the KV caches' offsets, so
    trimming it is free and a text row's entry can sit in the prefix cache."""

    def __init__(self, rows: list[SequenceMedia | None]):
        self.rows = rows
        self._deltas: mx.array | None = None

    @property
    def has_media(self) -> bool:
        return any(r is not None for r in self.rows)

    def deltas(self) -> mx.array:
        """Each row's rope delta, [rows] (0 for text rows)."""
        if self._deltas is None or self._deltas.shape[0] != len(self.rows):
            self._deltas = mx.array([r.delta if r else 0 for r in self.rows], mx.int32)
        return self._deltas

    # -- what mlx-lm's batching calls on every cache entry --------------------

    @classmethod
    def merge(cls, caches: list[MediaRows]) -> MediaRows:
        return cls([r for c in caches for r in c.rows])

    def extend(self, other: MediaRows) -> None:
        self.rows = self.rows + other.rows
        self._deltas = None

    def filter(self, batch_indices) -> None:
        if isinstance(batch_indices, mx.array):
            batch_indices = batch_indices.tolist()
        self.rows = [self.rows[i] for i in batch_indices]
        self._deltas = None

    def extract(self, idx: int) -> MediaRows:
        return MediaRows([self.rows[idx]])

    def prepare(self, **kwargs) -> None:
        pass

    def finalize(self) -> None:
        pass

    @property
    def state(self) -> list:
        return []

    @state.setter
    def state(self, value) -> None:
        pass

    @property
    def meta_state(self) -> str:
        return ""

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return n

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return not self.rows

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r is not None)


class BatchedVisionLM(nn.Module):
    """The model mlx-lm's BatchGenerator drives for a vision-language model.
    Its cache is the language model's KV caches plus one `MediaRows`."""

    def __init__(self, vlm: nn.Module, model_type: str):
        super().__init__()
        self.vlm = vlm
        self.model_type = model_type
        self._lm = vlm.language_model
        self._deepstack = model_type == "qwen3_vl"
        cfg = vlm.config
        self.media_token_ids = {t for t in (getattr(cfg, "image_token_id", None),
                                            getattr(cfg, "video_token_id", None))
                                if t is not None}

    @property
    def layers(self):
        return self._lm.model.layers

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers] + [MediaRows([None])]

    # -- admission: one request's prompt and media -> SequenceMedia ------------

    def encode(self, prompt: list[int], media: list[dict[str, np.ndarray]]) -> SequenceMedia:
        """Run the vision encoder over a request's media (items in prompt
        order) and merge the features into its prompt's embeddings."""
        if prompt[-1] in self.media_token_ids:
            raise ValueError("the prompt must not end inside an image or video")
        kwargs = _model_inputs(media)
        input_ids = mx.array([prompt])
        pixel_values = kwargs.pop("pixel_values", None)
        features = self.vlm.get_input_embeddings(input_ids, pixel_values, **kwargs)
        embeds = features.inputs_embeds[0]
        positions = features.position_ids[:, 0, :]  # [3, L]
        delta = int(mx.array(features.rope_deltas).reshape(-1)[0].item())
        visual_mask = deepstack = None
        if self._deepstack and getattr(features, "deepstack_visual_embeds", None) is not None:
            visual_mask = np.array(features.visual_pos_masks[0])
            deepstack = list(features.deepstack_visual_embeds)
        seq = SequenceMedia(embeds, positions, delta, visual_mask, deepstack)
        mx.eval(seq.embeds, seq.positions, *(seq.deepstack or []))
        return seq

    def warm_up_request(self) -> tuple[list[int], list[dict[str, np.ndarray]]]:
        """The smallest image request the model takes (one merged patch), so
        that warm-up compiles the vision encoder's kernels too."""
        cfg, vc = self.vlm.config, self.vlm.config.vision_config
        merge = vc.spatial_merge_size
        channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", None) or 3
        patch = channels * vc.temporal_patch_size * vc.patch_size ** 2
        media = [{"pixel_values": np.zeros((merge * merge, patch), np.float32),
                  "image_grid_thw": np.array([[1, merge, merge]], np.int64)}]
        start = cfg.vision_start_token_id
        return [start, cfg.image_token_id, start], media

    def cache_for(self, prompt: list[int], media: list[dict[str, np.ndarray]]) -> list:
        """A fresh cache for one request, its media encoded into it."""
        return [KVCache() for _ in self.layers] + [MediaRows([self.encode(prompt, media)])]

    # -- the forward pass --------------------------------------------------------

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        kv, rows = cache[:-1], cache[-1]
        B, L = tokens.shape
        offsets = kv[0].offset  # an int (one sequence) or an array, one per row
        offsets = mx.array([offsets] * B) if isinstance(offsets, int) else offsets
        h = self._lm.model.embed_tokens(tokens)
        extra: dict[str, Any] = {}
        if any(seq is not None and not seq.prefilled for seq in rows.rows):
            # Some row is still inside its prompt: it takes its own slice of the
            # precomputed embeddings and positions (a host sync, prefill only).
            h, positions, extra = self._prefill_rows(tokens, h, offsets.tolist(), rows)
        else:
            # Text rows, and media rows past their prompt's last visual token:
            # positions continue from each row's own delta (0 for text).
            start = offsets + rows.deltas() if rows.has_media else offsets
            positions = mx.broadcast_to((start[:, None] + mx.arange(L))[None], (3, B, L))
        out = self._lm.model(tokens, inputs_embeds=h, cache=kv, position_ids=positions,
                             **extra)
        if self._lm.args.tie_word_embeddings:
            return self._lm.model.embed_tokens.as_linear(out)
        return self._lm.lm_head(out)

    def _prefill_rows(self, tokens: mx.array, h: mx.array, offsets: list[int],
                      rows: MediaRows) -> tuple[mx.array, mx.array, dict]:
        """Embeddings and positions of a prefill chunk in which some rows
        carry media: those rows take their slice of the precomputed prompt."""
        B, L = tokens.shape
        row_h, row_pos = [], []
        masks, deep_rows = [], []
        for i, (seq, start) in enumerate(zip(rows.rows, offsets)):
            text_pos = mx.broadcast_to(mx.arange(start, start + L)[None], (3, L))
            if seq is None:
                row_h.append(h[i])
                row_pos.append(text_pos)
                masks.append(np.zeros(L, bool))
                continue
            n = max(0, min(L, seq.embeds.shape[0] - start))  # chunk columns inside the prompt
            row_h.append(mx.concatenate([seq.embeds[start:start + n], h[i, n:]]))
            # Columns past the prompt are right padding: any position will do.
            row_pos.append(mx.concatenate([seq.positions[:, start:start + n],
                                           text_pos[:, n:] + seq.delta], axis=1))
            if start + n >= seq.embeds.shape[0] - 1:
                seq.prefilled = True
            mask = np.zeros(L, bool)
            if seq.visual_mask is not None:
                mask[:n] = seq.visual_mask[start:start + n]
                first = int(seq.visual_mask[:start].sum())
                deep_rows.append([d[first:first + int(mask.sum())] for d in seq.deepstack])
            masks.append(mask)
        extra: dict[str, Any] = {}
        if deep_rows and any(m.any() for m in masks):
            # mlx-vlm adds deepstack features row by row, taking them in order.
            n_layers = len(deep_rows[0])
            extra = {"visual_pos_masks": mx.array(np.stack(masks)),
                     "deepstack_visual_embeds": [
                         mx.concatenate([r[k] for r in deep_rows]) for k in range(n_layers)]}
        return mx.stack(row_h), mx.stack(row_pos, axis=1), extra


def _model_inputs(media: list[dict[str, np.ndarray]]) -> dict[str, mx.array]:
    """Items' tensors as the model's keyword arguments: tensors of the same
    name (pixel_values, image_grid_thw, ...) concatenated in prompt order, as
    the processor lays out a batch of several images."""
    by_name: dict[str, list[np.ndarray]] = {}
    for item in media:
        for name, value in item.items():
            by_name.setdefault(name, []).append(np.asarray(value))
    return {name: mx.array(np.concatenate(values)) for name, values in by_name.items()}


def load_vision_model(path: str) -> tuple[BatchedVisionLM, str]:
    """Load a vision-language model with mlx-vlm, wrapped for batching."""
    from mlx_vlm.utils import load_model

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    if not supports_batching(model_type):
        raise ValueError(f"vision-language model type {model_type!r} is not supported yet "
                         f"(supported: {', '.join(BATCHED_FAMILIES)})")
    vlm = load_model(Path(path))
    return BatchedVisionLM(vlm, model_type), model_type
