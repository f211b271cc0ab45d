"""The media worker as a process: real gRPC calls with images and videos made
here (Pillow, PyAV), URLs served by a test HTTP server on loopback, and local
files under (and outside) an allowed root."""

import base64
import http.server
import io
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, free_port, serve_http, terminate
from vllm_mlx.ipc.error_info import error_info
from vllm_mlx.supervision.health import wait_for_serving
from vllm_mlx.v1 import errors_pb2 as epb
from vllm_mlx.v1 import media_pb2 as pb
from vllm_mlx.v1 import media_pb2_grpc

IMAGE, VIDEO = pb.MEDIA_KIND_IMAGE, pb.MEDIA_KIND_VIDEO
FETCH_TIMEOUT_S = 1.5
MAX_BYTES = 3_000_000
MAX_PIXELS = 4_000_000
# The tiny model's processor (vllm_mlx/bench/test_models.py): Qwen2-VL patches.
PATCH, TEMPORAL, MERGE = 14, 2, 2
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


# -- media made here ---------------------------------------------------------------


def image_bytes(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png(size=(320, 240), color=(200, 30, 30)) -> bytes:
    return image_bytes(Image.new("RGB", size, color), "PNG")


def video_bytes(seconds: float, fps: int, size=(64, 48), fmt="mp4") -> bytes:
    """Frame i is a solid colour whose red channel is 4 * i, so a sampled
    frame tells which frame it was."""
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        stream.options = {"preset": "ultrafast", "qp": "0"}
        for i in range(round(seconds * fps)):
            frame = np.full((h, w, 3), (4 * i % 256, 128, 64), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- reading the tensors back --------------------------------------------------------


def tensors(item: pb.PreparedMedia) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(t.data, dtype=t.dtype).reshape(tuple(t.shape))
            for t in item.tensors}


def check_layout(item: pb.PreparedMedia) -> tuple[int, int, int]:
    """Asserts the Qwen2-VL tensor layout and token count; returns the grid."""
    t = tensors(item)
    video = item.kind == VIDEO
    pixels = t["pixel_values_videos" if video else "pixel_values"]
    grid = t["video_grid_thw" if video else "image_grid_thw"]
    assert grid.shape == (1, 3)
    gt, gh, gw = (int(x) for x in grid[0])
    assert pixels.shape == (gt * gh * gw, 3 * TEMPORAL * PATCH * PATCH)
    assert pixels.dtype == np.float32
    assert item.num_placeholder_tokens == gt * gh * gw // MERGE**2
    assert gt == (math.ceil(item.frames / TEMPORAL) if video else 1)
    return gt, gh, gw


def frame_rgb(item: pb.PreparedMedia) -> np.ndarray:
    """The mean RGB (0-255) of each frame the item was made from, undoing
    the processor's normalisation; (frames, 3)."""
    t = tensors(item)
    video = item.kind == VIDEO
    pixels = t["pixel_values_videos" if video else "pixel_values"]
    gt = int(t["video_grid_thw" if video else "image_grid_thw"][0][0])
    # Rows are (t, h, w) patches; columns are (channel, frame in group, y, x).
    p = pixels.reshape(gt, -1, 3, TEMPORAL, PATCH, PATCH).mean(axis=(1, 4, 5))
    rgb = p.transpose(0, 2, 1).reshape(gt * TEMPORAL, 3)
    return (rgb * STD + MEAN) * 255


# -- servers -----------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen
    address: str
    channel: grpc.Channel
    stub: media_pb2_grpc.MediaWorkerStub
    log_path: Path

    def prepare(self, *items: pb.MediaSource, timeout: float = 30) -> pb.PrepareResponse:
        return self.stub.Prepare(pb.PrepareRequest(request_id="t", items=list(items)),
                                 timeout=timeout)

    def refusal(self, *items: pb.MediaSource, timeout: float = 30, item: int = 0) -> str:
        """The reason item `item` was refused, which the call's ErrorInfo names."""
        with pytest.raises(grpc.RpcError) as err:
            self.prepare(*items, timeout=timeout)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        info = error_info(err.value)
        assert info is not None and info.code == epb.ERROR_CODE_MEDIA_REFUSED, info
        assert info.HasField("item") and info.item == item, info
        return err.value.details()

    def stop(self) -> None:
        self.channel.close()
        terminate(self.proc)


def launch_worker(model: Path, log_dir: Path, *flags: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log_path = log_dir / f"media-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "media_worker", "--model", str(model), "--port", str(port),
         *flags],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, port, log_path


def ready_worker(proc: subprocess.Popen, port: int, log_path: Path) -> Worker:
    address = f"127.0.0.1:{port}"
    try:
        wait_for_serving(address, 120, is_alive=lambda: proc.poll() is None)
    except Exception:
        proc.kill()
        raise RuntimeError(f"media worker failed to start:\n{log_path.read_text()}") from None
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    return Worker(proc, address, channel, media_pb2_grpc.MediaWorkerStub(channel), log_path)


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the worker stopped reading (a refused oversized body)

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/redirect": lambda: self._send(302, headers={"Location": "/img.png"}),
            "/redirect-ip": lambda: self._send(
                302, headers={"Location": f"http://127.0.0.1:{port}/img.png"}),
            "/redirect-private": lambda: self._send(
                302, headers={"Location": f"http://127.0.0.2:{port}/img.png"}),
            "/redirect-file": lambda: self._send(302, headers={"Location": "file:///etc/passwd"}),
            "/loop": lambda: self._send(302, headers={"Location": "/loop"}),
            "/big": lambda: self._send(200, b"\0" * (MAX_BYTES + 1)),
            "/big-no-length": lambda: self._send(200, b"\0" * (MAX_BYTES + 1), length=False),
        }
        if self.path in routes:
            routes[self.path]()
        elif self.path == "/drip":
            # Headers at once, then a byte every 0.2 s: only a total deadline stops it.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path in self.files:
            self._send(200, self.files[self.path], {"Content-Type": "application/octet-stream"})
        else:
            self._send(404)


