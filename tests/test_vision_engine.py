"""The engine process with the tiny VLM and a real media worker, over gRPC:
text and image requests, ModelInfo's modalities, refusals naming the part,
the prepared-media cache and the retry on another worker."""

import base64
import io
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, free_port, start_engine, terminate
from vllm_mlx.ipc.error_info import error_info
from vllm_mlx.supervision.health import wait_for_serving
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import errors_pb2 as epb
from vllm_mlx.v1 import media_pb2 as mpb


def start_media_worker(model, log_dir):
    port = free_port()
    log = open(log_dir / f"media-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "media_worker", "--model", str(model),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    wait_for_serving(address, 60, is_alive=lambda: proc.poll() is None)
    return proc, address


@pytest.fixture(scope="module")
def vlm_stack(tiny_vlm, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vlm-logs")
    worker, address = start_media_worker(tiny_vlm, logs)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the first call retries
    engine = start_engine(tiny_vlm, logs, "--media-worker", dead, "--media-worker", address)
    yield engine, worker
    engine.stop()
    terminate(worker)


def data_url(w, h, seed) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url) -> pb.ContentPart:
    return pb.ContentPart(media=mpb.MediaSource(kind=mpb.MEDIA_KIND_IMAGE, url=url))


def chat(*parts, max_tokens=8) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", parts=list(parts))]),
        max_tokens=max_tokens, ignore_eos=True)


def generate(stub, request) -> tuple[list[int], pb.GenerateResponse]:
    rs = list(stub.Generate(request, timeout=60))
    assert rs[-1].finished, rs[-1]
    assert rs[-1].finish_reason == pb.FINISH_REASON_LENGTH, rs[-1].error
    return [t for r in rs for t in r.token_ids], rs[-1]


def test_model_info_lists_media(vlm_stack):
    engine, _ = vlm_stack
    info = engine.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert list(info.modalities) == ["text", "image", "video"]
    assert info.kv_bytes_per_token > 0 and info.weights_bytes > 0


def test_text_only_requests_to_the_vision_model(vlm_stack):
    engine, _ = vlm_stack
    tokens, _ = generate(engine.stub, pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="Hello")]),
        max_tokens=8, ignore_eos=True))
    as_parts, _ = generate(engine.stub, chat(pb.ContentPart(text="Hello")))
    assert len(tokens) == 8 and as_parts == tokens


def test_image_request_by_data_url(vlm_stack):
    engine, _ = vlm_stack
    a, b = data_url(90, 60, 1), data_url(60, 90, 2)
    text_tokens, text_last = generate(engine.stub, chat(pb.ContentPart(text="Describe.")))
    first, last = generate(engine.stub, chat(image_part(a), pb.ContentPart(text="Describe.")))
    # <|vision_start|>, one <|image_pad|> per merged patch (90x60 -> 84x56: 3x2 = 6),
    # <|vision_end|>.
    assert last.prompt_tokens == text_last.prompt_tokens + 1 + 6 + 1
    other, _ = generate(engine.stub, chat(image_part(b), pb.ContentPart(text="Describe.")))
    again, _ = generate(engine.stub, chat(image_part(a), pb.ContentPart(text="Describe.")))
    assert first == again and first != other and first != text_tokens
    two, last2 = generate(engine.stub, chat(image_part(a), image_part(b),
                                            pb.ContentPart(text="Compare.")))
    assert last2.prompt_tokens > last.prompt_tokens


def test_media_refusal_names_the_part(vlm_stack):
    engine, _ = vlm_stack
    with pytest.raises(grpc.RpcError) as e:
        list(engine.stub.Generate(chat(pb.ContentPart(text="Look:"),
                                       image_part("data:image/png;base64,bm90IGFuIGltYWdl")),
                                  timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("messages[0].content[1]: "), e.value.details()
    assert error_info(e.value) == epb.ErrorInfo(
        code=epb.ERROR_CODE_MEDIA_REFUSED, field="chat.messages[0].parts[1]", item=0)


def test_media_refusal_names_the_part_behind_a_cached_one(vlm_stack):
    """The worker is sent only what the cache lacks (here the second image,
    its item 0); the refusal still names the request's own part."""
    engine, _ = vlm_stack
    cached = data_url(50, 50, 7)
    generate(engine.stub, chat(image_part(cached)))
    with pytest.raises(grpc.RpcError) as e:
        list(engine.stub.Generate(chat(image_part(cached), pb.ContentPart(text="and"),
                                       image_part("data:image/png;base64,bm90IGFuIGltYWdl")),
                                  timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(e.value) == epb.ErrorInfo(
        code=epb.ERROR_CODE_MEDIA_REFUSED, field="chat.messages[0].parts[2]", item=1)


def test_resent_data_url_is_not_prepared_again(vlm_stack, tmp_path):
    """A data: URL already prepared is served from the engine's cache: it
    works even with every media worker gone."""
    engine, worker = vlm_stack
    url = data_url(70, 70, 3)
    first, _ = generate(engine.stub, chat(image_part(url), pb.ContentPart(text="Hi")))
    terminate(worker)
    again, _ = generate(engine.stub, chat(image_part(url), pb.ContentPart(text="Hi")))
    assert again == first
    with pytest.raises(grpc.RpcError) as e:  # a new image needs a worker
        list(engine.stub.Generate(chat(image_part(data_url(70, 70, 4))), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(e.value).code == epb.ERROR_CODE_MEDIA_UNAVAILABLE


def test_media_to_a_text_model_is_refused(engine):
    info = engine.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert list(info.modalities) == ["text"]
    with pytest.raises(grpc.RpcError) as e:
        list(engine.stub.Generate(chat(pb.ContentPart(text="Look:"),
                                       image_part(data_url(20, 20, 1))), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("messages[0].content[1]: this model takes text only")
    assert error_info(e.value) == epb.ErrorInfo(
        code=epb.ERROR_CODE_UNSUPPORTED, field="chat.messages[0].parts[1]", item=0)


def _segments() -> set[str]:
    import os

    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"),
                    reason="Linux lists shared-memory segments in /dev/shm")
def test_media_segments_live_as_long_as_their_users(tiny_vlm, tmp_path):
    """Each prepared image is one shared-memory segment: the cache keeps one
    per distinct data URL, a finished or cancelled request keeps none, and
    the engine unlinks what its cache held when it stops."""
    before = _segments()
    worker, address = start_media_worker(tiny_vlm, tmp_path)
    engine = start_engine(tiny_vlm, tmp_path, "--media-worker", address)
    try:
        a, b = data_url(64, 48, 1), data_url(56, 40, 2)
        generate(engine.stub, chat(image_part(a), pb.ContentPart(text="Describe.")))
        generate(engine.stub, chat(image_part(a), pb.ContentPart(text="Again.")))  # cached
        call = engine.stub.Generate(chat(image_part(b), max_tokens=4000), timeout=60)
        next(iter(call))
        call.cancel()  # mid-stream: the request lets go of its item, the cache keeps it
        held = _segments() - before
        assert len(held) == 2, held
    finally:
        engine.stop()
        terminate(worker)
    assert _segments() - before == set()
