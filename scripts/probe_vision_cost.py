"""Where an image request's engine time goes: the vision encoder, the
prefill of its image tokens, and a decode step of the text requests beside
it, each timed alone on the tiny random-weight VLM (`--family`).

    python scripts/probe_vision_cost.py --sizes 448x448 1280x720 1920x1080

`--mixed N` then runs the engine loop itself (in-process, no gRPC): text
requests keep decoding while N image requests of the last size pass through
one after another, and reports the loop's time per image request by phase
(the encoder runs in `admit`). `--allocator-cache-bytes 0` empties MLX's
buffer cache after every prefill pass, as mlx-lm does, to see what that costs
(the engine keeps it by default).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `fn` after one untimed call (kernels compile on first use)."""
    import mlx.core as mx

    fn()
    mx.synchronize()
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        mx.synchronize()
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--sizes", nargs="+", default=["448x448", "1280x720", "1920x1080"])
    ap.add_argument("--text-batch", type=int, default=4, help="text requests decoding")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mixed", type=int, default=0, help="image requests through the engine loop")
    ap.add_argument("--allocator-cache-bytes", type=int, help="the engine's setting")
    ap.add_argument("--load-seconds", type=float, default=0,
                    help="text requests one after another (20 ms apart) while 4 image "
                         "requests stay in flight, in the engine loop itself")
    ap.add_argument("--prefix-cache", action="store_true", help="(--load-seconds) as served")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import make_test_models
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import BatchGenerator
    from PIL import Image

    from engine_worker.vision import load_vision_model
    from media_worker.processor import Preprocessor

    path = a.cache / f"tiny-{a.family}"
    if not (path / "config.json").exists():
        make_test_models.build_vlm_model(path, family=a.family)
    model, _ = load_vision_model(str(path.resolve()))
    pre = Preprocessor(str(path.resolve()))
    cfg = model.vlm.config
    rng = np.random.default_rng(0)

    def decode_step() -> None:
        gen = BatchGenerator(model, completion_batch_size=64, prefill_batch_size=8)
        gen.insert([[5, 6, 7, 8]] * a.text_batch, max_tokens=[1 << 20] * a.text_batch)
        for _ in range(3):
            gen.next()
        return gen

    gen = decode_step()
    step_ms = timed(gen.next, a.repeat * 4)
    rows = []
    for size in a.sizes:
        w, h = map(int, size.split("x"))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        item = pre.image(img)
        start = cfg.vision_start_token_id
        prompt = [start] + [item.placeholder_token_id] * item.num_placeholder_tokens \
            + [cfg.vision_end_token_id if hasattr(cfg, "vision_end_token_id") else start, 9, 10]
        media = [item.tensors]
        encode_ms = timed(lambda prompt=prompt, media=media: model.encode(prompt, media),
                          a.repeat)

        def encode_and_prefill(prompt=prompt, media=media) -> None:
            g = BatchGenerator(model, completion_batch_size=64, prefill_batch_size=8)
            g.insert([prompt], max_tokens=[1], caches=[model.cache_for(prompt, media)])
            while g.next_generated():
                pass

        total_ms = timed(encode_and_prefill, a.repeat)
        rows.append(dict(size=size, image_tokens=item.num_placeholder_tokens,
                         patches=int(item.tensors["pixel_values"].shape[0]),
                         encode_ms=round(encode_ms, 1),
                         prefill_ms=round(total_ms - encode_ms, 1),
                         decode_step_ms=round(step_ms, 2)))
        print(rows[-1], flush=True)
    mixed = mixed_run(path, prompt, media, a) if a.mixed else None
    if a.load_seconds:
        mixed = load_run(path, prompt, media, a)
    if a.out:
        a.out.write_text(json.dumps(dict(family=a.family, device=str(mx.default_device()),
                                         text_batch=a.text_batch, results=rows, mixed=mixed,
                                         allocator_cache_bytes=a.allocator_cache_bytes),
                                    indent=2))