@pytest.fixture(scope="module")
def http_port():
    Handler.files = {"/img.png": png((64, 64), (10, 200, 10)),
                     "/clip.mp4": video_bytes(2, 10)}
    yield from serve_http(Handler)


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("media")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "cat.png").write_bytes(png((100, 80), (30, 30, 200)))
    (root / "clip.mp4").write_bytes(video_bytes(2, 10))
    (outside / "secret.png").write_bytes(png())
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "inner-link.png").symlink_to(root / "sub" / "cat.png")
    return root, outside


@pytest.fixture(scope="module")
def workers(tiny_vlm, media_dirs, tmp_path_factory):
    """`strict`: the default URL guard, an allowed root and small caps.
    `open`: private URLs allowed but only the host name `localhost`."""
    logs = tmp_path_factory.mktemp("media-logs")
    caps = ["--max-media-bytes", str(MAX_BYTES), "--max-image-pixels", str(MAX_PIXELS),
            "--media-fetch-timeout", str(FETCH_TIMEOUT_S)]
    launched = {
        "strict": launch_worker(tiny_vlm, logs, *caps, "--allowed-local-media-path",
                                str(media_dirs[0]), "--max-video-frames", "8",
                                "--max-video-fps", "5", "--max-video-seconds", "20"),
        "open": launch_worker(tiny_vlm, logs, *caps, "--allow-private-media-urls",
                              "--allowed-media-domains", "localhost",
                              "--max-media-redirects", "3"),
    }
    started = {name: ready_worker(*args) for name, args in launched.items()}
    yield started
    for w in started.values():
        w.stop()


@pytest.fixture
def strict(workers) -> Worker:
    return workers["strict"]


@pytest.fixture
def open_worker(workers) -> Worker:
    return workers["open"]


def image_url(url: str) -> pb.MediaSource:
    return pb.MediaSource(kind=IMAGE, url=url)


# -- images ------------------------------------------------------------------------


