"""Media preparation figures (not a timed test).

    .venv/bin/python scripts/bench_media.py --out docs/bench/cpu-media.json

1. Images by resolution: decode + the model's preprocessing, in-process, and
   the round trip of Prepare through a real media worker process.
2. Video by sampled frame count, from a 10 s 1080p H.264 clip.
3. PyAV against OpenCV decoding that clip (all frames, and 16 sampled).

Two processor profiles: the tiny test model's (scripts/make_test_models.py:
images capped at 752,640 pixels, video frames at 100,352) and Qwen2-VL-7B's
shipped preprocessor_config.json (max_pixels 12,845,056 for both, so 1080p is
preprocessed at full size).
"""

import argparse
import base64
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from media_worker.images import decode_image  # noqa: E402
from media_worker.processor import Preprocessor  # noqa: E402
from media_worker.video import decode_video  # noqa: E402
from scripts.make_test_models import build_vlm_model  # noqa: E402

IMAGE_SIZES = [(224, 224), (512, 512), (1280, 720), (1920, 1080)]
FRAME_COUNTS = [2, 4, 8, 16, 32]
BIG = 10**9  # caps that never bind here


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: compresses and decodes like a photo, not
    like a flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def encode_clip(seconds: int, fps: int, w: int, h: int) -> bytes:
    """An H.264 (yuv420p, x264 'veryfast') MP4 with moving content."""
    img = np.asarray(photo_like(w + seconds * fps * 4, h))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(seconds * fps):
            frame = np.ascontiguousarray(img[:, i * 4:i * 4 + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def profile_model(base: Path, name: str) -> Path:
    if name == "tiny":
        return base
    path = base.parent / f"{base.name}-{name}"
    shutil.copytree(base, path, dirs_exist_ok=True)
    for cfg in ("preprocessor_config.json", "video_preprocessor_config.json"):
        data = json.loads((path / cfg).read_text())
        data["max_pixels"] = data["size"]["longest_edge"] = 12845056
        (path / cfg).write_text(json.dumps(data, indent=2))
    return path


# -- in-process ----------------------------------------------------------------------


def bench_images(pre: Preprocessor, reps: int) -> list[dict]:
    rows = []
    for w, h in IMAGE_SIZES:
        data = io.BytesIO()
        photo_like(w, h).save(data, "JPEG", quality=90)
        data = data.getvalue()
        decode_s, img = timed(lambda d=data: decode_image(d, BIG), reps)
        pre_s, out = timed(lambda i=img: pre.image(i), reps)
        rows.append({"size": f"{w}x{h}", "jpeg_bytes": len(data), "decode_s": decode_s,
                     "preprocess_s": pre_s, "total_s": decode_s + pre_s,
                     "tokens": out.num_placeholder_tokens,
                     "tensor_bytes": int(sum(a.nbytes for a in out.tensors.values()))})
        print(f"  image {w}x{h}: decode {decode_s * 1000:.1f} ms, preprocess "
              f"{pre_s * 1000:.1f} ms, {out.num_placeholder_tokens} tokens", flush=True)
    return rows


def bench_video(pre: Preprocessor, clip: bytes, reps: int) -> list[dict]:
    rows = []
    for n in FRAME_COUNTS:
        # fps high enough that max_frames is what binds: n frames over the clip.
        decode_s, video = timed(lambda k=n: decode_video(clip, 30.0, k, BIG, BIG), reps)
        pre_s, out = timed(lambda v=video: pre.video(v.frames), reps)
        rows.append({"frames": len(video.frames), "decode_s": decode_s, "preprocess_s": pre_s,
                     "total_s": decode_s + pre_s, "tokens": out.num_placeholder_tokens,
                     "tensor_bytes": int(sum(a.nbytes for a in out.tensors.values()))})
        print(f"  video {n} frames: decode {decode_s * 1000:.0f} ms, preprocess "
              f"{pre_s * 1000:.0f} ms, {out.num_placeholder_tokens} tokens", flush=True)
    return rows


# -- PyAV against OpenCV -------------------------------------------------------------


def pyav_all(clip: bytes, threads: bool) -> int:
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
    import cv2

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        # OpenCV reads only from a file (or a device): the bytes go to disk first.
        write_s, _ = timed(lambda: (f.seek(0), f.write(clip), f.flush()), 1)
        rows = {
            "pyav_all_frames_threads_auto_s": timed(lambda: pyav_all(clip, True), reps)[0],
            "pyav_all_frames_one_thread_s": timed(lambda: pyav_all(clip, False), reps)[0],
            "opencv_all_frames_s": timed(lambda: opencv_all(f.name), reps)[0],
            "pyav_16_sampled_s":  # the worker's decode_video
                timed(lambda: decode_video(clip, 30.0, 16, BIG, BIG), reps)[0],
            "opencv_16_sampled_s": timed(lambda: opencv_sampled(f.name, 16), reps)[0],
            "opencv_temp_file_write_s": write_s,
            "opencv_version": cv2.__version__, "pyav_version": av.__version__,
            "frames_decoded": pyav_all(clip, True),
        }
    for k, v in rows.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    return rows


# -- through a worker process --------------------------------------------------------


def bench_grpc(model: Path, clip: bytes, reps: int) -> dict:
    import grpc

    from vllm_mlx.supervision.health import wait_for_serving
    from vllm_mlx.v1 import media_pb2 as pb
    from vllm_mlx.v1 import media_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "clip.mp4").write_bytes(clip)
        port = 50000 + os.getpid() % 10000
        proc = subprocess.Popen(
            [sys.executable, "-m", "media_worker", "--model", str(model), "--port", str(port),
             "--allowed-local-media-path", tmp, "--max-video-frames", "64"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            wait_for_serving(f"127.0.0.1:{port}", 120, is_alive=lambda: proc.poll() is None)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                            options=[("grpc.max_receive_message_length", -1)])
            stub = media_pb2_grpc.MediaWorkerStub(channel)
            images, videos = [], []
            for seed, (w, h) in enumerate(IMAGE_SIZES):
                buf = io.BytesIO()
                # A different image each rep: the worker caches by content hash.
                urls = []
                for rep in range(reps):
                    photo_like(w, h, seed=seed * 100 + rep + 1).save(buf, "JPEG", quality=90)
                    urls.append("data:image/jpeg;base64," +
                                base64.b64encode(buf.getvalue()).decode())
                    buf.seek(0)
                    buf.truncate()
                rtt = []
                for url in urls:
                    t = time.perf_counter()
                    stub.Prepare(pb.PrepareRequest(request_id="b", items=[
                        pb.MediaSource(kind=pb.MEDIA_KIND_IMAGE, url=url)]), timeout=60)
                    rtt.append(time.perf_counter() - t)
                images.append({"size": f"{w}x{h}", "round_trip_s": statistics.median(rtt)})
                print(f"  gRPC image {w}x{h}: {statistics.median(rtt) * 1000:.1f} ms", flush=True)
            for n in FRAME_COUNTS:
                rtt = []
                for rep in range(reps):
                    # fps differs per rep so that the cache never answers.
                    item = pb.MediaSource(kind=pb.MEDIA_KIND_VIDEO, path=f"{tmp}/clip.mp4",
                                          fps=29.0 - rep * 0.01, max_frames=n)
                    t = time.perf_counter()
                    stub.Prepare(pb.PrepareRequest(request_id="b", items=[item]), timeout=120)
                    rtt.append(time.perf_counter() - t)
                videos.append({"frames": n, "round_trip_s": statistics.median(rtt)})
                print(f"  gRPC video {n} frames: {statistics.median(rtt) * 1000:.0f} ms",
                      flush=True)
            channel.close()
            return {"images": images, "videos": videos}
        finally:
            proc.terminate()
            proc.wait()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    ap.add_argument("--reps", type=int, default=3, help="runs per figure (median kept)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = build_vlm_model(Path(tmp) / "tiny-qwen2-vl").resolve()
        print("encoding a 10 s 1080p clip ...", flush=True)
        t = time.perf_counter()
        clip = encode_clip(10, 30, 1920, 1080)
        print(f"  {len(clip)} bytes in {time.perf_counter() - t:.1f} s", flush=True)
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(),
                        "system": f"{platform.system()} {platform.machine()}",
                        "python": platform.python_version(),
                        "loadavg_at_start": os.getloadavg()},
            "clip": {"seconds": 10, "fps": 30, "size": "1920x1080", "codec": "h264 yuv420p",
                     "bytes": len(clip)},
            "reps": a.reps, "profiles": {},
        }
        print("PyAV against OpenCV, 10 s 1080p:", flush=True)
        result["decoders"] = bench_decoders(clip, a.reps)
        for name in ("tiny", "qwen2-vl-7b"):
            pre = Preprocessor(str(profile_model(base, name)))
            print(f"profile {name}:", flush=True)
            result["profiles"][name] = {"images": bench_images(pre, a.reps),
                                        "videos": bench_video(pre, clip, a.reps)}
        print("through a worker process (profile tiny):", flush=True)
        result["grpc_tiny"] = bench_grpc(base, clip, a.reps)
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
