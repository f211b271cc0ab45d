"""Media: text latency while images are prepared (`load`), what preparing
images and videos costs (`prepare`), and the second turn of a chat about a
picture against the first (`turns`), on the tiny Qwen2-VL test model.

load: the whole stack (`vllm-mlx-up`: gateway, engine, 2 media workers).
Text requests (chat, max_tokens=1, so latency is time to first token) go one
after another, in rounds that alternate between three states: quiet;
"decoding", where 4 Prepare calls, each with a fresh JPEG (--image-size) by
data URL, are kept in flight on the media workers directly (the fetch, decode
and preprocessing a request's images cost, and nothing else); and "image
requests" (loaded), where 4 chat requests with such an image are kept in
flight through the gateway (decoding, then the engine's vision encoder and the
image tokens' prefill, which share the engine with the text requests). Fresh
images, so no cache answers for them, unless --load-images is smaller than a
state's load: then images repeat, and the caches answer the repeats (with
--load-images 1, what image rows cost the text streams without the encoder).
Reported: text p50/p99 in each state, the ratios to quiet, where the engine
loop's time went in each, and how many text gaps, engine loop iterations and
lags of the front end's, the gateway's and this timing client's event loops
took over 2.5, 5 and 10 ms (a slow gap without a slow iteration arose
outside the engine loop; a lag, in the process that had it).

prepare: (1) images by resolution: decode + the model's preprocessing,
in-process; (2) video by sampled frame count, from a --clip-seconds H.264
clip; (3) PyAV against OpenCV decoding that clip (all frames, and 16
sampled; OpenCV only where opencv-python is installed); (4) the round trip
of Prepare through a real media worker process. Two processor profiles: the
tiny test model's (images capped at 752,640 pixels, video frames at 100,352)
and Qwen2-VL-7B's shipped preprocessor_config.json (max_pixels 12,845,056 for
both, so 1080p is preprocessed at full size).

turns: the whole stack (`vllm-mlx-up`); time to first token of a first turn
(a fresh --image-size picture and text, --prompt-tokens in all) and of the
second turn about the same picture (vllm_mlx/bench/turns.py).

    vllm-mlx-bench media --output bench-media.json
    vllm-mlx-bench media --parts load --rounds 3 --per-round 100 --output FILE
"""

import argparse
import asyncio
import importlib.util
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vllm_mlx.bench import report
from vllm_mlx.bench.inputs import data_url, encode_clip, jpeg, photo_like
from vllm_mlx.bench.workloads import (
    LOOP_COUNTS,
    SLOW_MS,
    TINY_VLM,
    Child,
    Stack,
    count_over,
    default_cache,
    engine_loop_seconds,
    gateway_lags,
    model_folder,
    over,
    ports,
)
from vllm_mlx.event_loop_lag import BOUNDS, LagHistogram, LagWatch
from vllm_mlx.settings import freeze_startup_objects

IN_FLIGHT = 4  # image jobs the load keeps going
# LoopTime's figures that are counts; the rest are seconds.
COUNTS = (*LOOP_COUNTS, *(f"{where}_lags_{over(ms)}" for where in ("gateway", "client")
                          for ms in SLOW_MS))
