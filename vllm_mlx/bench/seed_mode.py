"""Single-request speed in this process, as the seed's vllm-mlx-bench measures it.

Text models: --prompts prompts, one at a time, each through the chat
template: time to first token, time per output token, generation and prompt
processing speed, latency, throughput, and the memory it took. Vision-language
models (detected, or --mllm): one image per resolution of a sweep, or with
--video one video per frame count. Inputs are made here when not given, as
real JPEG and MP4 files decoded by the same code as the media workers'.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from vllm_mlx.bench import report
from vllm_mlx.bench.inputs import data_url, encode_clip, jpeg, photo_like
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import media_pb2 as mpb

PROMPTS = [
    "Explain how a rainbow forms, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the causes of the French Revolution in a few paragraphs.",
    "Describe how to bake bread at home, from flour to loaf.",
    "Why is the sky blue? Answer for a curious ten-year-old.",
    "Compare the trade-offs of trains and planes for a 600 km journey.",
    "List ten practical tips for writing clear technical documentation.",
    "How does a hash table handle collisions? Give two strategies.",
    "Plan a three-day walking tour of an old European city.",
]
RESOLUTIONS = [(224, 224), (336, 336), (448, 448), (512, 512), (672, 672), (768, 768),
               (896, 896), (1024, 1024), (1280, 720), (1920, 1080)]
QUICK_RESOLUTIONS = [(224, 224), (512, 512), (1024, 1024), (1920, 1080)]
# (frames, fps): the seed's eight configurations, and three for --quick.
VIDEO_CONFIGS = [(2, 0.5), (4, 1.0), (6, 1.0), (8, 2.0), (12, 2.0), (16, 2.0), (24, 4.0),
                 (32, 4.0)]
QUICK_VIDEO_CONFIGS = [(2, 0.5), (8, 2.0), (16, 2.0)]
GENERATED_VIDEO_SECONDS = 10
GENERATED_VIDEO_FPS = 8
GB = 1e9


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help="a model folder, Hugging Face repo, or .gguf file")
    ap.add_argument("--prompts", type=int, default=5, help="prompts to run (text models)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens generated per prompt")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="sampling temperature (0: greedy)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before measuring")
    ap.add_argument("--mllm", action="store_true",
                    help="load as a vision-language model (detected from config.json otherwise)")
    ap.add_argument("--video", action="store_true",
                    help="the video sweep instead of the image sweep")
    ap.add_argument("--video-url", help="a video to use (http(s) or data: URL) instead of "
                                        "one made here")
    ap.add_argument("--video-path", help="a local video file to use")
    ap.add_argument("--quick", action="store_true",
                    help="fewer configurations: 4 resolutions, or 3 frame counts")


def run(args: argparse.Namespace) -> dict:
    from vllm_mlx.in_process import InProcessEngine
    from vllm_mlx.model_files.model_source import resolve_model
    from vllm_mlx.optimizations import detect_hardware
    from vllm_mlx.settings import EngineSettings, MediaSettings

    path = str(resolve_model(args.model))
    media = MediaSettings(model=path, allow_private_media_urls=True,
                          allowed_local_media_paths=_local_roots(args))
    # Bursts are not the question here: one request at a time, admitted at once.
    engine = InProcessEngine(path, EngineSettings(model=path, mllm=args.mllm or args.video,
                                                  admit_window_s=0.0), media)
    hardware = detect_hardware()
    try:
        if engine.facts.vision:
            results = _vision(engine, args)
        else:
            results = _text(engine, args)
    finally:
        engine.close()
    results.update(model=args.model, hardware=hardware.summary(),
                   resources=_resources())
    _print(results)
    return results


def _local_roots(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.video_path:
        return ()
    return (str(Path(args.video_path).resolve().parent),)


def _request(content: list[pb.ContentPart], args) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", parts=content)],
                          add_generation_prompt=True),
        max_tokens=args.max_tokens, sampling=pb.SamplingParams(temperature=args.temperature))


def _timed(engine, request: pb.GenerateRequest) -> dict:
    gen = engine.generate(request)
    first = None
    for delta in gen:
        if first is None and delta.token_ids:
            first = delta.time
    end = time.perf_counter()
    n = len(gen.token_ids)
    ttft = (first or end) - gen.submitted
    decode = end - (first or end)
    return {"prompt_tokens": gen.prompt_tokens, "output_tokens": n, "ttft_s": ttft,
            "latency_s": end - gen.submitted,
            "tpot_s": decode / (n - 1) if n > 1 else 0.0,
            "generation_tps": (n - 1) / decode if n > 1 and decode > 0 else 0.0,
            "processing_tps": gen.prompt_tokens / ttft if ttft > 0 else 0.0}


def _text(engine, args: argparse.Namespace) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]

    def request(text: str) -> pb.GenerateRequest:
        return _request([pb.ContentPart(text=text)], args)

    for i in range(args.warmup):
        engine.generate(request(PROMPTS[-1 - i % len(PROMPTS)])).wait()
    tic = time.perf_counter()
    runs = [_timed(engine, request(p)) for p in report.progress(prompts, "prompts")]
    total = time.perf_counter() - tic
    tokens_in = sum(r["prompt_tokens"] for r in runs)
    tokens_out = sum(r["output_tokens"] for r in runs)
    metrics = {k: report.summary([r[k] for r in runs])
               for k in ("ttft_s", "tpot_s", "generation_tps", "processing_tps", "latency_s")}
    return {"mode": "llm", "runs": runs, "total_runs": len(runs), "input_tokens": tokens_in,
            "output_tokens": tokens_out, "total_time_s": total, "metrics": metrics,
            "total_throughput_tps": (tokens_in + tokens_out) / total,
            "requests_per_s": len(runs) / total}


def _vision(engine, args: argparse.Namespace) -> dict:
    if args.video:
        source = _video_source(args)
        configs = QUICK_VIDEO_CONFIGS if args.quick else VIDEO_CONFIGS
        items = [(f"{frames} frames @ {fps:g}fps",
                  mpb.MediaSource(kind=mpb.MEDIA_KIND_VIDEO, fps=fps, max_frames=frames,
                                  **source), "What happens in this video?")
                 for frames, fps in configs]
    else:
        sizes = QUICK_RESOLUTIONS if args.quick else RESOLUTIONS
        items = [(f"{w}x{h}", mpb.MediaSource(kind=mpb.MEDIA_KIND_IMAGE,
                                              url=_image_url(w, h, i)),
                  "Describe this image in detail.") for i, (w, h) in enumerate(sizes)]

    def request(media: mpb.MediaSource, question: str) -> pb.GenerateRequest:
        return _request([pb.ContentPart(media=media), pb.ContentPart(text=question)],
                        args)

    for _ in range(args.warmup):
        engine.generate(request(items[0][1], items[0][2])).wait()
    rows = []
    for name, media, question in report.progress(items, "video" if args.video else "images"):
        r = _timed(engine, request(media, question))
        time_s = r["latency_s"]
        row = {"config": name, "time_s": time_s, "tokens": r["output_tokens"],
               "tokens_per_s": r["output_tokens"] / time_s if time_s > 0 else 0.0,
               "prompt_tokens": r["prompt_tokens"], "ttft_s": r["ttft_s"]}
        if args.video:
            row["frames"] = media.max_frames
        else:
            w, h = map(int, name.split("x"))
            row["pixels"] = w * h
        rows.append(row)
    return {"mode": "video" if args.video else "image", "rows": rows,
            "average_tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows)}


def _image_url(width: int, height: int, seed: int) -> str:
    return data_url(jpeg(photo_like(width, height, seed), 85))


def _video_source(args: argparse.Namespace) -> dict:
    if args.video_path:
        return {"path": str(Path(args.video_path).resolve())}
    if args.video_url:
        return {"url": args.video_url}
    clip = encode_clip(GENERATED_VIDEO_SECONDS, GENERATED_VIDEO_FPS, 320, 240)
    return {"url": data_url(clip, "video/mp4")}


def _resources() -> dict:
    import mlx.core as mx
    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS, in KiB on Linux.
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    vm = psutil.virtual_memory()
    return {"process_peak_rss_bytes": peak_bytes, "mlx_peak_memory_bytes": mx.get_peak_memory(),
            "mlx_cache_memory_bytes": mx.get_cache_memory(),
            "system_memory_used_bytes": vm.total - vm.available,
            "system_memory_total_bytes": vm.total, "system_memory_percent": vm.percent,
            "cpu_count": os.cpu_count()}


def _print(r: dict) -> None:
    print(report.banner("BENCHMARK RESULTS"))
    print()
    if r["mode"] == "llm":
        print(report.table([["Model", r["model"]], ["Hardware", r["hardware"]],
                            ["Total Runs", r["total_runs"]],
                            ["Input Tokens", f"{r['input_tokens']:,}"],
                            ["Output Tokens", f"{r['output_tokens']:,}"],
                            ["Total Time", f"{r['total_time_s']:.2f}s"]]))
        m = r["metrics"]
        print("\nPerformance Metrics:")
        print(report.table([
            ["TTFT (Time to First Token)", f"{m['ttft_s']['mean'] * 1e3:.1f} ms",
             f"{m['ttft_s']['p95'] * 1e3:.1f} ms"],
            ["TPOT (Time Per Output Token)", f"{m['tpot_s']['mean'] * 1e3:.2f} ms",
             f"{m['tpot_s']['p95'] * 1e3:.2f} ms"],
            ["Generation Speed", f"{m['generation_tps']['mean']:.1f} tok/s",
             f"{m['generation_tps']['max']:.1f} tok/s"],
            ["Processing Speed", f"{m['processing_tps']['mean']:.1f} tok/s", "-"],
            ["Latency (per request)", f"{m['latency_s']['mean']:.2f}s",
             f"{m['latency_s']['p95']:.2f}s"]], header=["Metric", "Mean", "P95/Max"]))
        print("\nThroughput:")
        print(report.table([["Total Throughput", f"{r['total_throughput_tps']:.1f} tok/s"],
                            ["Requests/Second", f"{r['requests_per_s']:.2f} req/s"]]))
    else:
        print(report.table([["Model", r["model"]], ["Hardware", r["hardware"]]]))
        print()
        video = r["mode"] == "video"
        rows = [[row["config"], row["frames"] if video else _pixels(row["pixels"]),
                 f"{row['time_s']:.2f}s", row["tokens"], f"{row['tokens_per_s']:.1f} tok/s"]
                for row in r["rows"]]
        print(report.table(rows, header=["Configuration" if video else "Resolution",
                                         "Frames" if video else "Pixels", "Time", "Tokens",
                                         "Speed"]))
        fastest = max(r["rows"], key=lambda row: row["tokens_per_s"])
        slowest = min(r["rows"], key=lambda row: row["tokens_per_s"])
        print(f"\nSummary: average {r['average_tokens_per_s']:.1f} tok/s; fastest at "
              f"{fastest['config']} ({fastest['tokens_per_s']:.1f} tok/s), slowest at "
              f"{slowest['config']} ({slowest['tokens_per_s']:.1f} tok/s)")
    res = r["resources"]
    print("\nResource Usage:")
    print(report.table([
        ["Process Memory (peak)", f"{res['process_peak_rss_bytes'] / GB:.2f} GB"],
        ["MLX Peak Memory", f"{res['mlx_peak_memory_bytes'] / GB:.2f} GB"],
        ["MLX Cache Memory", f"{res['mlx_cache_memory_bytes'] / GB:.2f} GB"],
        ["System Memory", f"{res['system_memory_used_bytes'] / GB:.1f} / "
                          f"{res['system_memory_total_bytes'] / GB:.0f} GB "
                          f"({res['system_memory_percent']:.0f}%)"]]))


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
