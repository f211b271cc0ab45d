"""The prefix cache on disk (`--prefix-cache-dir`), so that a restarted
engine, or one the supervisor restarted after a crash, does not start cold.

The folder mirrors the cache: each entry is one file in mlx-lm's prompt-cache
format (safetensors: the KV per layer, with the entry's tokens, the model's
identity and a checksum in its metadata), written once the engine is quiet
and deleted when the entry leaves the cache, so the folder stays under the
cache's byte budget. A file's modification time is when its entry was last
used: a new engine takes the most recently used first, up to its budget, and
deletes the rest of its own. A file written for another model, or one that
does not read back whole (a torn write, a flipped bit), is never loaded: it
is left alone, with a warning.
"""

import hashlib
import json
import logging
import os
import zlib
from array import array
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

log = logging.getLogger("engine")

FORMAT = "vllm-mlx-prefix-cache/1"
SUFFIX = ".safetensors"
# The model's identity reads this much of each weight tensor, at its start and end.
_SAMPLE_BYTES = 4096


def can_store(model) -> bool:
    """Only plain KV caches are written: a vision model's cache carries
    per-row media state that mlx-lm's format does not hold."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


def model_identity(folder: Path) -> str:
    """A fingerprint of the model's weights that needs no full read: its
    config, each safetensors file's header (every tensor's name, dtype,
    shape and place), and the first and last bytes of every tensor. Two
    models differ in it unless some tensor changed only in its middle."""
    h = hashlib.sha256(FORMAT.encode())
    h.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(size)
            h.update(path.name.encode() + header)
            tensors = json.loads(header)
            tensors.pop("__metadata__", None)
            for _, tensor in sorted(tensors.items()):
                start, end = tensor["data_offsets"]
                for at in sorted({start, max(start, end - _SAMPLE_BYTES)}):
                    f.seek(8 + size + at)
                    h.update(f.read(min(_SAMPLE_BYTES, end - at)))
    return h.hexdigest()


def _checksum(cache: list[KVCache]) -> str:
    crc = 0
    for c in cache:
        crc = zlib.crc32(memoryview(c.values), zlib.crc32(memoryview(c.keys), crc))
    return f"{crc:08x}"


class PrefixStore:
    def __init__(self, folder: Path, identity: str, kv_per_token: int):
        """`kv_per_token`: the KV bytes of one token, which a file's arrays
        must add up to."""
        self.folder, self.identity, self.kv_per_token = folder, identity, kv_per_token
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, tokens: list[int], cache: list[KVCache]) -> str:
        """Write an entry (its KV: one cache per layer); its file's name."""
        name = hashlib.sha256(array("q", tokens).tobytes()).hexdigest()[:32] + SUFFIX
        layers = []
        for c in cache:
            kv = KVCache()
            kv.keys = mx.contiguous(c.keys[..., :c.offset, :])
            kv.values = mx.contiguous(c.values[..., :c.offset, :])
            kv.offset = c.offset
            layers.append(kv)
        mx.eval([(kv.keys, kv.values) for kv in layers])
        metadata = {"format": FORMAT, "model": self.identity, "tokens": json.dumps(tokens),
                    "checksum": _checksum(layers)}
        part = self.folder / f".part-{name}"  # renamed into place once whole
        save_prompt_cache(str(part), layers, metadata)
        os.replace(part, self.folder / name)
        return name

    def touch(self, name: str) -> None:
        try:
            os.utime(self.folder / name)
        except OSError:
            pass

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def load(self, max_bytes: int) -> list[tuple[list[int], list[KVCache], str]]:
        """This model's entries, (tokens, cache, file name), the most recently
        used that fit `max_bytes` bytes, least recently used first. Its files
        that do not fit are deleted."""
        for part in self.folder.glob(f".part-*{SUFFIX}"):  # a write cut short
            part.unlink(missing_ok=True)
        files = [p for p in self.folder.glob(f"*{SUFFIX}") if not p.name.startswith(".")]
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        kept, total = [], 0
        ignored: dict[str, list[str]] = {}
        for path in files:
            try:
                entry = self._read(path)
            except Exception as e:  # whatever a damaged file makes the reader raise
                ignored.setdefault(f"unreadable ({e})", []).append(path.name)
                continue
            if isinstance(entry, str):
                ignored.setdefault(entry, []).append(path.name)
                continue
            nbytes = len(entry[0]) * self.kv_per_token
            if total + nbytes > max_bytes:
                path.unlink(missing_ok=True)
                continue
            total += nbytes
            kept.append((*entry, path.name))
        for why, names in ignored.items():
            log.warning("prefix cache: ignoring %d file(s) in %s, %s: %s", len(names),
                        self.folder, why, ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""))
        if kept:
            log.info("prefix cache: %d entries (%.1f MiB) restored from %s", len(kept),
                     total / 2**20, self.folder)
        return kept[::-1]

    def _read(self, path: Path) -> tuple[list[int], list[KVCache]] | str:
        """The entry in `path`, or why it is not one of this model's."""
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
        if metadata.get("format") != FORMAT:
            return "not written by vllm-mlx's prefix cache"
        if metadata.get("model") != self.identity:
            return "written for another model"
        tokens = json.loads(metadata["tokens"])
        if not (all(type(c) is KVCache and c.offset == len(tokens) for c in cache)
                and sum(c.nbytes for c in cache) == len(tokens) * self.kv_per_token
                and _checksum(cache) == metadata.get("checksum")):
            return "damaged (its arrays do not match its tokens and checksum)"
        return tokens, cache