BIG = 10**9  # caps that never bind here
CLIP_FPS = 30
SAMPLED = 16  # frames the decoders' sampled comparison takes
QWEN2_VL_7B_MAX_PIXELS = 12845056


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--parts", nargs="+", choices=["load", "prepare", "turns"],
                    default=["load", "prepare"], help="what to measure (see above)")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="where the tiny test model is built")
    g = ap.add_argument_group("load")
    g.add_argument("--rounds", type=int, default=3, help="rounds of the three states")
    g.add_argument("--per-round", type=int, default=40,
                   help="text requests per state and round")
    g.add_argument("--gap-ms", type=float, default=20, help="pause between text requests")
    g.add_argument("--text-tokens", type=int, default=1,
                   help="tokens per text request; above 1 they stream, and the figures are "
                        "inter-token latencies (gaps between a stream's tokens), not TTFT")
    g.add_argument("--image-size", type=size, default="1920x1080", metavar="WxH",
                   help="the load's images, and the turns' pictures")
    g.add_argument("--load-images", type=int, default=200,
                   help="distinct images each load process makes before it starts; a "
                        "load that sends more sends them again, which the media workers' "
                        "cache and the prefix cache answer (1: only the first request is "
                        "decoded and encoded, the rest show what is left without them)")
    g.add_argument("--server-flags", default="",
                   help="extra vllm-mlx-up flags, one string "
                        "(--server-flags=\"--prefill-chunk-while-decoding 64\")")
    g.add_argument("--port", type=int, default=0, help="the gateway's; 0: a free port")
    g.add_argument("--engine-port", type=int, default=0, help="the engine's; 0: a free port")
    g = ap.add_argument_group("turns (and --rounds, --image-size)")
    g.add_argument("--prompt-tokens", type=int, default=2000,
                   help="the first turn's prompt, picture included")
    g.add_argument("--max-tokens", type=int, default=32, help="each turn's answer")
    g = ap.add_argument_group("prepare")
    g.add_argument("--reps", type=int, default=3, help="runs per figure (median kept)")
    g.add_argument("--image-sizes", type=size, nargs="+", metavar="WxH",
                   default=["224x224", "512x512", "1280x720", "1920x1080"],
                   help="image resolutions")
    g.add_argument("--frame-counts", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                   help="frames sampled from the clip")
    g.add_argument("--clip-seconds", type=int, default=10, help="the clip's length")
    g.add_argument("--clip-size", type=size, default="1920x1080", metavar="WxH",
                   help="the clip's frame size")
    g.add_argument("--profiles", nargs="+", choices=["tiny", "qwen2-vl-7b"],
                   default=["tiny", "qwen2-vl-7b"], help="processor profiles")


def size(text: str) -> str:
    """A WxH flag's value, checked (argparse shows a ValueError as a usage error)."""
    w, h = parse_size(text)
    return f"{w}x{h}"


def parse_size(text: str) -> tuple[int, int]:
    """WxH (1920x1080) as (width, height)."""
    w, sep, h = text.lower().partition("x")
    if not sep or int(w) <= 0 or int(h) <= 0:
        raise ValueError(text)
    return int(w), int(h)


def run(a: argparse.Namespace) -> dict:
    model = model_folder(TINY_VLM, a.cache)
    out: dict = {"parts": a.parts}
    if "load" in a.parts:
        out["load"] = run_load(a, model)
        print_load(out["load"])
    if "prepare" in a.parts:
        out["prepare"] = run_prepare(a, model)
        print_prepare(out["prepare"])
    if "turns" in a.parts:
        out["turns"] = run_second_turns(a, model)
        print_turns(out["turns"])
    return out


# -- images and clips ----------------------------------------------------------------


# -- load: text latency while images are prepared ------------------------------------


def load_image(size: str, seed: int) -> str:
    """A fresh JPEG of the load's, by data URL."""
    return data_url(jpeg(photo_like(*parse_size(size), seed), 85))


async def text_round(client, n: int, gap_s: float, tokens: int = 1) -> list[float]:
    """Time to first token of n requests, or with tokens > 1 the gaps between
    streamed tokens."""
    if tokens > 1:
        return await stream_round(client, n, gap_s, tokens)
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


async def stream_round(client, n: int, gap_s: float, tokens: int) -> list[float]:
    from vllm_mlx.bench.sse_client import stream_chat

    gaps = []
    for i in range(n):
        out = await stream_chat(client, json.dumps({
            "model": "default", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user",
                                          "content": f"Count from the number {i}."}]}).encode())
        if out.error:
            raise RuntimeError(out.error)
        gaps += out.gaps
        await asyncio.sleep(gap_s)
    return gaps


async def image_load(client, urls: Iterator[str], stop: asyncio.Event,
                     done: list[float]) -> None:
    while not stop.is_set():
        url = next(urls)
        tic = time.perf_counter()
        r = await client.post("/v1/chat/completions", json={
            "model": "default", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Describe the picture."},
                {"type": "image_url", "image_url": {"url": url}}]}]}, timeout=120)
        r.raise_for_status()
        done.append(time.perf_counter() - tic)


