"""Text latency while images are being prepared (not a timed test).

    .venv/bin/python scripts/bench_media_load.py --out docs/bench/cpu-media-load.json

The whole stack (`vllm-mlx-up`: gateway, engine, 2 media workers) serves the
tiny Qwen2-VL test model. Text requests (chat, max_tokens=1, so latency is
time to first token) go one after another, in rounds that alternate between
three states: quiet; "decoding", where 4 Prepare calls, each with a fresh
1920x1080 JPEG by data URL, are kept in flight on the media workers directly
(the fetch, decode and preprocessing a request's images cost, and nothing
else); and "image requests", where 4 chat requests with such an image are kept
in flight through the gateway (decoding, then the engine's vision encoder and
the image tokens' prefill, which share the engine with the text requests).
Fresh images, so no cache answers for them. Reported: text p50/p99 in each
state and the ratios to quiet.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def jpeg_data_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    # Smooth colour fields plus noise: photo-like work for the JPEG decoder.
    base = rng.integers(0, 255, (9, 16, 3), np.uint8)
    img = Image.fromarray(base).resize((1920, 1080), Image.BILINEAR)
    noise = rng.integers(-12, 12, (1080, 1920, 3))
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def text_round(client: httpx.AsyncClient, n: int, gap_s: float) -> list[float]:
    out = []
    for i in range(n):
        tic = time.perf_counter()
        r = await client.post("/v1/chat/completions", json={
            "model": "default", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": f"Say something about the number {i}."}]})
        r.raise_for_status()
        out.append(time.perf_counter() - tic)
        await asyncio.sleep(gap_s)
    return out


async def image_load(client: httpx.AsyncClient, urls: list[str], stop: asyncio.Event,
                     done: list[float]) -> None:
    while not stop.is_set() and urls:
        url = urls.pop()
        tic = time.perf_counter()
        r = await client.post("/v1/chat/completions", json={
            "model": "default", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Describe the picture."},
                {"type": "image_url", "image_url": {"url": url}}]}]}, timeout=120)
        r.raise_for_status()
        done.append(time.perf_counter() - tic)


async def prepare_load(address: str, urls: list[str], stop: asyncio.Event,
                       done: list[float]) -> None:
    import grpc

    from vllm_mlx.v1 import media_pb2 as mpb
    from vllm_mlx.v1 import media_pb2_grpc

    async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = media_pb2_grpc.MediaWorkerStub(channel)
        while not stop.is_set() and urls:
            url = urls.pop()
            tic = time.perf_counter()
            await stub.Prepare(mpb.PrepareRequest(items=[mpb.MediaSource(
                kind=mpb.MEDIA_KIND_IMAGE, url=url)]), timeout=120)
            done.append(time.perf_counter() - tic)


def load_process(mode: str, base_url: str, media: list[str], seeds: range, conn) -> None:
    """Keeps 4 image jobs in flight until told to stop. A process of its own,
    so that building and parsing 18 MB messages never stalls the timing
    client's event loop."""
    urls = [jpeg_data_url(s) for s in seeds]

    async def run() -> list[float]:
        stop, done = asyncio.Event(), []
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            if mode == "prepare":
                jobs = [prepare_load(media[k % len(media)], urls, stop, done) for k in range(4)]
            else:
                jobs = [image_load(client, urls, stop, done) for _ in range(4)]
            tasks = [asyncio.create_task(j) for j in jobs]
            await asyncio.sleep(0.5)  # all four in flight before the first text request
            conn.send("started")
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            stop.set()
            await asyncio.gather(*tasks)
        return done

    conn.send(asyncio.run(run()))


def loop_seconds(engine_address: str) -> dict[str, float]:
    """The engine loop's time by phase so far, and its step count."""
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    with grpc.insecure_channel(engine_address) as channel:
        s = engine_pb2_grpc.EngineStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    return {**s.loop_seconds, "steps": float(s.steps)}


class LoopTime:
    """Where the engine loop's time went during one state's text rounds:
    milliseconds per phase (the vision encoder runs in `admit`) and steps."""

    def __init__(self, engine_address: str):
        self.address = engine_address
        self.total: dict[str, float] = {}

    async def around(self, coro):
        before = await asyncio.to_thread(loop_seconds, self.address)
        result = await coro
        after = await asyncio.to_thread(loop_seconds, self.address)
        for k in after:
            self.total[k] = self.total.get(k, 0.0) + after[k] - before[k]
        return result

    def summary(self) -> dict[str, float]:
        return {k: round(v if k == "steps" else v * 1e3, 1) for k, v in self.total.items()}


