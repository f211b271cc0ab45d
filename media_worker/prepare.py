"""One media item, start to finish: bytes from its source, decoded, sampled,
preprocessed by the model's processor, and packed for the engine."""

import hashlib
import math
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from media_worker.errors import MediaError
from media_worker.fetch import FetchPolicy
from media_worker.images import decode_image
from media_worker.processor import Prepared, Preprocessor
from media_worker.sources import read_source
from media_worker.video import decode_video
from vllm_mlx.ipc.shared_tensors import free_segments, write_segment
from vllm_mlx.settings import MediaSettings
from vllm_mlx.v1 import media_pb2 as pb

_KINDS = {pb.MEDIA_KIND_IMAGE: "image", pb.MEDIA_KIND_VIDEO: "video"}
# Prepared items kept for resends of the same media (a chat resends its
# images every turn); bytes of tensors.
CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Result:
    """One prepared item, before it is packed into a reply (packing is one
    copy of the tensors; building it up in protobuf messages would be three)."""

    kind: int
    content_hash: str
    tensors: dict[str, np.ndarray]
    placeholder_token_id: int
    token_ids: list[int]
    frames: int
    width: int
    height: int
    prepare_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())


class PreparedCache:
    """A small LRU of finished items by content hash, bounded in bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Result, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Result | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: str, item: Result) -> None:
        size = item.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (item, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old


def video_options(item: pb.MediaSource, s: MediaSettings) -> tuple[float, int]:
    """The request's fps and frame cap, defaulted and capped by the server's."""
    fps = item.fps or s.default_video_fps
    if not math.isfinite(fps) or fps < 0:
        raise MediaError(f"video fps must be a positive number, not {item.fps}")
    max_frames = item.max_frames or s.default_video_max_frames
    return min(fps, s.max_video_fps), min(max_frames, s.max_video_frames)


def content_hash(data: bytes, kind: str, options: bytes, fingerprint: str) -> str:
    h = hashlib.sha256()
    for part in (b"vllm-mlx-media/1", fingerprint.encode(), kind.encode(), options):
        h.update(struct.pack("<Q", len(part)) + part)
    h.update(data)
    return h.hexdigest()


def pack(results: list[Result], shared_memory: bool = False) -> pb.PrepareResponse:
    """The reply, built in place: messages passed to a constructor or
    appended are deep-copied, which costs ~80 ms for a 1080p image's tensors.
    With `shared_memory`, each item's tensors go into a segment of its own,
    which the caller then owns."""
    reply = pb.PrepareResponse()
    try:
        for r in results:
            item = reply.items.add()
            item.kind = r.kind
            item.content_hash = r.content_hash
            item.placeholder_token_id = r.placeholder_token_id
            item.num_placeholder_tokens = len(r.token_ids)
            item.token_ids.extend(r.token_ids)
            item.frames, item.width, item.height = r.frames, r.width, r.height
            item.prepare_seconds = r.prepare_seconds
            if shared_memory:
                item.shm_name, layout = write_segment(r.tensors)
                for name, dtype, shape, offset in layout:
                    t = item.tensors.add()
                    t.name, t.dtype, t.offset = name, np.dtype(dtype).name, offset
                    t.shape.extend(shape)
                continue
            for name, a in r.tensors.items():
                t = item.tensors.add()
                t.name, t.dtype = name, a.dtype.name
                t.shape.extend(a.shape)
                t.data = a.tobytes()
    except BaseException:
        free_segments(reply)
        raise
    return reply


def _preprocess(fn, *args) -> Prepared:
    try:
        return fn(*args)
    except MediaError:
        raise
    except ValueError as e:  # e.g. an aspect ratio the model's resizer refuses
        raise MediaError(f"the model's processor cannot take it: {e}") from None


def prepare_item(item: pb.MediaSource, settings: MediaSettings, pre: Preprocessor,
                 cache: PreparedCache | None = None) -> Result:
    """Everything for one item; MediaError says why it was refused."""
    start = time.perf_counter()
    kind = _KINDS.get(item.kind)
    if kind is None:
        raise MediaError("kind must be image or video")
    source = item.WhichOneof("source")
    if source is None:
        raise MediaError("no url or path given")
    options = b""
    if kind == "video":
        fps, max_frames = video_options(item, settings)
        options = struct.pack("<dI", fps, max_frames)
    policy = FetchPolicy(settings.allow_private_media_urls, settings.allowed_media_domains,
                         settings.max_media_bytes, settings.fetch_timeout_s,
                         settings.max_redirects)
    data = read_source(item.url if source == "url" else None,
                       item.path if source == "path" else None,
                       kind, policy, settings.allowed_local_media_paths)
    key = content_hash(data, kind, options, pre.fingerprint)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return replace(cached, prepare_seconds=time.perf_counter() - start)
    if kind == "image":
        img = decode_image(data, settings.max_image_pixels)
        prepared = _preprocess(pre.image, img)
        frames, (width, height) = 1, img.size
    else:
        video = decode_video(data, fps, max_frames, settings.max_video_seconds,
                             settings.max_image_pixels)
        prepared = _preprocess(pre.video, video.frames)
        frames, width, height = len(video.frames), video.width, video.height
    out = Result(item.kind, key, prepared.tensors, prepared.placeholder_token_id,
                 prepared.token_ids, frames, width, height)
    if cache is not None:
        cache.put(key, out)
    return replace(out, prepare_seconds=time.perf_counter() - start)
