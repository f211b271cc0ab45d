"""The event-loop lag watch the gateway and the engine front end run: it
sees a stall of the loop it watches, and wakes nobody while idle."""

import asyncio
import time

from vllm_mlx.event_loop_lag import BOUNDS, LagHistogram, LagWatch


def test_a_stalled_loop_is_seen_and_an_idle_one_left_asleep():
    lags: list[float] = []

    async def main() -> None:
        watch = LagWatch(lags.append, period_s=0.005)
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.1)
        assert lags == []  # nothing in flight: not one check
        watch.begin()
        await asyncio.sleep(0.05)
        time.sleep(0.04)  # a callback that holds the loop for 40 ms
        await asyncio.sleep(0.02)
        watch.end()
        checks = len(lags)
        await asyncio.sleep(0.1)
        task.cancel()
        assert len(lags) <= checks + 1  # at most the check under way when it ended
        assert checks >= 5

    asyncio.run(main())
    # Seen at its length less the time left to the next check, at most 5 ms.
    assert max(lags) >= 0.03
    assert sorted(lags)[len(lags) // 2] < 0.01


def test_the_histogram_counts_by_bucket():
    h = LagHistogram()
    for seconds in (0.0002, 0.001, 0.003, 0.003, 2.0):
        h.record(seconds)
    assert h.counts[0] == 2  # at most the first bound, the bound itself included
    assert h.counts[BOUNDS.index(0.005)] == 2
    assert h.counts[-1] == 1  # past every bound
    assert abs(h.sum - 2.0072) < 1e-9
