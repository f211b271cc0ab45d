"""A request's media tensors from the front end to the engine core through
shared memory instead of the pipe.

A 1080p image's tensors are about 18 MB. Pickled through the pipe, writing
them blocked the front end's event loop for 30 to 50 ms on the 2-core CPU,
and reading them cost the core's process the same; through shared memory the
front end copies them once, off its event loop, and the pipe carries only a
name and a layout. The core copies them out and unlinks the segment as soon
as the request arrives, so a segment lives only while the request crosses.
"""

from multiprocessing import resource_tracker, shared_memory
from typing import NamedTuple

import numpy as np

# (name, dtype, shape, byte offset) of each tensor of one item
Layout = list[tuple[str, str, tuple[int, ...], int]]


class SharedTensors(NamedTuple):
    name: str
    items: list[Layout]


def share(media: list[dict[str, np.ndarray]]) -> SharedTensors:
    arrays = [{k: np.ascontiguousarray(a) for k, a in item.items()} for item in media]
    size = sum(a.nbytes for item in arrays for a in item.values())
    shm = shared_memory.SharedMemory(create=True, size=max(size, 1))
    _untrack(shm)
    items, offset = [], 0
    try:
        for item in arrays:
            layout = []
            for key, a in item.items():
                np.ndarray(a.shape, a.dtype, buffer=shm.buf, offset=offset)[...] = a
                layout.append((key, a.dtype.str, a.shape, offset))
                offset += a.nbytes
            items.append(layout)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    shm.close()
    return SharedTensors(shm.name, items)


def take(shared: SharedTensors) -> list[dict[str, np.ndarray]]:
    """The tensors, copied out; the segment is gone afterwards."""
    shm = shared_memory.SharedMemory(name=shared.name)
    _untrack(shm)
    try:
        return [{key: np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=offset).copy()
                 for key, dtype, shape, offset in layout} for layout in shared.items]
    finally:
        shm.close()
        shm.unlink()


def _untrack(shm: shared_memory.SharedMemory) -> None:
    # Before Python 3.13 every process that opens a segment registers it with
    # its resource tracker, which unlinks it (with a warning) when that
    # process exits. Here the core unlinks each segment once it has copied it.
    try:
        resource_tracker.unregister(shm._name, "shared_memory")
    except Exception:
        pass


def discard(shared: SharedTensors) -> None:
    """Free a segment whose request will never reach the core."""
    try:
        shm = shared_memory.SharedMemory(name=shared.name)
    except FileNotFoundError:
        return
    _untrack(shm)
    shm.close()
    shm.unlink()
