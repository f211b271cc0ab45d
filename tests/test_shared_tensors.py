"""Media tensors cross from the engine's front end to its core through shared
memory: what arrives is what was sent, and no segment outlives the hand-over."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from engine_worker.shared_tensors import discard, share, take

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


def test_tensors_arrive_whole_in_another_process_and_the_segment_is_gone():
    shared = share(MEDIA)
    assert segment_exists(shared.name)
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
    assert not segment_exists(shared.name)


def test_a_refused_request_frees_its_segment():
    shared = share(MEDIA)
    discard(shared)
    assert not segment_exists(shared.name)
    discard(shared)  # twice is harmless


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux lists segments in /dev/shm")
def test_no_segment_left_behind():
    before = set(os.listdir("/dev/shm"))
    take(share(MEDIA))
    assert set(os.listdir("/dev/shm")) - before == set()
