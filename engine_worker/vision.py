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
  merged by mlx-vlm's own `get_input_embeddings`) and runs mlx-vlm's language
  model on them. The mrope families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL with
  deepstack) also get per-row positions: the prompt's 3-D positions while
  prefilling, then `cache offset + that row's rope delta`. The others take
  their positions from the KV cache's offsets, as text models do.

The encoder's thread also runs a media request's prompt pass, from the
embeddings it made, into a cache of the request's own (`Prefill`), so the
batch takes the request in with all of its prompt but the last token already
in its KV. A family whose requests cannot share a batch (`Wiring.solo`) still
runs: the engine takes its requests one at a time (loop.py says so in its
log), and their prompts, as a prefix LM's, are passed by the loop.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

# Families whose language model takes explicit mrope position ids (Qwen).
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# How often a paced encoder looks again whether it still is (`pace`).
PACE_CHECK_S = 0.1


@dataclass(frozen=True)
class CopiedInPieces:
    """A large tensor copied into MLX (`model_inputs`), not yet joined: the
    join is an operation, and runs on the stream of the thread that makes
    it, which must be the one that evaluates it (the encoder's)."""

    pieces: tuple[mx.array, ...]
    shape: tuple[int, ...]

    def join(self) -> mx.array:
        return mx.concatenate(self.pieces).reshape(self.shape)


@dataclass
class Prefill:
    """A prompt pass for the encoder's thread to run once it has encoded a
    request's media: from `cache` (a cached prefix's private copy, evaluated;
    None: from the start), which holds the prompt's first `tokens`, up to the
    prompt's last token, `chunk` tokens a slice."""

    cache: list | None
    tokens: int
    chunk: int


@dataclass
class Prefilled:
    """A request's cache once the encoder's thread has run its prompt pass:
    it holds all of the prompt but the last token (`tokens` of them)."""

    cache: list
    tokens: int


# The model's inputs made of a request's media items (`model_inputs`).
Inputs = dict[str, mx.array | CopiedInPieces]
# A request's media: its items as prepared, or their inputs.
Media = list[dict[str, np.ndarray]] | Inputs


@dataclass(frozen=True)
class Wiring:
    """How a family's items become the arguments of mlx-vlm's get_input_embeddings,
    and how its requests may run. Items arrive one processor call each; a request's
    tensors of one name are joined as the processor joins a batch of images."""

    # Tensors that hold one request's images along axis 1 (axis 0 is the prompt
    # batch); the others are joined along axis 0.
    per_sample: frozenset[str] = frozenset()
    # A [1, prompt length] mask of the prompt's image tokens, by this name.
    image_mask: str | None = None
    # Why its requests cannot share a batch; "": they can.
    solo: str = ""
    # The whole prompt attends both ways (a prefix LM): prefilled in one piece.
    prefix_lm: bool = False


_IDEFICS = Wiring(per_sample=frozenset({"pixel_values", "pixel_attention_mask"}))
WIRING: dict[str, Wiring] = {
    **{family: Wiring() for family in MROPE_FAMILIES},
    "llava": Wiring(),
    "llava_next": Wiring(),
    "llava_onevision": Wiring(),
    "idefics2": _IDEFICS,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    # mlx-vlm leaves PaliGemma's attention unmasked over the prompt (a prefix LM):
    # with rows of other lengths beside it, padding would be attended too.
    "paligemma": Wiring(prefix_lm=True,
                        solo="its prompt attends both ways, so its rows cannot be padded"),
    "gemma3": Wiring(),
    "pixtral": Wiring(),
    "mistral3": Wiring(),
    "molmo": Wiring(),
    "deepseek_vl_v2": Wiring(per_sample=frozenset({"pixel_values", "images_spatial_crop"}),
                             image_mask="images_seq_mask"),
}


