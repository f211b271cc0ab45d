"""Media tensors in POSIX shared-memory segments, from the media worker that
makes them to the engine core that feeds them to the model.

A 1080p image's tensors are about 18 MB. Carried inline in the Prepare reply
they were serialized by the media worker, then parsed and copied on the
engine front end's event loop (about 25 ms of loop time per image, while
text requests waited), and copied once more into shared memory for the core.
Now the media worker writes each item into a segment of its own and replies
with its name and layout; the front end passes those on without touching
the bytes; the core copies each item out once.

Ownership: whoever asks the media worker for a segment owns it and unlinks
it (the engine front end, once no request and no cache entry uses it). The
core only reads. Both ends run on one machine; the names work with POSIX
shared memory on Linux and macOS alike.
"""

import os
import threading
from multiprocessing import resource_tracker, shared_memory
from typing import NamedTuple

import numpy as np

from vllm_mlx.v1 import media_pb2

# (name, dtype, shape, byte offset) of each tensor of one item
Layout = list[tuple[str, str, tuple[int, ...], int]]


class SharedTensors(NamedTuple):
    """What crosses the pipe to the core for one request: each media item's
    segment and layout, in prompt order."""
    items: list[tuple[str, Layout]]


def write_segment(tensors: dict[str, np.ndarray]) -> tuple[str, Layout]:
    """A new segment holding `tensors`; the caller owns (and unlinks) it."""
    arrays = {k: np.ascontiguousarray(a) for k, a in tensors.items()}
    shm = shared_memory.SharedMemory(create=True, size=max(1, sum(a.nbytes for a in
                                                                   arrays.values())))
    layout, offset = [], 0
    try:
        for key, a in arrays.items():
            np.ndarray(a.shape, a.dtype, buffer=shm.buf, offset=offset)[...] = a
            layout.append((key, a.dtype.str, tuple(a.shape), offset))
            offset += a.nbytes
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    _untrack(shm)
    shm.close()
    return shm.name, layout


def read_segment(name: str, layout: Layout) -> dict[str, np.ndarray]:
    """The tensors of one segment, copied out (the segment stays)."""
    shm = shared_memory.SharedMemory(name=name)
    _untrack(shm)
    try:
        return {key: np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=offset).copy()
                for key, dtype, shape, offset in layout}
    finally:
        shm.close()


def take(shared: SharedTensors) -> list[dict[str, np.ndarray]]:
    """Every item of a request, copied out; FileNotFoundError if its owner
    has already let a segment go (the request was cancelled meanwhile)."""
    return [read_segment(name, layout) for name, layout in shared.items]


def exists(name: str) -> bool:
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    _untrack(shm)
    shm.close()
    return True


def unlink(name: str) -> bool:
    """Free a segment; one already gone is fine. Whether it was there."""
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    shm.close()
    shm.unlink()  # also drops the registration that opening it made
    return True


def free_segments(reply: media_pb2.PrepareResponse) -> None:
    """Unlink the segments of a Prepare reply that its caller will not use."""
    for item in reply.items:
        if item.shm_name:
            unlink(item.shm_name)


class SegmentLedger:
    """The segments a media worker handed out, by the process that owns
    them, so that those of an owner that died without unlinking them (a
    SIGKILL gives it no chance) do not stay in memory until a reboot.
    `record` runs on the worker's event loop, `sweep` on a thread."""

    def __init__(self) -> None:
        self._by_owner: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def record(self, owner_pid: int, reply: media_pb2.PrepareResponse) -> None:
        names = {item.shm_name for item in reply.items if item.shm_name}
        if owner_pid and names:
            with self._lock:
                self._by_owner.setdefault(owner_pid, set()).update(names)

    def sweep(self) -> int:
        """Unlink what dead owners left; forget what live owners unlinked.
        Returns how many segments were freed."""
        with self._lock:
            snapshot = {pid: set(names) for pid, names in self._by_owner.items()}
        freed = 0
        settled: dict[int, set[str]] = {}
        for pid, names in snapshot.items():
            if _alive(pid):
                settled[pid] = {n for n in names if not exists(n)}
                continue
            freed += sum(unlink(name) for name in names)
            settled[pid] = names
        with self._lock:
            for pid, names in settled.items():
                left = self._by_owner[pid]
                left -= names
                if not left:
                    del self._by_owner[pid]
        return freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: is there such a process (Linux and macOS)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # Before Python 3.13 every process that opens a segment registers it with
    # its resource tracker, which unlinks it (with a warning) when that
    # process exits. Segments here outlive the process that made them.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")
    except Exception:
        pass