def test_png_data_url(strict):
    item = strict.prepare(image_url(data_url(png((320, 240)), "image/png"))).items[0]
    assert item.kind == IMAGE and item.frames == 1
    assert (item.width, item.height) == (320, 240)
    gt, gh, gw = check_layout(item)
    assert gw > gh  # landscape stays landscape
    assert np.allclose(frame_rgb(item)[0], (200, 30, 30), atol=2)
    assert len(item.content_hash) == 64 and item.prepare_seconds > 0
    assert item.placeholder_token_id == strict_token_id(strict, "<|image_pad|>")


def strict_token_id(worker: Worker, token: str) -> int:
    from transformers import AutoTokenizer

    model = worker.proc.args[worker.proc.args.index("--model") + 1]
    return AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(token)


def test_jpeg_exif_rotation_is_applied(strict):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    data = image_bytes(Image.new("RGB", (200, 100), (250, 250, 0)), "JPEG", exif=exif)
    item = strict.prepare(image_url(data_url(data, "image/jpeg"))).items[0]
    assert (item.width, item.height) == (100, 200)
    _, gh, gw = check_layout(item)
    assert gh > gw


@pytest.mark.parametrize("name, data, rgb", [
    # Transparent pixels are shown over white.
    ("rgba", image_bytes(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
    ("rgba-opaque", image_bytes(Image.new("RGBA", (64, 64), (0, 0, 255, 255)), "PNG"),
     (0, 0, 255)),
    ("la", image_bytes(Image.new("LA", (64, 64), (100, 255)), "PNG"), (100, 100, 100)),
    ("p", image_bytes(Image.new("RGB", (64, 64), (0, 128, 0)).convert("P"), "PNG"),
     (0, 128, 0)),
    ("cmyk", image_bytes(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=100),
     (255, 0, 0)),
    # 16-bit greyscale keeps its scale (32768 of 65535 is mid grey, not white).
    ("i16", image_bytes(Image.fromarray(np.full((64, 64), 32768, np.uint16)), "PNG"),
     (128, 128, 128)),
])
def test_image_modes_become_rgb(strict, name, data, rgb):
    item = strict.prepare(image_url(data_url(data, "image/png"))).items[0]
    check_layout(item)
    assert np.allclose(frame_rgb(item)[0], rgb, atol=3), name


def test_animated_gif_takes_the_first_frame(strict):
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    item = strict.prepare(image_url(data_url(buf.getvalue(), "image/gif"))).items[0]
    assert item.frames == 1
    assert np.allclose(frame_rgb(item)[0], (255, 0, 0), atol=3)


def test_corrupt_and_truncated_images_are_refused(strict):
    data = image_bytes(Image.effect_noise((256, 256), 60).convert("RGB"), "PNG")
    reason = strict.refusal(image_url(data_url(data[: len(data) // 2], "image/png")))
    assert "truncated or corrupt" in reason
    reason = strict.refusal(image_url(data_url(b"this is not an image" * 10, "image/png")))
    assert reason == "not a recognised image format"


def test_pixel_bomb_is_refused_from_the_header(strict):
    # 5000 x 1000 of one colour compresses to a few kB; decoding would not.
    data = image_bytes(Image.new("L", (5000, 1000)), "PNG", optimize=True)
    assert len(data) < 50_000
    start = time.monotonic()
    reason = strict.refusal(image_url(data_url(data, "image/png")))
    assert "5000x1000" in reason and str(MAX_PIXELS) in reason
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,!!not base64!!", "not valid base64"),
    ("data:image/png," + "x" * 20, "base64"),
    (data_url(png(), "video/mp4"), "not an image"),
    ("file:///etc/passwd", "outside the allowed media paths"),
    ("file://example.com/etc/passwd", "another host"),
    ("ftp://example.com/a.png", "scheme 'ftp' is not allowed"),
    ("/etc/passwd", "not a URL"),
])
def test_bad_urls_are_refused(strict, url, words):
    reason = strict.refusal(image_url(url))
    assert words in reason, reason


def test_data_url_over_the_byte_cap_is_refused(strict):
    reason = strict.refusal(image_url(data_url(b"\0" * (MAX_BYTES + 10), "image/png")))
    assert "over the limit" in reason


# -- URLs --------------------------------------------------------------------------


def test_url_fetched_when_private_addresses_are_allowed(open_worker, http_port):
    item = open_worker.prepare(image_url(f"http://localhost:{http_port}/img.png")).items[0]
    assert (item.width, item.height) == (64, 64)
    assert np.allclose(frame_rgb(item)[0], (10, 200, 10), atol=2)
    redirected = open_worker.prepare(image_url(f"http://localhost:{http_port}/redirect"))
    assert redirected.items[0].content_hash == item.content_hash


def test_loopback_url_refused_by_default(strict, http_port):
    for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0", "169.254.169.254"):
        reason = strict.refusal(image_url(f"http://{host}:{http_port}/img.png"))
        assert "private, loopback, link-local or reserved" in reason, reason


def test_every_redirect_is_checked(open_worker, http_port):
    base = f"http://localhost:{http_port}"
    reason = open_worker.refusal(image_url(f"{base}/redirect-ip"))
    assert "'127.0.0.1' is not in the allowed media domains" in reason
    assert "scheme 'file'" in open_worker.refusal(image_url(f"{base}/redirect-file"))
    assert "redirected more than 3 times" in open_worker.refusal(image_url(f"{base}/loop"))
    assert "HTTP 404" in open_worker.refusal(image_url(f"{base}/nothing-here"))


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_oversized_download_is_refused(open_worker, http_port, path):
    reason = open_worker.refusal(image_url(f"http://localhost:{http_port}{path}"))
    assert "over the limit" in reason and str(MAX_BYTES) in reason


@pytest.mark.parametrize("path", ["silent", "/drip"])
def test_fetch_that_times_out_is_refused_within_the_timeout(open_worker, http_port,
                                                            silent_port, path):
    port = silent_port if path == "silent" else http_port
    url = f"http://localhost:{port}{'/' if path == 'silent' else path}"
    start = time.monotonic()
    reason = open_worker.refusal(image_url(url))
    elapsed = time.monotonic() - start
    assert "longer than the timeout" in reason
    assert FETCH_TIMEOUT_S * 0.8 < elapsed < FETCH_TIMEOUT_S + 1.0


# -- local paths -------------------------------------------------------------------


def test_local_paths(strict, open_worker, media_dirs):
    root, outside = media_dirs
    item = strict.prepare(pb.MediaSource(kind=IMAGE, path=str(root / "sub" / "cat.png")))
    assert (item.items[0].width, item.items[0].height) == (100, 80)
    # A link that stays inside the root is fine.
    strict.prepare(pb.MediaSource(kind=IMAGE, path=str(root / "inner-link.png")))
    for path in (outside / "secret.png", root / ".." / "outside" / "secret.png",
                 root / "sub" / ".." / ".." / "outside" / "secret.png", root / "link.png"):
        reason = strict.refusal(pb.MediaSource(kind=IMAGE, path=str(path)))
        assert "outside the allowed media paths" in reason, path
    assert "does not exist" in strict.refusal(pb.MediaSource(kind=IMAGE, path=str(root / "x")))
    assert "not a regular file" in strict.refusal(pb.MediaSource(kind=IMAGE, path=str(root)))
    # No root given: no local file at all.
    reason = open_worker.refusal(pb.MediaSource(kind=IMAGE, path=str(root / "sub" / "cat.png")))
    assert "local media paths are not allowed" in reason
    # file:// URLs are local paths, under the same roots (as vLLM takes them).
    cat = (root / "sub" / "cat.png").resolve()
    for url in (cat.as_uri(), "file://localhost" + cat.as_uri().removeprefix("file://")):
        item = strict.prepare(image_url(url)).items[0]
        assert (item.width, item.height) == (100, 80)
    for url in ((outside / "secret.png").resolve().as_uri(), (root / "link.png").as_uri()):
        assert "outside the allowed media paths" in strict.refusal(image_url(url))
    assert "local media paths are not allowed" in open_worker.refusal(image_url(cat.as_uri()))


# -- video -------------------------------------------------------------------------


def video_item(fps: float = 0, max_frames: int = 0, **source) -> pb.MediaSource:
    return pb.MediaSource(kind=VIDEO, fps=fps, max_frames=max_frames, **source)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return video_bytes(6, 10)  # 60 frames


@pytest.mark.parametrize("fps, max_frames, frames", [
    (1, 0, 6),    # 6 s at 1 fps; the default cap (16, capped at 8) does not bind
    (2, 0, 8),    # 6 s at 2 fps is 12, over the server's cap of 8
    (1, 4, 4),    # 6 s at 1 fps is 6, capped at 4
    (0, 3, 3),    # the default fps (2) gives 12, capped at 3
    (10, 0, 8),   # 10 fps is capped at the server's 5: 30 frames, then at its 8 frames
    (4, 100, 8),  # a request's cap is capped by the server's
])
def test_video_fps_and_max_frames(strict, clip, fps, max_frames, frames):
    item = strict.prepare(video_item(fps, max_frames, url=data_url(clip, "video/mp4"))).items[0]
    assert item.kind == VIDEO and item.frames == frames
    assert (item.width, item.height) == (64, 48)
    check_layout(item)
    # Which source frames were taken: evenly spread over the whole clip.
    index = frame_rgb(item)[:frames, 0] / 4
    step = 60 / frames
    assert np.allclose(index, (np.arange(frames) + 0.5) * step, atol=1.0), index


def test_video_by_path_and_url(strict, open_worker, media_dirs, http_port):
    item = strict.prepare(video_item(2, 0, path=str(media_dirs[0] / "clip.mp4"))).items[0]
    assert item.frames == 4
    item = open_worker.prepare(video_item(2, 0, url=f"http://localhost:{http_port}/clip.mp4"))
    assert item.items[0].frames == 4


def test_bad_videos_are_refused(strict, clip):
    reason = strict.refusal(video_item(url=data_url(clip[: len(clip) // 2], "video/mp4")))
    assert "video" in reason
    mkv = video_bytes(3, 10, fmt="matroska")
    assert "truncated" in strict.refusal(video_item(url=data_url(mkv[: len(mkv) // 2],
                                                                 "video/x-matroska")))
    assert "cannot read the video" in strict.refusal(
        video_item(url=data_url(b"\0\1garbage" * 100, "video/mp4")))
    assert "not a video" in strict.refusal(video_item(url=data_url(png(), "image/png")))
    long = video_bytes(25, 1, size=(32, 32))
    assert "25.0 s long, over the limit of 20 s" in strict.refusal(
        video_item(url=data_url(long, "video/mp4")))
    assert "fps must be a positive number" in strict.refusal(
        video_item(fps=-1, url=data_url(clip, "video/mp4")))


# -- several items, hashes ---------------------------------------------------------


def test_two_items_in_one_call(strict, clip):
    img = image_url(data_url(png(), "image/png"))
    vid = video_item(1, 0, url=data_url(clip, "video/mp4"))
    items = strict.prepare(img, vid).items
    assert [i.kind for i in items] == [IMAGE, VIDEO]
    assert items[1].frames == 6
    assert items[0].placeholder_token_id != items[1].placeholder_token_id
    reason = strict.refusal(img, image_url("data:image/png;base64,AAAA"), item=1)
    assert not reason.startswith("item"), reason  # the index is data, not text


def test_items_in_shared_memory_equal_the_inline_ones(strict, clip):
    """Asked for shared memory, the worker puts each item's tensors in a
    segment of its own, whose owner is the caller: the same arrays as an
    inline reply, and gone once the caller unlinks them."""
    from tests.test_shared_tensors import segment_exists
    from vllm_mlx.ipc.shared_tensors import SharedTensors, take, unlink

    items = [image_url(data_url(png((320, 240)), "image/png")),
             video_item(1, 0, url=data_url(clip, "video/mp4"))]
    inline = strict.prepare(*items).items
    shared = strict.stub.Prepare(pb.PrepareRequest(request_id="s", items=items,
                                                   shared_memory=True, owner_pid=os.getpid()),
                                 timeout=30).items
    names = [it.shm_name for it in shared]
    assert all(names) and len(set(names)) == 2 and not any(it.shm_name for it in inline)
    assert all(not t.data for it in shared for t in it.tensors)
    got = take(SharedTensors([(it.shm_name, [(t.name, np.dtype(t.dtype).str, tuple(t.shape),
                                              t.offset) for t in it.tensors])
                              for it in shared]))
    for want, have in zip(inline, got):
        expected = tensors(want)
        assert sorted(have) == sorted(expected)
        for k, a in expected.items():
            assert have[k].dtype == a.dtype and np.array_equal(have[k], a)
    for name in names:
        unlink(name)
        assert not segment_exists(name)


def test_segments_of_a_caller_that_died_are_freed(strict):
    """A caller killed before it could unlink its segments (SIGKILL gives it
    no chance) does not leave them in memory until a reboot: the worker frees
    them within seconds, and leaves a live caller's alone."""
    from tests.test_shared_tensors import segment_exists
    from vllm_mlx.ipc.shared_tensors import unlink

    item = image_url(data_url(png((64, 48)), "image/png"))
    mine = strict.stub.Prepare(pb.PrepareRequest(
        request_id="owner-me", items=[item], shared_memory=True, owner_pid=os.getpid()),
        timeout=30).items[0].shm_name
    # Another caller, which asks for a segment of its own and is then killed.
    owner = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time, grpc
from vllm_mlx.v1 import media_pb2 as pb, media_pb2_grpc
stub = media_pb2_grpc.MediaWorkerStub(grpc.insecure_channel({strict.address!r}))
item = pb.MediaSource.FromString({item.SerializeToString()!r})
reply = stub.Prepare(pb.PrepareRequest(request_id="owner-them", items=[item],
                                       shared_memory=True, owner_pid=os.getpid()), timeout=30)
print(reply.items[0].shm_name, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        theirs = owner.stdout.readline().strip()
        assert theirs and segment_exists(mine) and segment_exists(theirs)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 15
    while segment_exists(theirs) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not segment_exists(theirs), "the dead caller's segment is still there"
        assert segment_exists(mine), "a live caller's segment must stay until it frees it"
    finally:
        unlink(mine)


@pytest.mark.parametrize("owner", ["zero", "init", "another live process"])
def test_shared_memory_needs_the_callers_own_pid(strict, owner):
    """Segments of a made-up owner would never be freed: the worker only
    frees those of owners that died. So the owner must be the caller."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = {"zero": 0, "init": 1, "another live process": bystander.pid}[owner]
        with pytest.raises(grpc.RpcError) as info:
            strict.stub.Prepare(pb.PrepareRequest(
                request_id="bogus", shared_memory=True, owner_pid=pid,
                items=[image_url(data_url(png((32, 32)), "image/png"))]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not the calling process" in info.value.details()
        assert error_info(info.value) == epb.ErrorInfo(code=epb.ERROR_CODE_INVALID_ARGUMENT,
                                                       field="owner_pid")
    finally:
        bystander.kill()
        bystander.wait()


def test_content_hash_covers_bytes_and_options(strict, clip):
    a, b = strict.prepare(image_url(data_url(png(), "image/png")),
                          image_url(data_url(png(), "image/png"))).items
    assert a.content_hash == b.content_hash and a.tensors == b.tensors
    c = strict.prepare(image_url(data_url(png(color=(1, 2, 3)), "image/png"))).items[0]
    assert c.content_hash != a.content_hash
    url = data_url(clip, "video/mp4")
    v1, v2, again = strict.prepare(video_item(1, 0, url=url), video_item(2, 0, url=url),
                                   video_item(1, 0, url=url)).items
    assert v1.content_hash != v2.content_hash  # the sampling options shape the tensors
    assert v1.content_hash == again.content_hash


# -- the process -------------------------------------------------------------------


def test_health_and_reflection(strict):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(strict.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="vllm_mlx.v1.MediaWorker"),
                         timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(strict.channel)
    answers = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5)
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert "vllm_mlx.v1.MediaWorker" in names


def test_health_answers_while_media_is_decoded(strict):
    """Decoding runs on worker threads: the event loop keeps answering."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rng = np.random.default_rng(0)
    items = [image_url(data_url(image_bytes(Image.fromarray(
        rng.integers(0, 255, (1080, 1920, 3), np.uint8)), "JPEG", quality=50), "image/jpeg"))
        for _ in range(6)]
    call = strict.stub.Prepare.future(pb.PrepareRequest(request_id="h", items=items), timeout=60)
    health = health_pb2_grpc.HealthStub(strict.channel)
    waits = []
    while not call.done():
        start = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        waits.append(time.monotonic() - start)
    assert len(call.result().items) == 6
    # A blocked loop would answer only once the whole call is done; the bound
    # is loose because two shared cores stall any process now and then.
    assert len(waits) >= 3 and max(waits) < 2.0, waits


def test_killed_worker_fails_the_call_at_once(tiny_vlm, silent_port, tmp_path):
    """A worker that dies mid-request gives its client UNAVAILABLE, not a hang."""
    worker = ready_worker(*launch_worker(tiny_vlm, tmp_path, "--allow-private-media-urls",
                                         "--media-fetch-timeout", "60"))
    try:
        call = worker.stub.Prepare.future(pb.PrepareRequest(
            request_id="k", items=[image_url(f"http://127.0.0.1:{silent_port}/")]), timeout=60)
        time.sleep(0.5)
        assert not call.done()
        start = time.monotonic()
        os.kill(worker.proc.pid, 9)
        with pytest.raises(grpc.RpcError) as err:
            call.result()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 5
    finally:
        worker.stop()


# -- the address guard, in-process ---------------------------------------------------
# Without a network the worker cannot be shown a public address that redirects
# to a private one; these tests stand 127.0.0.1 in for "public" instead.


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::1", False),
])
def test_is_public(address, public):
    import ipaddress

    from media_worker.fetch import is_public

    assert is_public(ipaddress.ip_address(address)) is public


def test_redirect_to_a_private_address_is_refused(http_port, monkeypatch):
    import ipaddress

    from media_worker import fetch
    from media_worker.errors import MediaError

    monkeypatch.setattr(fetch, "is_public", lambda ip: ip == ipaddress.ip_address("127.0.0.1"))
    policy = fetch.FetchPolicy(timeout_s=FETCH_TIMEOUT_S)
    body, _ = fetch.fetch_url(f"http://127.0.0.1:{http_port}/redirect", policy)
    assert body == Handler.files["/img.png"]
    Handler.files["/to-private"] = b""
    with pytest.raises(MediaError, match="resolves to 127.0.0.2, a private"):
        # /redirect-ip points at 127.0.0.1; go through a hop to 127.0.0.2 instead.
        fetch.fetch_url(f"http://127.0.0.2:{http_port}/img.png", policy)


def test_each_hop_resolves_once_and_connects_to_what_was_checked(http_port, monkeypatch):
    """DNS rebinding: a second lookup answering a private address is never made."""
    import ipaddress

    from media_worker import fetch

    answers = iter(["127.0.0.1", "127.0.0.2"])
    calls = []
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host != "media.example":  # connecting to an address looks it up too
            return real_getaddrinfo(host, port, *args, **kwargs)
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(fetch.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(fetch, "is_public", lambda ip: ip == ipaddress.ip_address("127.0.0.1"))
    body, _ = fetch.fetch_url(f"http://media.example:{http_port}/img.png",
                              fetch.FetchPolicy(timeout_s=FETCH_TIMEOUT_S))
    assert body == Handler.files["/img.png"] and calls == ["media.example"]
