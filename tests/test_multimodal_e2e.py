"""Issue 5 end to end: `vllm-mlx-up` with the tiny VLM (gateway, engine, two
media workers, all real processes on loopback) driven through the OpenAI SDK
with images and videos made here (Pillow, PyAV), a local HTTP server for URLs,
and files under (and outside) an allowed root.

Two stacks: `stack` keeps the default URL guard (loopback refused) and allows
one local root; `open_stack` allows private URLs with a short fetch timeout,
and is the one whose media worker is killed (last test)."""

import http.server
import io
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.conftest import serve_http, wait_until
from tests.test_media_worker import data_url, image_bytes, png, video_bytes
from tests.test_supervisor import Up, pid_alive

FETCH_TIMEOUT_S = 2.0    # the open stack's --media-fetch-timeout
SLOW_BODY_S = 0.8        # /slow.png takes this long to send (under the fetch timeout)
MAX_TOKENS = 6
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # vllm_mlx.settings.MediaSettings


# -- media made here ---------------------------------------------------------------


def noise_png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "PNG")


def png_url(data: bytes) -> str:
    return data_url(data, "image/png")


CLIP = video_bytes(4, 10)  # 4 s at 10 fps, 64x48: 40 frames
CLIP_SIZE = (48, 64)       # (height, width) of each frame


# -- content parts -----------------------------------------------------------------


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_url(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def image_path(path) -> dict:
    return {"type": "image", "image": str(path)}


def video_path(path) -> dict:
    return {"type": "video", "video": str(path)}


def ask(client: openai.OpenAI, *parts, max_tokens: int = MAX_TOKENS, **extra):
    """A greedy chat completion of exactly `max_tokens` tokens."""
    content = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else list(parts)
    r = client.chat.completions.create(
        model="default", max_tokens=max_tokens, temperature=0,
        messages=[{"role": "user", "content": content}],
        extra_body={"ignore_eos": True, **extra})
    assert r.usage.completion_tokens == max_tokens, r
    return r


def refusal(client: openai.OpenAI, *parts, param: str = "messages[0].content[0]",
            **extra) -> str:
    """Asserts a 400 naming the content part `param`; returns the message."""
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, *parts, **extra)
    assert info.value.status_code == 400
    error = info.value.response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error", error
    return error["message"]


# -- the expected placeholder counts, from the model's own processor -----------------