def is_vision_config(config: dict[str, Any]) -> bool:
    """Whether a model folder's config.json describes a vision-language model
    that mlx-vlm can load."""
    import importlib.util

    if not config.get("vision_config"):
        return False
    model_type = str(config.get("model_type", "")).replace("-", "_")
    return importlib.util.find_spec(f"mlx_vlm.models.{model_type}") is not None


@dataclass
class SequenceMedia:
    """One sequence's vision state: its whole prompt's embeddings (vision
    features merged in) and, for mrope families, its positions and the position
    delta for what follows the prompt."""

    embeds: mx.array  # [prompt length, hidden]
    positions: mx.array | None = None  # [3, prompt length]
    delta: int = 0  # position of token k after the prompt: prompt length + k + delta
    # Qwen3-VL deepstack: the prompt's visual-token mask (numpy, [prompt
    # length]) and, per decoder layer, the features added at those tokens.
    visual_mask: np.ndarray | None = None
    deepstack: list[mx.array] | None = None
    # Set once every prompt token but the last (always text) is in the KV cache.
    prefilled: bool = False

    @property
    def arrays(self) -> list[mx.array]:
        return [self.embeds, *([] if self.positions is None else [self.positions]),
                *(self.deepstack or [])]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def for_prefix_cache(self) -> SequenceMedia:
        """What a prefix-cache entry keeps of it: the positions alone (a few
        bytes a token, against the embeddings' thousands), from which `after`
        finds the rope delta of any prefix."""
        return self._prefilled(self.positions, self.delta)

    def after(self, n: int) -> SequenceMedia | None:
        """The state of a row whose first `n` tokens, all its media among
        them, are in its KV: what follows is text, placed at its cache offset
        plus the rope delta the media left (None: no delta, as a text row)."""
        if self.positions is None:
            return None
        # Past the prompt (or for a row that was itself resumed: it keeps no
        # positions), the delta is the one every later token takes.
        delta = (self.delta if n >= self.positions.shape[1]
                 else int(self.positions[:, :n].max().item()) + 1 - n)
        return self._prefilled(mx.zeros((3, 0), self.positions.dtype), delta)

    def _prefilled(self, positions: mx.array | None, delta: int) -> SequenceMedia:
        """A row whose prompt is all in its KV: no embeddings left to feed."""
        return SequenceMedia(mx.zeros((0, self.embeds.shape[1]), self.embeds.dtype),
                             positions, delta, prefilled=True)


def for_prefix_cache(cache: list) -> list:
    """A request's cache as the prefix cache keeps it (its media rows
    reduced to `SequenceMedia.for_prefix_cache`)."""
    if not cache or not isinstance(cache[-1], MediaRows):
        return cache
    return [*cache[:-1], MediaRows([r and r.for_prefix_cache() for r in cache[-1].rows])]