def load_run(path: Path, prompt: list[int], media: list, a) -> dict:
    """bench_media_load's "image requests in flight" state without the
    gateway, the front end or the media workers: text time to first token
    and the loop's time per step, in-process."""
    import threading

    from engine_worker.messages import Request
    from engine_worker.model import load_model, read_facts
    from engine_worker.sampling import SamplingParams
    from engine_worker.scheduler import Engine
    from vllm_mlx.settings import EngineSettings

    first: dict[str, threading.Event] = {}
    done: dict[str, threading.Event] = {}

    def publish(batch) -> None:
        for out in batch:
            rid = out.request_id
            if rid in first:
                first[rid].set()
            if out.finish_reason and rid in done:
                done[rid].set()

    engine = Engine(EngineSettings(model=str(path), max_num_seqs=64,
                                   prefix_cache=a.prefix_cache,
                                   allocator_cache_bytes=a.allocator_cache_bytes),
                    lambda s: load_model(read_facts(s.model)), publish)
    engine.start()
    engine.ready.wait()
    stop = threading.Event()
    image_ms: list[float] = []

    def image_slot(k: int) -> None:
        n = 0
        while not stop.is_set():
            rid = f"img-{k}-{n}"
            n += 1
            done[rid] = threading.Event()
            tic = time.perf_counter()
            engine.submit(Request(rid, list(prompt), 4, SamplingParams(),
                                  media=[dict(m) for m in media]))
            done[rid].wait()
            image_ms.append((time.perf_counter() - tic) * 1e3)

    def text_round(seconds: float, tag: str) -> list[float]:
        out, end, i = [], time.monotonic() + seconds, 0
        while time.monotonic() < end:
            rid = f"{tag}-{i}"
            i += 1
            first[rid] = threading.Event()
            tic = time.perf_counter()
            engine.submit(Request(rid, [5, 6, 7, 8, 9, 10 + i % 50], 1, SamplingParams()))
            first[rid].wait()
            out.append((time.perf_counter() - tic) * 1e3)
            time.sleep(0.02)
        return out

    def snapshot() -> dict[str, float]:
        return {**engine.stats.loop_seconds, "steps": engine.stats.steps}

    def per_step(before: dict, after: dict) -> dict[str, float]:
        n = max(1, after["steps"] - before["steps"])
        return {k: round((after[k] - before[k]) * 1e3 / n, 2) for k in after
                if k not in ("idle", "steps")} | {"steps": after["steps"] - before["steps"]}

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 1)

    text_round(1.0, "warm")
    t0 = snapshot()
    quiet = text_round(a.load_seconds, "quiet")
    t1 = snapshot()
    slots = [threading.Thread(target=image_slot, args=(k,)) for k in range(4)]
    for t in slots:
        t.start()
    time.sleep(0.5)
    t2 = snapshot()
    loaded = text_round(a.load_seconds, "loaded")
    t3 = snapshot()
    stop.set()
    for t in slots:
        t.join()
    engine.stop()
    out = dict(prefix_cache=a.prefix_cache,
               quiet_ms=dict(p50=pct(quiet, 0.5), p99=pct(quiet, 0.99), n=len(quiet)),
               loaded_ms=dict(p50=pct(loaded, 0.5), p99=pct(loaded, 0.99), n=len(loaded)),
               image_request_ms_p50=pct(image_ms, 0.5),
               quiet_loop_ms_per_step=per_step(t0, t1),
               loaded_loop_ms_per_step=per_step(t2, t3))
    print(out, flush=True)
    return out


def mixed_run(path: Path, prompt: list[int], media: list, a) -> dict:
    """The engine loop with text requests decoding and image requests passing
    through one at a time: loop milliseconds per image request, by phase."""
    import threading

    from engine_worker.messages import Request
    from engine_worker.model import load_model, read_facts
    from engine_worker.sampling import SamplingParams
    from engine_worker.scheduler import Engine
    from vllm_mlx.settings import EngineSettings

    finished: dict[str, threading.Event] = {}

    def publish(batch) -> None:
        for out in batch:
            if out.finish_reason and out.request_id in finished:
                finished[out.request_id].set()

    engine = Engine(EngineSettings(model=str(path), max_num_seqs=64, prefix_cache=False,
                                   allocator_cache_bytes=a.allocator_cache_bytes),
                    lambda s: load_model(read_facts(s.model)), publish)
    engine.start()
    engine.ready.wait()

    def run_image(rid: str) -> None:
        finished[rid] = threading.Event()
        engine.submit(Request(rid, list(prompt), 4, SamplingParams(),
                              media=[dict(m) for m in media]))
        finished[rid].wait()

    for i in range(a.text_batch):
        engine.submit(Request(f"text-{i}", [5, 6, 7, 8], 1 << 16, SamplingParams()))
    run_image("warm-up")

    def snapshot() -> dict[str, float]:
        return {**engine.stats.loop_seconds, "steps": engine.stats.steps}

    def phases(before: dict, after: dict, n: int) -> dict[str, float]:
        return {k: round((after[k] - before[k]) * (1 if k == "steps" else 1e3) / n, 2)
                for k in after if k != "idle"}

    time.sleep(0.5)
    t0 = snapshot()
    time.sleep(1.0)
    t1 = snapshot()
    text_only = phases(t0, t1, max(1, t1["steps"] - t0["steps"]))
    tic = time.perf_counter()
    for i in range(a.mixed):
        run_image(f"image-{i}")
    wall = (time.perf_counter() - tic) * 1e3 / a.mixed
    t2 = snapshot()
    engine.stop()
    out = dict(per_text_step_ms=text_only, per_image_request_ms=phases(t1, t2, a.mixed),
               wall_ms_per_image_request=round(wall, 1))
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()
    # MLX on Linux aborts at interpreter exit after a BatchGenerator ran on
    # another thread (the engine loop of --mixed); everything is written.
    sys.stdout.flush()
    os._exit(0)