async def prepare_load(address: str, urls: Iterator[str], stop: asyncio.Event,
                       done: list[float]) -> None:
    import grpc

    from vllm_mlx.v1 import media_pb2 as mpb
    from vllm_mlx.v1 import media_pb2_grpc

    async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = media_pb2_grpc.MediaWorkerStub(channel)
        while not stop.is_set():
            url = next(urls)
            tic = time.perf_counter()
            await stub.Prepare(mpb.PrepareRequest(items=[mpb.MediaSource(
                kind=mpb.MEDIA_KIND_IMAGE, url=url)]), timeout=120)
            done.append(time.perf_counter() - tic)


def load_process(mode: str, base_url: str, media: list[str], seeds: range,
                 size: str, conn) -> None:
    """Keeps IN_FLIGHT image jobs going until told to stop. A process of its
    own, so that building and parsing large messages never stalls the timing
    client's event loop, and at the lowest priority: it stands in for clients
    on other machines, so its own work (1 MB request bodies, 18 MB Prepare
    replies) should not take the server's cores where the bench shares them."""
    import httpx

    os.nice(19)

    urls = itertools.cycle([load_image(size, s) for s in seeds])

    async def run() -> list[float]:
        stop, done = asyncio.Event(), []
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            if mode == "prepare":
                jobs = [prepare_load(media[k % len(media)], urls, stop, done)
                        for k in range(IN_FLIGHT)]
            else:
                jobs = [image_load(client, urls, stop, done) for _ in range(IN_FLIGHT)]
            tasks = [asyncio.create_task(j) for j in jobs]
            await asyncio.sleep(0.5)  # all in flight before the first text request
            conn.send("started")
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            stop.set()
            await asyncio.gather(*tasks)
        return done

    conn.send(asyncio.run(run()))


class LoopTime:
    """Where the engine loop's time went during one state's text rounds:
    milliseconds per phase (the vision encoder runs in `admit`), steps,
    prefill passes, and the slow ones among the engine loop's iterations and
    the event-loop lags of the front end, the gateway and this timing client
    itself (`watch` runs during the rounds)."""

    def __init__(self, engine_address: str, url: str):
        self.address, self.url = engine_address, url
        self.total: dict[str, float] = {}
        self.client_lags = LagHistogram()
        self.watch = LagWatch(self.client_lags.record)

    def _read(self) -> dict[str, float]:
        return {**engine_loop_seconds(self.address), **gateway_lags(self.url)}

    async def around(self, coro):
        before = await asyncio.to_thread(self._read)
        self.watch.begin()
        try:
            result = await coro
        finally:
            self.watch.end()
        after = await asyncio.to_thread(self._read)
        for k in after:
            self.total[k] = self.total.get(k, 0.0) + after[k] - before[k]
        return result

    def summary(self) -> dict[str, float]:
        lags = {f"client_lags_{over(ms)}": count_over(BOUNDS, self.client_lags.counts, ms / 1e3)
                for ms in SLOW_MS}
        return {k: round(v if k in COUNTS else v * 1e3, 1)
                for k, v in {**self.total, **lags}.items()}


