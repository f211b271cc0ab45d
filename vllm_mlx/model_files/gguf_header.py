"""Read the tensor table of a GGUF file without loading its data.

The importer has to know every tensor's type before it calls `mx.load`:
`mx.load` fails on some types with an unhelpful message, silently drops others
and mis-decodes at least one (Q4_K), so the types are checked first. The
`gguf` package's reader can do this too, but it builds a numpy view for each
of the ~100k vocabulary strings and takes seconds; skipping them takes
milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: fixed sizes, and the two variable-length ones.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING = 8
_ARRAY = 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    # Numpy/MLX order (outermost first): the reverse of GGUF's `ne` order.
    shape: tuple[int, ...]
    # Absolute position of the tensor's bytes in the file.
    offset: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type_id)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    architecture: str | None
    # >1 for one shard of a model split by llama-gguf-split.
    split_count: int
    tensors: dict[str, TensorInfo]


def ggml_type_name(type_id: int) -> str:
    """ "Q4_K" for 12, and so on; the table lives in the `gguf` package."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header") from e
        self.pos += struct.calcsize(fmt)
        return values

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def string(self) -> str:
        n = self.u64()
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()  # (not `pos += u64()`: that reads pos before u64 moves it)
        self.pos += n

    def value(self, vtype: int):
        """Read a scalar or string value; skip arrays (returns None for them)."""
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type == _STRING:
                for _ in range(count):
                    self.skip_string()
            elif item_type in _SCALAR_SIZES:
                self.pos += _SCALAR_SIZES[item_type] * count
            else:
                raise GGUFFormatError(f"{self.path}: unsupported GGUF array item type {item_type}")
            return None
        if vtype not in _SCALAR_SIZES:
            raise GGUFFormatError(f"{self.path}: unsupported GGUF value type {vtype}")
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR_SIZES[vtype]]
        return self.unpack(fmt)[0]


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The architecture and tensor table (name, type, shape, offset) of a GGUF file."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if buf[:4] != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.u32()
        if version not in (2, 3):
            # A big-endian file reads as a huge version number.
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.u64(), cur.u64()

        architecture = None
        split_count = 1
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(cur.u32())
            if key == "general.architecture":
                architecture = value
            elif key == "general.alignment":
                alignment = int(value)
            elif key == "split.count":
                split_count = int(value)

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            dims = cur.unpack(f"<{n_dims}Q")
            type_id = cur.u32()
            rel_offset = cur.u64()
            infos.append((name, type_id, tuple(reversed(dims)), rel_offset))

        # Tensor data starts at the first aligned position after the header.
        data_start = -(-cur.pos // alignment) * alignment
        tensors = {
            name: TensorInfo(name, type_id, shape, data_start + rel)
            for name, type_id, shape, rel in infos
        }
    return GGUFHeader(version, architecture, split_count, tensors)