async def run(base_url: str, rounds: int, per_round: int, gap_s: float,
              media_addresses: list[str], engine_address: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    quiet, decoding, loaded, image_latency, prepare_latency = [], [], [], [], []
    loop = {state: LoopTime(engine_address) for state in ("quiet", "decoding", "loaded")}
    limits = httpx.Limits(max_connections=16)
    seeds = iter(range(0, 10**6, 100))
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        await text_round(client, 5, 0)  # warm-up
        await client.post("/v1/chat/completions", json={  # and the vision path
            "model": "default", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": jpeg_data_url(10**7)}}]}]})
        for _ in range(rounds):
            print("state quiet", flush=True)  # markers for profilers attached from outside
            quiet += await loop["quiet"].around(text_round(client, per_round, gap_s))
            for samples, latencies, mode, state in (
                    (decoding, prepare_latency, "prepare", "decoding"),
                    (loaded, image_latency, "chat", "loaded")):
                here, there = ctx.Pipe()
                start = next(seeds)
                proc = ctx.Process(target=load_process, args=(
                    mode, base_url, media_addresses, range(start, start + 100), there))
                proc.start()
                await asyncio.to_thread(here.recv)  # "started"
                print(f"state {state}", flush=True)
                samples += await loop[state].around(text_round(client, per_round, gap_s))
                here.send("stop")
                latencies += await asyncio.to_thread(here.recv)
                proc.join()
    return dict(
        decoding_p50_ms=1e3 * statistics.median(decoding),
        decoding_p99_ms=1e3 * percentile(decoding, 0.99),
        prepare_calls=len(prepare_latency),
        prepare_latency_p50_ms=1e3 * statistics.median(prepare_latency),
        quiet_p50_ms=1e3 * statistics.median(quiet), quiet_p99_ms=1e3 * percentile(quiet, 0.99),
        loaded_p50_ms=1e3 * statistics.median(loaded),
        loaded_p99_ms=1e3 * percentile(loaded, 0.99),
        image_requests=len(image_latency),
        image_latency_p50_ms=1e3 * statistics.median(image_latency) if image_latency else None,
        engine_loop_ms={state: t.summary() for state, t in loop.items()},
        samples_per_state=len(quiet), quiet_all=quiet, decoding_all=decoding,
        loaded_all=loaded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=40)
    ap.add_argument("--gap-ms", type=float, default=20)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--engine-port", type=int, default=18732)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import make_test_models

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-vlm"
        make_test_models.build_vlm_model(model)
        log = open(Path(tmp) / "up.log", "w+")
        up = subprocess.Popen([sys.executable, "-m", "vllm_mlx.supervision.supervisor",
                               "--model", str(model), "--port", str(a.port),
                               "--engine-port", str(a.engine_port)],
                              stdout=log, stderr=subprocess.STDOUT,
                              cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while "ready:" not in Path(log.name).read_text():
                if up.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the stack did not start:\n" + Path(log.name).read_text())
                time.sleep(0.2)
            media = re.findall(r"\[media-\d\] .* listening on (\S+),",
                               Path(log.name).read_text())
            result = asyncio.run(run(f"http://127.0.0.1:{a.port}", a.rounds, a.per_round,
                                     a.gap_ms / 1e3, media, f"127.0.0.1:{a.engine_port}"))
        finally:
            up.terminate()
            up.wait(60)
    r = result
    for state in ("decoding", "loaded"):
        for q in ("p50", "p99"):
            r[f"{state}_{q}_ratio"] = r[f"{state}_{q}_ms"] / r[f"quiet_{q}_ms"]
    print(f"text time to first token, ms (p50 / p99):\n"
          f"  quiet                          {r['quiet_p50_ms']:7.1f} / {r['quiet_p99_ms']:7.1f}\n"
          f"  4 images being decoded         {r['decoding_p50_ms']:7.1f} / "
          f"{r['decoding_p99_ms']:7.1f}  (x{r['decoding_p50_ratio']:.2f} / "
          f"x{r['decoding_p99_ratio']:.2f}; {r['prepare_calls']} Prepare calls, p50 "
          f"{r['prepare_latency_p50_ms']:.0f} ms)\n"
          f"  4 image requests in flight     {r['loaded_p50_ms']:7.1f} / {r['loaded_p99_ms']:7.1f}"
          f"  (x{r['loaded_p50_ratio']:.2f} / x{r['loaded_p99_ratio']:.2f}; "
          f"{r['image_requests']} requests, p50 {r['image_latency_p50_ms']:.0f} ms)")
    print("engine loop, ms per state (admit holds the vision encoder):")
    for state, t in r["engine_loop_ms"].items():
        print(f"  {state:9s} {t}")
    if a.out:
        a.out.write_text(json.dumps(dict(machine=platform.platform(), cpus=os.cpu_count(),
                                         **result), indent=2))


if __name__ == "__main__":
    main()