async def load_states(a: argparse.Namespace, stack: Stack) -> dict:
    import multiprocessing as mp

    import httpx

    ctx = mp.get_context("spawn")
    samples: dict[str, list[float]] = {"quiet": [], "decoding": [], "loaded": []}
    latency: dict[str, list[float]] = {"decoding": [], "loaded": []}
    repeats = {"decoding": 0, "loaded": 0}  # requests for an image its load had sent
    loop = {state: LoopTime(stack.engine_address, stack.url) for state in samples}
    gap_s = a.gap_ms / 1e3
    limits = httpx.Limits(max_connections=16)
    seeds = iter(range(0, 10**6, max(100, a.load_images)))
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:
        await text_round(client, 5, 0)  # warm-up
        await client.post("/v1/chat/completions", json={  # and the vision path
            "model": "default", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": load_image(a.image_size, 10**7)}}]}]})
        freeze_startup_objects()  # the timing client's own collections are no server's gaps
        watches = [asyncio.create_task(t.watch.run()) for t in loop.values()]
        for _ in report.progress(range(a.rounds), "rounds"):
            print("state quiet", flush=True)  # markers for profilers attached from outside
            samples["quiet"] += await loop["quiet"].around(text_round(
                client, a.per_round, gap_s, a.text_tokens))
            for mode, state in (("prepare", "decoding"), ("chat", "loaded")):
                here, there = ctx.Pipe()
                start = next(seeds)
                proc = ctx.Process(target=load_process, args=(
                    mode, stack.url, stack.media, range(start, start + a.load_images),
                    a.image_size, there))
                proc.start()
                await asyncio.to_thread(here.recv)  # "started"
                print(f"state {state}", flush=True)
                samples[state] += await loop[state].around(text_round(
                    client, a.per_round, gap_s, a.text_tokens))
                here.send("stop")
                sent = await asyncio.to_thread(here.recv)
                latency[state] += sent
                repeats[state] += max(0, len(sent) - a.load_images)
                proc.join()
        for task in watches:
            task.cancel()
    return {**figures(samples, latency, loop), "prepare_repeats": repeats["decoding"],
            "image_repeats": repeats["loaded"]}


def figures(samples: dict[str, list[float]], latency: dict[str, list[float]],
            loop: dict[str, LoopTime]) -> dict:
    def ms(xs: list[float], p: float) -> float:
        return 1e3 * report.percentile(sorted(xs), p)

    out = {}
    for state, xs in samples.items():
        out[f"{state}_p50_ms"], out[f"{state}_p99_ms"] = ms(xs, 50), ms(xs, 99)
        # Beside the loop's iterations over the same bounds (engine_loop_ms):
        # a slow gap without a slow iteration arose outside the engine loop.
        for bound in SLOW_MS:
            out[f"{state}_gaps_{over(bound)}"] = sum(x * 1e3 > bound for x in xs)
    for state in ("decoding", "loaded"):
        for q in ("p50", "p99"):
            out[f"{state}_{q}_ratio"] = out[f"{state}_{q}_ms"] / out[f"quiet_{q}_ms"]
    decoding, loaded = latency["decoding"], latency["loaded"]
    out.update(
        prepare_calls=len(decoding),
        prepare_latency_p50_ms=1e3 * statistics.median(decoding) if decoding else None,
        image_requests=len(loaded),
        image_latency_p50_ms=1e3 * statistics.median(loaded) if loaded else None,
        engine_loop_ms={state: t.summary() for state, t in loop.items()},
        samples_per_state=len(samples["quiet"]),
        **{f"{state}_all": xs for state, xs in samples.items()})
    return out


def run_load(a: argparse.Namespace, model: Path) -> dict:
    port, engine_port = ports(0, 2)
    stack = Stack(model, a.port or port, a.engine_port or engine_port, a.server_flags.split())
    try:
        result = asyncio.run(load_states(a, stack))
    finally:
        stack.stop()
    return dict(rounds=a.rounds, per_round=a.per_round, gap_ms=a.gap_ms,
                server_flags=a.server_flags,
                text_tokens=a.text_tokens,
                image_size=a.image_size, load_images=a.load_images,
                in_flight=IN_FLIGHT, media_workers=len(stack.media), **result)


def run_second_turns(a: argparse.Namespace, model: Path) -> dict:
    from vllm_mlx.bench.turns import run_turns

    port, engine_port = ports(0, 2)
    stack = Stack(model, a.port or port, a.engine_port or engine_port, a.server_flags.split())
    try:
        return run_turns(stack.url, parse_size(a.image_size), a.prompt_tokens, a.rounds,
                         a.max_tokens)
    finally:
        stack.stop()


def print_turns(r: dict) -> None:
    print(report.banner("the second turn about a picture: time to first token"))
    print(report.table([[r["image_size"], r["prompt_tokens"], f"{r['first_ttft_ms']:.1f}",
                         f"{r['second_ttft_ms']:.1f}", f"{r['speedup']:.1f}x"]],
                       ["picture", "prompt tokens", "first turn ms", "second turn ms",
                        "speed-up"]))


def print_load(r: dict) -> None:
    def load(calls: int, p50: float | None, what: str) -> str:
        return f"{calls} {what}" + (f", p50 {p50:.0f} ms" if p50 is not None else "")

    what = "inter-token latency" if r.get("text_tokens", 1) > 1 else "time to first token"
    print(report.banner(f"text {what} while images are prepared"))
    print(report.table([
        ["quiet", f"{r['quiet_p50_ms']:.1f}", f"{r['quiet_p99_ms']:.1f}", "", "", ""],
        [f"{IN_FLIGHT} images being decoded", f"{r['decoding_p50_ms']:.1f}",
         f"{r['decoding_p99_ms']:.1f}", f"x{r['decoding_p50_ratio']:.2f}",
         f"x{r['decoding_p99_ratio']:.2f}",
         load(r["prepare_calls"], r["prepare_latency_p50_ms"], "Prepare calls")],
        [f"{IN_FLIGHT} image requests in flight", f"{r['loaded_p50_ms']:.1f}",
         f"{r['loaded_p99_ms']:.1f}", f"x{r['loaded_p50_ratio']:.2f}",
         f"x{r['loaded_p99_ratio']:.2f}",
         load(r["image_requests"], r["image_latency_p50_ms"], "requests")]],
        ["state", "p50 ms", "p99 ms", "p50 / quiet", "p99 / quiet", "load"]))
    if r["prepare_repeats"] or r["image_repeats"]:
        print(f"(images repeated, answered by the caches: {r['prepare_repeats']} Prepare "
              f"calls and {r['image_repeats']} image requests; --load-images "
              f"{r['load_images']})")
    loop = r["engine_loop_ms"]
    print("\nslow text gaps, engine loop iterations and event-loop lags, per state")
    print(report.table([[state, where, count, *(counts.get(f"{key}_{over(b)}", "")
                                                for b in SLOW_MS)]
                        for state in ("quiet", "decoding", "loaded")
                        for where, count, key, counts in (
                            ("text gaps", len(r[f"{state}_all"]), "gaps",
                             {k.removeprefix(f"{state}_"): v for k, v in r.items()}),
                            ("engine loop iterations", loop[state].get("steps", 0), "steps",
                             loop[state]),
                            ("front end event loop", "", "front_end_lags", loop[state]),
                            ("gateway event loop", "", "gateway_lags", loop[state]),
                            ("timing client's event loop", "", "client_lags", loop[state]))],
                       ["state", "where", "count", *(f"over {b:g} ms" for b in SLOW_MS)]))
    print("prefill passes: " + ", ".join(f"{state} {loop[state].get('prefill_passes', 0):g}"
                                         for state in ("quiet", "decoding", "loaded")))
    print("\nengine loop per state, ms (admit holds the vision encoder)")
    print(report.table([[state, "  ".join(f"{k} {v}" for k, v in sorted(t.items())
                                          if k not in COUNTS)]
                        for state, t in loop.items()], ["state", "loop"]))


# -- prepare: what images and videos cost --------------------------------------------


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def profile_model(base: Path, name: str, tmp: Path) -> Path:
    if name == "tiny":
        return base
    path = tmp / f"{base.name}-{name}"
    shutil.copytree(base, path, dirs_exist_ok=True)
    for cfg in ("preprocessor_config.json", "video_preprocessor_config.json"):
        data = json.loads((path / cfg).read_text())
        data["max_pixels"] = data["size"]["longest_edge"] = QWEN2_VL_7B_MAX_PIXELS
        (path / cfg).write_text(json.dumps(data, indent=2))
    return path


def bench_images(pre, sizes: list[str], reps: int, desc: str) -> list[dict]:
    from media_worker.images import decode_image

    rows = []
    for w, h in report.progress([parse_size(s) for s in sizes], desc):
        data = jpeg(photo_like(w, h), 90)
        decode_s, img = timed(lambda d=data: decode_image(d, BIG), reps)
        pre_s, out = timed(lambda i=img: pre.image(i), reps)
        rows.append({"size": f"{w}x{h}", "jpeg_bytes": len(data), "decode_s": decode_s,
                     "preprocess_s": pre_s, "total_s": decode_s + pre_s,
                     "tokens": len(out.token_ids),
                     "tensor_bytes": int(sum(a.nbytes for a in out.tensors.values()))})
    return rows


def bench_video(pre, clip: bytes, counts: list[int], reps: int, desc: str) -> list[dict]:
    from media_worker.video import decode_video

    rows = []
    for n in report.progress(counts, desc):
        # fps high enough that max_frames is what binds: n frames over the clip.
        decode_s, video = timed(lambda k=n: decode_video(clip, 30.0, k, BIG, BIG), reps)
        pre_s, out = timed(lambda v=video: pre.video(v.frames), reps)
        rows.append({"frames": len(video.frames), "decode_s": decode_s, "preprocess_s": pre_s,
                     "total_s": decode_s + pre_s, "tokens": len(out.token_ids),
                     "tensor_bytes": int(sum(a.nbytes for a in out.tensors.values()))})
    return rows


def pyav_all(clip: bytes, threads: bool) -> int:
    import av

    with av.open(io.BytesIO(clip)) as container:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        return sum(1 for f in container.decode(stream) if f.to_ndarray(format="rgb24") is not None)


def opencv_all(path: str) -> int:
    import cv2

    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        n += 1
    cap.release()
    return n


def opencv_sampled(path: str, count: int) -> int:
    """The same even spread as the worker's: grab() every frame (decode, no
    colour conversion), retrieve() only the chosen ones."""
    import cv2

    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = {int((i + 0.5) * total / count) for i in range(count)}
    got = i = 0
    while cap.grab():
        if i in wanted:
            ok, frame = cap.retrieve()
            cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            got += 1
        i += 1
    cap.release()
    return got


def bench_decoders(clip: bytes, reps: int) -> dict:
    """PyAV (the workers' decoder) against OpenCV, where opencv-python is
    installed (it is no dependency: this comparison is why)."""
    import av

    from media_worker.video import decode_video

    rows = {
        "pyav_all_frames_threads_auto_s": timed(lambda: pyav_all(clip, True), reps)[0],
        "pyav_all_frames_one_thread_s": timed(lambda: pyav_all(clip, False), reps)[0],
        "pyav_16_sampled_s":  # the worker's decode_video
            timed(lambda: decode_video(clip, 30.0, SAMPLED, BIG, BIG), reps)[0],
        "pyav_version": av.__version__, "frames_decoded": pyav_all(clip, True),
    }
    if importlib.util.find_spec("cv2") is None:
        rows["opencv_version"] = None  # not installed: PyAV's figures only
        return rows
    import cv2

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        # OpenCV reads only from a file (or a device): the bytes go to disk first.
        write_s, _ = timed(lambda: (f.seek(0), f.write(clip), f.flush()), 1)
        rows.update({
            "opencv_all_frames_s": timed(lambda: opencv_all(f.name), reps)[0],
            "opencv_16_sampled_s": timed(lambda: opencv_sampled(f.name, SAMPLED), reps)[0],
            "opencv_temp_file_write_s": write_s, "opencv_version": cv2.__version__})
    return rows


def bench_grpc(model: Path, clip: bytes, a: argparse.Namespace) -> dict:
    """Prepare's round trip through a media worker process (profile tiny)."""
    import grpc

    from vllm_mlx.supervision.health import wait_for_serving
    from vllm_mlx.v1 import media_pb2 as pb
    from vllm_mlx.v1 import media_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "clip.mp4").write_bytes(clip)
        [port] = ports(0, 1)
        worker = Child([sys.executable, "-m", "media_worker", "--model", str(model),
                        "--host", "127.0.0.1", "--port", str(port),
                        "--allowed-local-media-path", tmp,
                        "--max-video-frames", str(max(64, *a.frame_counts))])
        try:
            try:
                wait_for_serving(f"127.0.0.1:{port}", 120, is_alive=worker.alive)
            except (RuntimeError, TimeoutError) as e:
                raise SystemExit(f"the media worker did not start ({e}):\n"
                                 f"{worker.output()}") from None
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
                    ("grpc.max_receive_message_length", -1)]) as channel:
                stub = media_pb2_grpc.MediaWorkerStub(channel)
                images, videos = [], []
                sizes = [parse_size(s) for s in a.image_sizes]
                for seed, (w, h) in enumerate(report.progress(sizes, "gRPC images")):
                    # A different image each rep: the worker caches by content hash.
                    urls = [data_url(jpeg(photo_like(w, h, seed=seed * 100 + rep + 1), 90))
                            for rep in range(a.reps)]
                    rtt = []
                    for url in urls:
                        t = time.perf_counter()
                        stub.Prepare(pb.PrepareRequest(request_id="b", items=[
                            pb.MediaSource(kind=pb.MEDIA_KIND_IMAGE, url=url)]), timeout=60)
                        rtt.append(time.perf_counter() - t)
                    images.append({"size": f"{w}x{h}", "round_trip_s": statistics.median(rtt)})
                for n in report.progress(a.frame_counts, "gRPC videos"):
                    rtt = []
                    for rep in range(a.reps):
                        # fps differs per rep so that the cache never answers.
                        item = pb.MediaSource(kind=pb.MEDIA_KIND_VIDEO,
                                              path=f"{tmp}/clip.mp4",
                                              fps=29.0 - rep * 0.01, max_frames=n)
                        t = time.perf_counter()
                        stub.Prepare(pb.PrepareRequest(request_id="b", items=[item]),
                                     timeout=120)
                        rtt.append(time.perf_counter() - t)
                    videos.append({"frames": n, "round_trip_s": statistics.median(rtt)})
            return {"images": images, "videos": videos}
        finally:
            worker.stop()