def resumed(cache: list, seq: SequenceMedia | None) -> list:
    """A prefix-cache copy (`for_prefix_cache`) for a request whose own
    vision state is `seq` (None: a text request)."""
    if not cache or not isinstance(cache[-1], MediaRows):
        return cache
    return [*cache[:-1], MediaRows([seq])]


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
        self.wiring = WIRING[model_type]
        self._lm = vlm.language_model
        self._mrope = model_type in MROPE_FAMILIES
        self._deepstack = model_type == "qwen3_vl"
        self._embed = _token_embedding(self._lm)
        self._cache_kinds = _cache_kinds(self._lm)
        # The encoder's own thread, so MLX gives it a stream of its own (one per
        # thread): mlx-vlm's graph building (milliseconds of Python), its small
        # reads (grid sizes, the rope delta) and the encoder's kernels wait for
        # nothing the decode loop queued, and the loop never waits for them.
        self._encoder = _EncoderThread()
        # While text rows decode, the loop lets the encoder run a slice a
        # step (`pace`): its slices back to back slowed every step on a GPU.
        self._turn = threading.Event()
        self._paced = False
        cfg = vlm.config
        self.media_token_ids = {getattr(cfg, name) for name in (
            "image_token_id", "image_token_index", "video_token_id", "video_token_index")
            if isinstance(getattr(cfg, name, None), int)}

    @property
    def layers(self):
        return self._lm.layers

    @property
    def batchable(self) -> bool:
        return not self.wiring.solo

    @property
    def prefix_lm(self) -> bool:
        return self.wiring.prefix_lm

    def make_cache(self) -> list:
        return [make() for make in self._cache_kinds] + [MediaRows([None])]

    # -- admission: one request's prompt and media -> SequenceMedia ------------

    def encode(self, prompt: list[int],
               media: Media) -> SequenceMedia:
        """Run the vision encoder over a request's media (items in prompt
        order) and merge the features into its prompt's embeddings, while
        the caller waits."""
        self.pace(False)
        return self.start_encoding(prompt, media).result()

    def media_inputs(self, media: list[dict[str, np.ndarray]]) -> Inputs:
        """A request's items as the model's arguments (`model_inputs`): the
        copy of their tensors into MLX arrays, which `start_encoding` takes
        instead of the items, so that the engine can make it off its loop's
        thread (a 1080p image's are 18 MB)."""
        return model_inputs(media, self.wiring.per_sample)

    def start_encoding(self, prompt: list[int], media: Media,
                       prefill: Prefill | None = None) -> Encoding:
        """`encode` on the encoder's thread: the SequenceMedia, evaluated,
        once it is done. `media`: the items, or their `media_inputs`. With
        `prefill`, the thread runs the prompt pass too, and the result is
        the request's `Prefilled` cache: the decode loop then runs no pass
        for it, where each pass of an image's prompt held every text
        stream's next token for its length (docs/benchmarks.md).
        Requests are encoded one at a time, in order."""
        if prompt[-1] in self.media_token_ids:
            raise ValueError("the prompt must not end inside an image or video")
        return self._encoder.submit(self._encode_here, prompt, media, prefill)

    def _encode_here(self, job: Encoding, prompt: list[int], media: Media,
                     prefill: Prefill | None) -> SequenceMedia | Prefilled:
        slices: list[mx.array] = []
        with _encoder_in_slices(slices):
            seq = self._build(prompt, media)
        for piece in [*slices, seq.arrays]:
            self._evaluate_slice(job, piece)
        if prefill is None:
            return seq
        cache = resumed(prefill.cache, seq) if prefill.cache else self.cache_with(seq)
        end = len(prompt) - 1  # the last token is the first decode step's input
        for start in range(prefill.tokens, end, prefill.chunk):
            self(mx.array([prompt[start:min(end, start + prefill.chunk)]]), cache)
            self._evaluate_slice(job, [c.state for c in cache[:-1]])
        # Decoding needs the rope delta alone: the prompt's embeddings go.
        cache[-1] = MediaRows([seq.for_prefix_cache()])
        return Prefilled(cache, end)

    def _evaluate_slice(self, job: Encoding, piece) -> None:
        """Evaluate one slice of a job, when its turn comes (`pace`)."""
        while self._paced and not job.stopping and not self._turn.wait(PACE_CHECK_S):
            pass
        if job.stopping:
            raise EncodingStopped
        self._turn.clear()
        mx.eval(piece)

    def close(self) -> None:
        """End the encoder's thread (after what it was given)."""
        self._encoder.close()

    def pace(self, paced: bool) -> None:
        """The loop's word, each step while media is being encoded: with
        `paced` (text rows decode) the encoder may run one more slice; without,
        its slices run back to back."""
        self._paced = paced
        self._turn.set()

    def _build(self, prompt: list[int],
               media: Media) -> SequenceMedia:
        """The request's SequenceMedia, not yet evaluated: mlx-vlm's code only
        builds the encoder's graph (it evaluates nothing that depends on the
        pixels)."""
        inputs = media if isinstance(media, dict) else self.media_inputs(media)
        kwargs = {name: value.join() if isinstance(value, CopiedInPieces) else value
                  for name, value in inputs.items()}
        input_ids = mx.array([prompt])
        if self.wiring.image_mask and media:
            kwargs[self.wiring.image_mask] = input_ids == self.vlm.config.image_token_index
        pixel_values = kwargs.pop("pixel_values", None)
        features = self.vlm.get_input_embeddings(
            input_ids, pixel_values, mask=mx.ones(input_ids.shape, mx.int32), **kwargs)
        embeds = features.inputs_embeds[0]
        if embeds.shape[0] != len(prompt):
            raise ValueError(f"the model merged its media into {embeds.shape[0]} positions "
                             f"for a prompt of {len(prompt)} tokens")
        if not self._mrope:
            return SequenceMedia(embeds)
        positions = features.position_ids[:, 0, :]  # [3, L]
        visual_mask = deepstack = None
        if self._deepstack and getattr(features, "deepstack_visual_embeds", None) is not None:
            visual_mask = np.array(features.visual_pos_masks[0])
            deepstack = list(features.deepstack_visual_embeds)
        delta = int(mx.array(features.rope_deltas).reshape(-1)[0].item())
        return SequenceMedia(embeds, positions, delta, visual_mask, deepstack)

    def warm_up_request(self) -> tuple[list[int], list[dict[str, np.ndarray]]] | None:
        """The smallest image request the model takes (one merged patch), so
        that warm-up compiles the vision encoder's kernels too; None where its
        tensors cannot be made without the family's processor."""
        if not self._mrope:
            return None
        cfg, vc = self.vlm.config, self.vlm.config.vision_config
        merge = vc.spatial_merge_size
        channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", None) or 3
        patch = channels * vc.temporal_patch_size * vc.patch_size ** 2
        media = [{"pixel_values": np.zeros((merge * merge, patch), np.float32),
                  "image_grid_thw": np.array([[1, merge, merge]], np.int64)}]
        start = cfg.vision_start_token_id
        return [start, cfg.image_token_id, start], media

    def cache_for(self, prompt: list[int],
                  media: Media) -> list:
        """A fresh cache for one request, its media encoded into it."""
        return self.cache_with(self.encode(prompt, media))

    def cache_with(self, seq: SequenceMedia) -> list:
        """A fresh cache for one request whose media is encoded (`seq`)."""
        return [make() for make in self._cache_kinds] + [MediaRows([seq])]

    # -- the forward pass --------------------------------------------------------

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        kv, rows = cache[:-1], cache[-1]
        B, L = tokens.shape
        offsets = _offsets(kv)  # an int (one sequence) or an array, one per row
        offsets = mx.array([offsets] * B) if isinstance(offsets, int) else offsets
        h = self._embed(tokens)
        prefilling = any(seq is not None and not seq.prefilled for seq in rows.rows)
        if not self._mrope:
            if prefilling and self.wiring.prefix_lm:
                return self._prefix_lm_prompt(tokens, kv, rows, offsets.tolist())
            if prefilling:
                h = mx.stack(self._prompt_rows(h, offsets.tolist(), rows))
            return _logits(self._lm(tokens, inputs_embeds=h, cache=kv))
        extra: dict[str, Any] = {}
        if prefilling:
            # Some row is still inside its prompt: it takes its own slice of the
            # precomputed embeddings and positions (a host sync, prefill only).
            h, positions, extra = self._mrope_prompt_rows(tokens, h, offsets.tolist(), rows)
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

    def _prompt_rows(self, h: mx.array, offsets: list[int], rows: MediaRows) -> list[mx.array]:
        """Each row's embeddings for this chunk: a media row takes its slice of
        the precomputed prompt; columns past the prompt are right padding."""
        L = h.shape[1]
        out = []
        for i, (seq, start) in enumerate(zip(rows.rows, offsets)):
            if seq is None:
                out.append(h[i])
                continue
            n = max(0, min(L, seq.embeds.shape[0] - start))  # chunk columns inside the prompt
            out.append(mx.concatenate([seq.embeds[start:start + n], h[i, n:]]))
            if start + n >= seq.embeds.shape[0] - 1:
                seq.prefilled = True
        return out

    def _prefix_lm_prompt(self, tokens: mx.array, kv: list, rows: MediaRows,
                          offsets: list[int]) -> mx.array:
        """A prefix LM's prompt (all of it but the last token, which the generator
        feeds next as its first decode input) in one pass over the whole prompt,
        as mlx-vlm runs it: every prompt token sees every other, the last one
        included, whose keys and values are held back from the cache."""
        seq = rows.rows[0]
        if offsets != [0] or tokens.shape[1] != len(seq.embeds) - 1:
            raise ValueError("a prefix-LM prompt must be prefilled alone and in one piece")
        seq.prefilled = True
        out = self._lm(tokens, inputs_embeds=seq.embeds[None],
                       cache=[_HoldBackLast(c) for c in kv])
        return _logits(out)[:, :-1]

    def _mrope_prompt_rows(self, tokens: mx.array, h: mx.array, offsets: list[int],
                           rows: MediaRows) -> tuple[mx.array, mx.array, dict]:
        """Embeddings, mrope positions and deepstack features of a prefill chunk
        in which some rows carry media."""
        B, L = tokens.shape
        row_pos, masks, deep_rows = [], [], []
        for seq, start in zip(rows.rows, offsets):
            text_pos = mx.broadcast_to(mx.arange(start, start + L)[None], (3, L))
            if seq is None:
                row_pos.append(text_pos)
                masks.append(np.zeros(L, bool))
                continue
            n = max(0, min(L, seq.embeds.shape[0] - start))
            # Columns past the prompt are right padding: any position will do.
            row_pos.append(mx.concatenate([seq.positions[:, start:start + n],
                                           text_pos[:, n:] + seq.delta], axis=1))
            mask = np.zeros(L, bool)
            if seq.visual_mask is not None:
                mask[:n] = seq.visual_mask[start:start + n]
                first = int(seq.visual_mask[:start].sum())
                deep_rows.append([d[first:first + int(mask.sum())] for d in seq.deepstack])
            masks.append(mask)
        h = mx.stack(self._prompt_rows(h, offsets, rows))
        extra: dict[str, Any] = {}
        if deep_rows and any(m.any() for m in masks):
            # mlx-vlm adds deepstack features row by row, taking them in order.
            n_layers = len(deep_rows[0])
            extra = {"visual_pos_masks": mx.array(np.stack(masks)),
                     "deepstack_visual_embeds": [
                         mx.concatenate([r[k] for r in deep_rows]) for k in range(n_layers)]}
        return h, mx.stack(row_pos, axis=1), extra