class Counts:
    """Placeholder tokens the tiny model's processor gives an image or a clip
    of n frames: the observable the engine's prompt_tokens reports."""

    def __init__(self, model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from mlx_vlm.utils import get_model_and_args, load_processor

        config = json.loads((model / "config.json").read_text())
        get_model_and_args(config, model)  # registers mlx-vlm's processor for the type
        self.processor = load_processor(str(model), add_detokenizer=False)

    def _tokens(self, grid, sub) -> int:
        return int(np.prod(grid[0])) // (int(sub.merge_size) ** 2)

    def image(self, data: bytes) -> int:
        sub = self.processor.image_processor
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return self._tokens(sub(images=[img], return_tensors="np")["image_grid_thw"], sub)

    def video(self, frames: int, size=CLIP_SIZE) -> int:
        sub = self.processor.video_processor
        clip = [np.zeros((*size, 3), np.uint8)] * frames
        return self._tokens(sub(videos=[clip], return_tensors="np")["video_grid_thw"], sub)


@pytest.fixture(scope="module")
def counts(tiny_vlm) -> Counts:
    return Counts(tiny_vlm)


# -- servers -----------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path == "/slow.png":
            body = self.files["/img.png"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            chunks = 8
            step = -(-len(body) // chunks)
            try:
                for i in range(chunks):
                    time.sleep(SLOW_BODY_S / chunks)
                    self.wfile.write(body[i * step:(i + 1) * step])
                    self.wfile.flush()
            except OSError:
                pass  # the worker was killed mid-download
            return
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def http_port():
    Handler.files = {"/img.png": noise_png(80, 60, 7)}
    Handler.hits = []
    yield from serve_http(Handler)


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("media")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "cat.png").write_bytes(noise_png(100, 80, 11))
    (root / "clip.mp4").write_bytes(CLIP)
    (outside / "secret.png").write_bytes(png((64, 64)))
    (root / "link.png").symlink_to(outside / "secret.png")
    return root, outside


@pytest.fixture(scope="module")
def stacks(tiny_vlm, media_dirs, tmp_path_factory):
    """Both stacks, started side by side (the workers load while the engines do)."""
    ups = {
        "default": Up("--model", str(tiny_vlm), "--allowed-local-media-path",
                      str(media_dirs[0]), cache=tmp_path_factory.mktemp("cache")),
        "open": Up("--model", str(tiny_vlm), "--allow-private-media-urls",
                   "--media-fetch-timeout", str(FETCH_TIMEOUT_S),
                   cache=tmp_path_factory.mktemp("cache")),
    }
    try:
        for u in ups.values():
            u.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving tiny-qwen2-vl")
            assert "2 media workers serving" in u.text()
        yield ups
    finally:
        for u in ups.values():
            u.stop()


@pytest.fixture
def stack(stacks) -> Up:
    return stacks["default"]


@pytest.fixture
def open_stack(stacks) -> Up:
    return stacks["open"]


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return stack.client()


def text_tokens(client: openai.OpenAI, prompt: str) -> int:
    return ask(client, text(prompt), max_tokens=1).usage.prompt_tokens


# -- images ------------------------------------------------------------------------


def test_image_by_data_url(client, counts):
    data = noise_png(90, 60, 1)
    base = ask(client, text("Describe."))
    r = ask(client, image_url(png_url(data)), text("Describe."))
    # <|vision_start|>, one <|image_pad|> per merged patch, <|vision_end|>.
    assert counts.image(data) == 6  # 90x60 -> 84x56: 3x2 merged patches
    assert r.usage.prompt_tokens == base.usage.prompt_tokens + 2 + 6
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content != base.choices[0].message.content
    other = ask(client, image_url(png_url(noise_png(90, 60, 2))), text("Describe."))
    assert other.choices[0].message.content != r.choices[0].message.content


def test_image_by_http_url_with_private_urls_allowed(open_stack, http_port, counts):
    client = open_stack.client()
    url = f"http://127.0.0.1:{http_port}/img.png"
    data = Handler.files["/img.png"]
    by_url = ask(client, image_url(url), text("What is it?"))
    assert "/img.png" in Handler.hits
    by_data = ask(client, image_url(png_url(data)), text("What is it?"))
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert by_url.usage.prompt_tokens == (text_tokens(client, "What is it?") + 2
                                          + counts.image(data))


def test_loopback_url_refused_by_default(client, http_port):
    Handler.hits.clear()
    for host in ("127.0.0.1", "localhost"):
        message = refusal(client, image_url(f"http://{host}:{http_port}/img.png"))
        assert "private, loopback, link-local or reserved" in message, message
    assert Handler.hits == []  # refused after DNS, before any connection


def test_image_by_allowed_local_path(client, media_dirs, counts):
    path = media_dirs[0] / "sub" / "cat.png"
    by_path = ask(client, text("Look:"), image_path(path))
    by_data = ask(client, text("Look:"), image_url(png_url(path.read_bytes())))
    assert by_path.choices[0].message.content == by_data.choices[0].message.content
    assert by_path.usage.prompt_tokens == (text_tokens(client, "Look:") + 2
                                           + counts.image(path.read_bytes()))


def test_paths_outside_the_root_are_refused(client, media_dirs):
    root, outside = media_dirs
    for path in (outside / "secret.png",                      # plainly outside
                 f"{root}/../outside/secret.png",            # a ../ escape
                 f"{root}/sub/../../outside/secret.png",     # deeper ../ escape
                 root / "link.png"):                          # a link that leads out
        message = refusal(client, text("Look:"), image_path(path),
                          param="messages[0].content[1]")
        assert "outside the allowed media paths" in message, (path, message)
    # Paths go through the same check however the part names them.
    message = refusal(client, video_path(outside / "secret.png"))
    assert "outside the allowed media paths" in message


def test_local_paths_refused_on_a_stack_without_a_root(open_stack, media_dirs):
    message = refusal(open_stack.client(), image_path(media_dirs[0] / "sub" / "cat.png"))
    assert "local media paths are not allowed" in message


def test_two_images_in_one_message(client, counts):
    a, b = noise_png(90, 60, 3), noise_png(140, 112, 4)
    one = ask(client, image_url(png_url(a)), text("Compare."))
    two = ask(client, image_url(png_url(a)), image_url(png_url(b)), text("Compare."))
    assert counts.image(b) == 20 and counts.image(a) == 6  # 140x112: 5x4 merged patches
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + 2 + counts.image(b)
    assert two.choices[0].message.content != one.choices[0].message.content


def test_corrupt_and_truncated_images_are_refused(client):
    data = noise_png(256, 256, 5)
    message = refusal(client, text("Look:"), image_url(png_url(data[: len(data) // 2])),
                      param="messages[0].content[1]")
    assert "truncated or corrupt" in message, message
    message = refusal(client, image_url(png_url(b"this is not an image" * 10)))
    assert "not a recognised image format" in message, message


def test_oversized_image_is_refused(client):
    # 8000 x 6000 = 48 M pixels over the default 40 M cap; one colour, so the
    # PNG is a few tens of kB and the worker refuses it from the header.
    data = image_bytes(Image.new("L", (8000, 6000)), "PNG")
    assert len(data) < 200_000
    tic = time.monotonic()
    message = refusal(client, image_url(png_url(data)))
    assert "8000x6000" in message and str(DEFAULT_MAX_IMAGE_PIXELS) in message, message
    assert time.monotonic() - tic < 5


def test_url_that_times_out(open_stack, silent_port):
    client = open_stack.client()
    tic = time.monotonic()
    message = refusal(client, image_url(f"http://127.0.0.1:{silent_port}/img.png"))
    took = time.monotonic() - tic
    assert "longer than the timeout" in message, message
    assert FETCH_TIMEOUT_S * 0.9 < took < FETCH_TIMEOUT_S + 3, took


def test_text_only_requests_to_the_vision_model(client):
    plain = ask(client, "Hello there")
    as_part = ask(client, text("Hello there"))
    assert plain.choices[0].message.content == as_part.choices[0].message.content
    assert plain.usage.prompt_tokens == as_part.usage.prompt_tokens
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-qwen2-vl"]
    # What tells a client such as vllm-mlx-chat to offer uploads.
    assert models.data[0].modalities == ["text", "image", "video"]


# -- video -------------------------------------------------------------------------


@pytest.mark.parametrize("fields, frames", [
    ({}, 8),                                         # defaults: 2 fps x 4 s, under 16
    ({"video_fps": 1.0}, 4),                         # 1 fps x 4 s
    ({"video_fps": 5.0, "video_max_frames": 12}, 12),  # 20 wanted, capped at 12
    ({"video_max_frames": 2}, 2),
])
def test_video_by_data_url_fps_and_max_frames(client, counts, fields, frames):
    """The engine receives no frame list, only the processor's tensors; the
    placeholder count it puts in the prompt (prompt_tokens) is one per merged
    patch of each pair of frames, so it tells ceil(frames / 2): the cases are
    chosen with distinct counts."""
    assert len({counts.video(n) for n in (2, 4, 8, 12)}) == 4
    r = ask(client, video_url(data_url(CLIP, "video/mp4")), text("Describe."), **fields)
    assert r.usage.prompt_tokens == text_tokens(client, "Describe.") + 2 + counts.video(frames)


def test_video_by_path_fps_and_max_frames(client, counts, media_dirs):
    path = media_dirs[0] / "clip.mp4"
    base = text_tokens(client, "Describe.")
    r = ask(client, text("Describe."), video_path(path), video_fps=1.0)
    assert r.usage.prompt_tokens == base + 2 + counts.video(4)
    r = ask(client, text("Describe."), video_path(path), video_fps=3.0, video_max_frames=8)
    assert r.usage.prompt_tokens == base + 2 + counts.video(8)
    by_data = ask(client, text("Describe."), video_url(data_url(CLIP, "video/mp4")),
                  video_fps=3.0, video_max_frames=8)
    assert r.choices[0].message.content == by_data.choices[0].message.content


def test_corrupt_and_truncated_videos_are_refused(client):
    message = refusal(client, text("Watch:"),
                      video_url(data_url(CLIP[: len(CLIP) // 2], "video/mp4")),
                      param="messages[0].content[1]")
    assert "truncated" in message or "cannot read the video" in message, message
    message = refusal(client, video_url(data_url(b"not a video at all" * 50, "video/mp4")))
    assert "cannot read the video" in message, message


def test_images_and_videos_together_are_refused_on_qwen2_vl(client):
    """Qwen2-VL's embedding step takes a request's images or its videos, not
    both: a 400 naming the first part of the second kind, not a failed
    generation."""
    message = refusal(client, text("Compare:"), image_url(png_url(png((64, 48)))),
                      video_url(data_url(CLIP, "video/mp4")), param="messages[0].content[2]")
    assert "images or videos" in message, message


# -- concurrency -------------------------------------------------------------------


def test_concurrent_image_and_text_requests(client, media_dirs):
    """8 image requests interleaved with 8 text requests, all at once, each
    greedy output equal to the same request sent alone. The concurrent round
    comes first so every image is prepared by a worker then (data URLs are
    cached by the engine afterwards; paths never are)."""
    root = media_dirs[0]
    requests = []
    for i in range(8):
        data = noise_png(56 + 14 * i, 84 - 7 * (i % 3), 100 + i)
        if i % 2:
            (root / f"c{i}.png").write_bytes(data)
            part = image_path(root / f"c{i}.png")
        else:
            part = image_url(png_url(data))
        requests.append((part, text(f"Image {i}: what is it?")))
        requests.append((text(f"Text request number {i}, tell me a story."),))

    def run(parts):
        r = ask(client, *parts, max_tokens=8)
        return r.choices[0].message.content, r.usage.prompt_tokens

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    alone = [run(parts) for parts in requests]
    assert together == alone
    outputs = [out for out, _ in alone]
    assert len(set(outputs[0::2])) == 8  # the images made a difference


# -- a media worker killed or hung -------------------------------------------------


def last_pid(up: Up, name: str) -> int:
    return int(re.findall(rf"started {name} \(pid (\d+)\)", up.text())[-1])


def test_killed_media_worker_costs_no_request(open_stack, http_port, counts):
    """Two requests whose image downloads slowly are in flight, one on each
    worker (the engine alternates); media-0 is killed mid-download. Its
    request is retried on media-1 and both succeed; the supervisor restarts
    media-0. Then media-1 is killed just before more requests: they succeed
    too."""
    up = open_stack
    client = up.client()
    data = Handler.files["/img.png"]
    want = text_tokens(client, "Slow?") + 2 + counts.image(data)
    expected = ask(client, image_url(png_url(data)), text("Slow?")).choices[0].message.content
    old = {name: last_pid(up, name) for name in ("media-0", "media-1")}
    Handler.hits.clear()
    mark = len(up.lines)

    slow = f"http://127.0.0.1:{http_port}/slow.png"
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ask, client, image_url(slow), text("Slow?")) for _ in range(2)]
        assert wait_until(lambda: Handler.hits.count("/slow.png") >= 2, 20), Handler.hits
        os.kill(old["media-0"], signal.SIGKILL)
        results = [f.result(timeout=60) for f in futures]
    for r in results:
        assert r.usage.prompt_tokens == want
        assert r.choices[0].message.content == expected
    # The killed worker's download was started again on the other one.
    assert Handler.hits.count("/slow.png") == 3, Handler.hits
    assert re.search(r"\[engine\] .*media worker .*UNAVAILABLE; retrying",
                     "".join(up.lines[mark:])), up.text()[-3000:]
    assert not pid_alive(old["media-0"])
    up.wait_for(r"media-0 exited", after=mark, timeout=10)
    new0 = int(up.wait_for(r"started media-0 \(pid (\d+)\)", after=mark, timeout=30).group(1))
    assert new0 != old["media-0"]
    up.wait_for(r"\[media-0\] .*serving media for", after=mark, timeout=60)

    # media-1 killed just before: every next request still succeeds.
    mark = len(up.lines)
    os.kill(old["media-1"], signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(old["media-1"]), 10)
    for i in range(4):
        r = ask(client, image_url(png_url(noise_png(70, 70, 200 + i))), text("After?"))
        assert r.usage.prompt_tokens == text_tokens(client, "After?") + 2 + counts.image(
            noise_png(70, 70, 200 + i))
    assert ask(client, "text still works").choices[0].finish_reason == "length"
    new1 = int(up.wait_for(r"started media-1 \(pid (\d+)\)", after=mark, timeout=30).group(1))
    assert new1 != old["media-1"] and pid_alive(new0)
    up.wait_for(r"\[media-1\] .*serving media for", after=mark, timeout=60)
    # Both workers serve again: two fresh images, one on each.
    for i in range(2):
        ask(client, image_url(png_url(noise_png(42, 42, 300 + i))), text("Back?"))


def test_hung_media_worker_costs_seconds_not_the_deadline(stack, counts):
    """A worker that stops answering (SIGSTOP: alive to the supervisor, deaf
    to gRPC) while requests go to it: each request moves to the other worker
    within seconds (the engine watches the worker's health during a call),
    not after half the gateway's 600 s engine deadline."""
    client = stack.client().with_options(timeout=60)
    base = text_tokens(client, "Hung?")
    stopped = last_pid(stack, "media-0")
    port = int(re.search(r"\[media-0\] .*listening on 127\.0\.0\.1:(\d+)", stack.text())[1])
    mark = len(stack.lines)
    os.kill(stopped, signal.SIGSTOP)
    try:
        for i in range(4):  # the engine alternates: one of the first two goes to media-0
            data = noise_png(70, 56, 400 + i)
            tic = time.monotonic()
            r = ask(client, image_url(png_url(data)), text("Hung?"))
            assert r.usage.prompt_tokens == base + 2 + counts.image(data)
            assert time.monotonic() - tic < 15, "".join(stack.lines[mark:])
        said = "".join(stack.lines[mark:])
        assert re.search(rf"\[engine\] .*media worker 127\.0\.0\.1:{port}: stopped answering",
                         said), said
    finally:
        os.kill(stopped, signal.SIGCONT)
    # Awake again, it answers again, and requests keep succeeding.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for i in range(2):
        ask(client, image_url(png_url(noise_png(42, 56, 500 + i))), text("Awake?"))