def run_prepare(a: argparse.Namespace, model: Path) -> dict:
    from media_worker.processor import Preprocessor

    w, h = parse_size(a.clip_size)
    print(f"encoding a {a.clip_seconds} s {w}x{h} clip ...", file=sys.stderr, flush=True)
    clip = encode_clip(a.clip_seconds, CLIP_FPS, w, h)
    result = {
        "loadavg_at_start": os.getloadavg(),
        "clip": {"seconds": a.clip_seconds, "fps": CLIP_FPS, "size": f"{w}x{h}",
                 "codec": "h264 yuv420p", "bytes": len(clip)},
        "reps": a.reps, "profiles": {},
    }
    result["decoders"] = bench_decoders(clip, a.reps)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.profiles:
            pre = Preprocessor(str(profile_model(model, name, Path(tmp))))
            result["profiles"][name] = {
                "images": bench_images(pre, a.image_sizes, a.reps, f"{name} images"),
                "videos": bench_video(pre, clip, a.frame_counts, a.reps, f"{name} videos")}
    result["grpc_tiny"] = bench_grpc(model, clip, a)
    result["loadavg_at_end"] = os.getloadavg()
    return result


def print_prepare(r: dict) -> None:
    def ms(s: float) -> str:
        return f"{s * 1000:.1f}"

    print(report.banner("media preparation, ms (median of "
                        f"{r['reps']}), {r['clip']['seconds']} s {r['clip']['size']} clip"))
    for name, p in r["profiles"].items():
        print(f"\nprofile {name}: images")
        print(report.table([[x["size"], x["jpeg_bytes"], ms(x["decode_s"]),
                             ms(x["preprocess_s"]), ms(x["total_s"]), x["tokens"]]
                            for x in p["images"]],
                           ["size", "JPEG bytes", "decode", "preprocess", "total", "tokens"]))
        print(f"\nprofile {name}: video")
        print(report.table([[x["frames"], ms(x["decode_s"]), ms(x["preprocess_s"]),
                             ms(x["total_s"]), x["tokens"]] for x in p["videos"]],
                           ["frames", "decode", "preprocess", "total", "tokens"]))
    print("\ndecoders, the whole clip")
    print(report.table([[k, ms(v) if k.endswith("_s") else v]
                        for k, v in r["decoders"].items()], ["figure", "ms / value"]))
    g = r["grpc_tiny"]
    print("\nPrepare through a media worker process (profile tiny), round trip")
    print(report.table([[f"image {x['size']}", ms(x["round_trip_s"])] for x in g["images"]]
                       + [[f"video {x['frames']} frames", ms(x["round_trip_s"])]
                          for x in g["videos"]], ["item", "ms"]))
