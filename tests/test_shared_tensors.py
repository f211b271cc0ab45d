"""Media tensors in shared-memory segments: what a reader in another process
gets is what was written, reading leaves the segment to its owner, and the
owner's unlink frees it."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from vllm_mlx.ipc.shared_tensors import SharedTensors, take, unlink, write_segment

MEDIA = [{"pixel_values": np.arange(3 * 1176, dtype=np.float32).reshape(3, 1176),
          "image_grid_thw": np.array([[1, 2, 6]], dtype=np.int64)},
         {"pixel_values_videos": np.ones((8, 1176), np.float16),
          "video_grid_thw": np.array([[2, 2, 2]], dtype=np.int64)}]


def _take_in_child(shared, conn) -> None:
    conn.send(take(shared))


def segment_exists(name: str) -> bool:
    from multiprocessing import shared_memory

    try:
        shared_memory.SharedMemory(name=name).close()
        return True
    except FileNotFoundError:
        return False


def test_tensors_arrive_whole_in_another_process_and_stay_until_unlinked():
    shared = SharedTensors([write_segment(item) for item in MEDIA])
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_take_in_child, args=(shared, there))
    child.start()
    got = here.recv()
    child.join(30)
    assert child.exitcode == 0
    assert [sorted(i) for i in got] == [sorted(i) for i in MEDIA]
    for sent, received in zip(MEDIA, got):
        for key, a in sent.items():
            assert received[key].dtype == a.dtype and np.array_equal(received[key], a)
    # The reader copied; the owner decides when the segments go.
    assert all(segment_exists(name) for name, _ in shared.items)
    for name, _ in shared.items:
        unlink(name)
        assert not segment_exists(name)
        unlink(name)  # twice is harmless
    with pytest.raises(FileNotFoundError):
        take(shared)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux lists segments in /dev/shm")
def test_no_segment_left_behind():
    before = set(os.listdir("/dev/shm"))
    name, layout = write_segment(MEDIA[0])
    take(SharedTensors([(name, layout)]))
    unlink(name)
    assert set(os.listdir("/dev/shm")) - before == set()
