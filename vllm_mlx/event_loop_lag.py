"""How late an asyncio event loop runs what falls due.

The gateway and the engine front end each forward every stream's tokens on
one event loop, so anything that holds that loop (a callback that runs long,
another thread holding the interpreter, a garbage collection) delays every
stream by as much. Each of them runs a `LagWatch` while it has requests in
flight and exports the lags as a histogram (/metrics); the media bench
counts them beside the engine loop's slow iterations and the client's slow
gaps, to tell where a slow gap arose.
"""

import asyncio
import bisect
from collections.abc import Callable

# Upper bounds of the histogram's buckets, in seconds (the engine's step
# histogram uses the same, so that the two compare).
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# How often a busy loop is checked: a stall shows as a lag of its length
# less the time that was left to the next check, so stalls over twice this
# are seen at over half their length. Lags under about 1 ms are the
# selector's own rounding.
PERIOD_S = 0.005


class LagHistogram:
    """Counts per bucket of BOUNDS (the last one past every bound) and their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds


class LagWatch:
    """`run` records how late the loop wakes, every `period_s`, while any
    work that `begin` announced has not `end`ed; an idle process is not
    woken at all (a laptop's CPU stays asleep)."""

    def __init__(self, record: Callable[[float], None], period_s: float = PERIOD_S):
        self.record, self.period_s = record, period_s
        self.in_flight = 0
        self._busy = asyncio.Event()

    def begin(self) -> None:
        self.in_flight += 1
        self._busy.set()

    def end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._busy.clear()

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._busy.wait()
            due = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            self.record(max(0.0, loop.time() - due))
