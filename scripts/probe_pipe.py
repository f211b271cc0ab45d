"""What one decode step's publish costs the engine core: sending a step's
outputs over the pipe to a front end that waits on its asyncio loop, with the
core busy for `--step-us` between sends as in decoding.

    python scripts/probe_pipe.py [--streams 64] [--step-us 1000] [--sends 3000]
"""

import argparse
import asyncio
import multiprocessing as mp
import os
import pickle
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def front_end(conn) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def read() -> None:
            while conn.poll():
                if conn.recv_bytes() == b"stop":
                    done.set_result(None)
                    return

        loop.add_reader(conn.fileno(), read)
        await done

    asyncio.run(main())


def main() -> None:
    from engine_worker.messages import Output, StepOutputs

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--step-us", type=float, default=1000)
    ap.add_argument("--sends", type=int, default=3000)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=front_end, args=(theirs,))
    p.start()
    step = [Output(str(uuid.uuid4()), 1234) for _ in range(a.streams)]
    columns = StepOutputs([o.request_id for o in step], [o.token for o in step]).to_wire
    ways = {
        "Connection.send of tuples": lambda: mine.send(("outputs", [tuple(o) for o in step])),
        "Connection.send of columns": lambda: mine.send(("outputs", *columns(), None)),
        "pickle.dumps + send_bytes": lambda: mine.send_bytes(
            pickle.dumps(("outputs", *columns(), None), protocol=5)),
        "pickle.dumps only": lambda: pickle.dumps(("outputs", *columns(), None), protocol=5),
        "os.write of 1 byte": lambda: os.write(mine.fileno(), b"\0\0\0\1x"),
    }
    for name, send in ways.items():
        spent = 0.0
        for _ in range(a.sends):
            busy_until = time.perf_counter() + a.step_us / 1e6
            while time.perf_counter() < busy_until:
                pass
            t = time.perf_counter()
            send()
            spent += time.perf_counter() - t
        print(f"{name:30s} {1e6 * spent / a.sends:7.1f} us per step", flush=True)
    mine.send_bytes(b"stop")
    p.join()


if __name__ == "__main__":
    main()