class EncodingStopped(Exception):
    """An encoding ended before its last slice (`Encoding.stop`)."""


class Encoding(Future):
    """One request's encoding on the encoder's thread. `stop`, for a request
    that ended (aborted, failed) before its media was encoded: the encoder
    drops it before its next slice, rather than spend the device's time
    beside other requests' steps on features no one will read."""

    def __init__(self):
        super().__init__()
        self.stopping = False

    def stop(self) -> None:
        if not self.cancel():  # running: ends with EncodingStopped
            self.stopping = True


class _EncoderThread:
    """One daemon thread that runs what it is given in order. Not a
    ThreadPoolExecutor: its worker is joined as the interpreter exits, and
    a thread that ends then crashes in MLX's per-thread clean-up now and
    then ("terminate called without an active exception"). This one ends
    only when closed, clearing its MLX streams first, as MLX asks; else it
    dies with the process."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable, *args) -> Encoding:
        """fn(job, *args) on the thread, its result or error in `job`."""
        job = Encoding()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vision-encoder",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((job, fn, args))
        return job

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        try:
            while (item := self._jobs.get()) is not None:
                job, fn, args = item
                if job.set_running_or_notify_cancel():
                    try:
                        job.set_result(fn(job, *args))
                    except BaseException as e:
                        job.set_exception(e)
        finally:
            mx.clear_streams()


# Multiply-adds of attention per slice: about 2 ms on an H100 for the tiny
# Qwen2-VL; a CPU takes longer over one, but there the encoder's stream has
# a thread of its own, which a long piece does not hold up.
SLICE_MACS = 2**26


@contextmanager
def _encoder_in_slices(slices: list[mx.array]):
    """While mlx-vlm builds a vision encoder's graph on this thread, split its
    two largest single operations into exact pieces, and note the pieces in
    `slices`: each attention without a mask, by query rows (every query row
    attends to all keys on its own), and each 3-D convolution, by batch rows
    (the Qwen-VL patch embedding takes every patch as a row of its own). A
    1080p image's attention over 3,772 patches is most of the encoder's time:
    in pieces, a GPU runs the decode loop's kernels between them instead of
    after the whole. A family that evaluates its features while building
    (Qwen3-VL's deepstack) leaves nothing to slice: what it built is done.
    Other threads (the decode loop) calling these functions meanwhile get
    them whole."""
    whole, whole_conv3d, evaluate = mx.fast.scaled_dot_product_attention, mx.conv3d, mx.eval
    here = threading.get_ident()

    def evaluate_all(*arrays):
        if threading.get_ident() == here:
            slices.clear()
        return evaluate(*arrays)

    def in_pieces(rows: int, row_macs: int, axis: int, piece) -> mx.array:
        step = max(1, SLICE_MACS // max(1, row_macs))
        parts = [piece(i, min(rows, i + step)) for i in range(0, max(rows, 1), step)]
        slices.extend(parts)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)

    def sliced(q, k, v, *, scale, mask=None, **kwargs):
        if mask is not None or kwargs or q.ndim != 4 or threading.get_ident() != here:
            return whole(q, k, v, scale=scale, mask=mask, **kwargs)
        batch, heads, rows, dim = q.shape
        return in_pieces(rows, batch * heads * k.shape[2] * dim, 2,
                         lambda i, j: whole(q[:, :, i:j], k, v, scale=scale))

    def conv3d_sliced(x, weight, *args, **kwargs):
        if threading.get_ident() != here:
            return whole_conv3d(x, weight, *args, **kwargs)
        # Multiply-adds per row: the weight's once per output position
        # (as many as input positions, over the stride's volume).
        per_row = weight.size * max(1, math.prod(x.shape[1:-1]) // math.prod(weight.shape[1:-1]))
        return in_pieces(x.shape[0], per_row, 0,
                         lambda i, j: whole_conv3d(x[i:j], weight, *args, **kwargs))

    mx.fast.scaled_dot_product_attention, mx.conv3d, mx.eval = sliced, conv3d_sliced, evaluate_all
    try:
        yield
    finally:
        mx.fast.scaled_dot_product_attention, mx.conv3d, mx.eval = whole, whole_conv3d, evaluate


class _HoldBackLast:
    """A KV cache seen through a pass over the whole prompt: it keeps all but the
    last position's keys and values, and gives the pass all of them."""

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        kept_k, kept_v = self._cache.update_and_fetch(keys[..., :-1, :], values[..., :-1, :])
        return (mx.concatenate([kept_k, keys[..., -1:, :]], axis=-2),
                mx.concatenate([kept_v, values[..., -1:, :]], axis=-2))


def model_inputs(media: list[dict[str, np.ndarray]],
                 per_sample: frozenset[str] = frozenset()) -> Inputs:
    """Items' tensors as the model's keyword arguments: tensors of the same
    name (pixel_values, image_grid_thw, ...) joined in prompt order, as the
    processor joins a batch of images: along axis 1 for `per_sample` names,
    else axis 0, padding other axes with zeros at their end to the largest."""
    by_name: dict[str, list[np.ndarray]] = {}
    for item in media:
        for name, value in item.items():
            by_name.setdefault(name, []).append(np.asarray(value))
    return {name: _copied(_join(values, 1 if name in per_sample else 0))
            for name, values in by_name.items()}


# A copy into MLX holds the interpreter throughout (a 1080p image's 18 MB:
# about 1 ms on the 2-core CPU); in pieces of this size, the loop's thread
# can take it back between them.
COPY_PIECE_BYTES = 1 << 20


def _copied(a: np.ndarray) -> mx.array | CopiedInPieces:
    if a.nbytes <= COPY_PIECE_BYTES:
        return mx.array(a)
    flat = np.ascontiguousarray(a).reshape(-1)
    step = max(1, COPY_PIECE_BYTES // a.itemsize)
    return CopiedInPieces(tuple(mx.array(flat[i:i + step]) for i in range(0, flat.size, step)),
                          a.shape)


def _join(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    largest = np.max([a.shape for a in arrays], axis=0)
    return np.concatenate([
        np.pad(a, [(0, 0) if d == axis else (0, int(n) - a.shape[d])
                   for d, n in enumerate(largest)]) for a in arrays], axis=axis)


def _offsets(kv: list):
    """Tokens each row holds, from a cache that keeps them all (a sliding
    window's offset stops counting at its size)."""
    full = next((c for c in kv if "Rotating" not in type(c).__name__), kv[0])
    return full.offset


def _logits(out) -> mx.array:
    return getattr(out, "logits", out)


def _token_embedding(lm: nn.Module) -> nn.Module:
    """The language model's token embedding layer, wherever its family keeps it."""
    for path in (("model", "embed_tokens"), ("embed_tokens",), ("model", "wte")):
        module = lm
        for name in path:
            module = getattr(module, name, None)
        if module is not None:
            return module
    raise ValueError(f"no token embedding found in {type(lm).__name__}")


def _cache_kinds(lm: nn.Module) -> list:
    """Makers of mlx-lm's own caches, one per layer, of the kinds the language
    model's own make_cache asks for (mlx-lm's batch classes know only them)."""
    if not hasattr(lm, "make_cache"):
        return [KVCache for _ in lm.layers]
    kinds = []
    for c in lm.make_cache():
        kind = type(c).__name__
        if kind == "KVCache":
            kinds.append(KVCache)
        elif kind == "RotatingKVCache":
            kinds.append(lambda size=c.max_size, keep=c.keep: RotatingKVCache(size, keep))
        else:
            raise ValueError(f"this model's {kind} layers are not supported yet")
    return kinds


def load_vision_model(path: str) -> tuple[BatchedVisionLM, str]:
    """Load a vision-language model with mlx-vlm, wrapped for batching."""
    from mlx_vlm.utils import load_model

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    if model_type not in WIRING:
        raise ValueError(f"vision-language model type {model_type!r} is not supported yet "
                         f"(supported: {', '.join(WIRING)})")
    vlm = load_model(Path(path))
    _evaluate_all_arrays(vlm)
    return BatchedVisionLM(vlm, model_type), model_type


def _evaluate_all_arrays(model: nn.Module) -> None:
    """Evaluate every array the model holds, its parameters and the rest (a
    rope's frequencies kept on a plain object, as Pixtral's vision tower
    does): MLX lets the encoder's thread use another thread's array only
    once it is evaluated."""
    arrays, seen, todo = [], set(), [model]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, mx.array):
            arrays.append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        if type(obj).__module__.startswith(("mlx.", "mlx_vlm.")) and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    mx.eval(arrays)
