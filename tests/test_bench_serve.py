"""`vllm-mlx-bench serve` run as a real command against real servers on
loopback: two stacks of ours side by side (engine + gateway each), ours
against mlx_lm.server, a tiny vision-language stack with images, servers
that refuse (a wrong model name, nothing listening), and a scripted server
that behaves as the hosted OpenAI API does where no real one can run here
(it refuses ignore_eos and stream_options, and frames its stream
differently)."""

import base64
import http.server
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from vllm_mlx.bench import serve

from .conftest import (
    ROOT,
    free_port,
    serve_http,
    start_engine,
    start_gateway,
    terminate,
    wait_until,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("output_tokens_per_s", "requests_per_s")
LATENCIES = ("ttft_s", "itl_s", "tpot_s", "e2e_s")


def bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Runs the command; returns its stdout and the JSON it wrote."""
    out = tmp_path / f"results-{len(list(tmp_path.glob('results-*.json')))}.json"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "vllm_mlx.bench.cli", "serve", *args, "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(out.read_text())


def assert_all_served(server: dict, requests: int, max_tokens: int) -> None:
    for level in server["levels"]:
        assert (level["requests"], level["completed"], level["errors"]) == (requests, requests,
                                                                            0), level
        assert level["first_error"] is None and level["notes"] == [], level
        for name in FIGURES:
            assert level[name] > 0, (name, level)
        for name in LATENCIES:
            assert 0 < level[name]["p50"] <= level[name]["p99"], (name, level)
        assert level["output_tokens"] == requests * max_tokens, level


# -- servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stacks(tiny_model, tmp_path_factory):
    """Two separate stacks of ours: an engine and a gateway each."""
    logs = tmp_path_factory.mktemp("bench-serve-logs")
    started = []
    try:
        for _ in range(2):
            engine = start_engine(tiny_model, logs)
            started.append(engine)
            started.append(start_gateway(engine.address, logs))
        yield [g.url for g in started[1::2]]
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="module")
def mlx_lm_server(tiny_model, tmp_path_factory):
    """mlx-lm's own server on the same model (its /v1/models scans the
    Hugging Face cache, so it gets an empty one of its own)."""
    hf_home = tmp_path_factory.mktemp("hf")
    (hf_home / "hub").mkdir()
    port = free_port()
    log = tmp_path_factory.mktemp("mlx-lm-logs") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(tiny_model), "--host",
         "127.0.0.1", "--port", str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2).close()
            return True
        except OSError:
            return proc.poll() is not None

    try:
        assert wait_until(answers, timeout=60) and proc.poll() is None, log.read_text()
        yield url
    finally:
        terminate(proc)


class OpenAILike(http.server.BaseHTTPRequestHandler):
    """What the hosted API does that ours does not: 400 for ignore_eos (and,
    as older servers do, for stream_options), and events framed with CRLF,
    several tokens in a chunk, lengths that vary, a raw U+2028 in a string."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[int, dict]] = []  # (the server's port, the request body)

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.reply(200, json.dumps({"object": "list", "data": [{"id": "gpt-like"}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.server.server_address[1], body))
        for field in ("ignore_eos", "stream_options"):
            if field in body:
                error = {"message": f"Unrecognized request argument supplied: {field}",
                         "type": "invalid_request_error", "param": field}
                return self.reply(400, json.dumps({"error": error}).encode())
        # Two tokens per chunk; 3 or 4 chunks depending on the prompt.
        n = 3 + len(body["messages"][0]["content"]) % 2
        texts = [" a\u2028b"] + [" cd"] * (n - 1)
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        events += [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in texts]
        events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}]
        stream = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\r\n\r\n"
                          for e in events) + b"data: [DONE]\r\n\r\n"
        self.reply(200, stream, "text/event-stream")


@pytest.fixture
def openai_like():
    """Two such servers, on two ports."""
    OpenAILike.seen = []
    servers = [serve_http(OpenAILike) for _ in range(2)]
    yield [next(s) for s in servers]
    for s in servers:
        next(s, None)




# -- what the command sends ---------------------------------------------------------


def test_prompts_differ_per_request_unless_a_prefix_is_shared():
    plain = serve.Workload(200, 0, 0, (64, 64))
    a, b = plain.content("0/0/0"), plain.content("0/0/1")
    assert a != b and a.split()[0] != b.split()[0]
    assert plain.content("0/0/0") == a  # deterministic
    assert len(a.split()) == round(200 / serve.TOKENS_PER_WORD)
    shared = serve.Workload(200, 150, 0, (64, 64))
    a, b = shared.content("0/0/0").split(), shared.content("0/0/1").split()
    preamble = round(150 / serve.TOKENS_PER_WORD)
    assert a[:preamble] == b[:preamble] and a[preamble:] != b[preamble:]
    assert len(a) == preamble + round(50 / serve.TOKENS_PER_WORD)


def test_images_are_real_jpegs_different_per_request():
    parts = serve.Workload(20, 0, 2, (96, 64)).content("1/2/3")
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    data = []
    for p in parts[1:]:
        head, b64 = p["image_url"]["url"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        data.append(base64.b64decode(b64))
        image = Image.open(io.BytesIO(data[-1]))
        assert (image.format, image.size) == ("JPEG", (96, 64))
    other = serve.Workload(20, 0, 2, (96, 64)).content("1/2/4")[1]["image_url"]["url"]
    assert data[0] != data[1] and parts[1]["image_url"]["url"] != other


# -- against servers ----------------------------------------------------------------


def test_two_of_our_servers_side_by_side(stacks, tmp_path):
    a, b = stacks
    png = tmp_path / "serve.png"
    stdout, doc = bench(tmp_path, "--url", a, "--url", f"{b}/v1", "--concurrency", "1,2",
                        "--requests-per-level", "4", "--prompt-tokens", "20", "--max-tokens",
                        "8", "--plot", str(png))
    assert a in stdout and b in stdout
    assert f"ratios to {a}" in stdout
    provenance = doc["provenance"]
    assert provenance["mode"] == "serve" and "--concurrency 1,2" in provenance["command"]
    assert provenance["versions"]["vllm-mlx"] and provenance["hardware"]
    results = doc["results"]
    assert [s["url"] for s in results["servers"]] == [a, f"{b}/v1"]
    for server in results["servers"]:
        assert server["model"] == "tiny-llama"
        assert server["ignore_eos_sent"] and server["stream_usage_asked"]
        assert [lv["concurrency"] for lv in server["levels"]] == [1, 2]
        assert_all_served(server, 4, 8)
        assert all(lv["output_tokens_source"] == "usage" for lv in server["levels"])
    assert len(results["ratios"]) == 4
    assert all(r["output_tokens_per_s"] > 0 and r["ttft_p50"] > 0 for r in results["ratios"])
    assert results["settings"]["requests_per_level"] == [4, 4]
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_refusals_are_counted_with_their_message(stacks, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    stdout, doc = bench(tmp_path, "--url", stacks[0], "--url", stacks[1], "--url", nobody,
                        "--model", "default", "--model", "no-such-model", "--model", "default",
                        "--concurrency", "2", "--requests-per-level", "2", "--rounds", "1",
                        "--warmup", "1", "--prompt-tokens", "20", "--max-tokens", "4")
    ok, refused, down = doc["results"]["servers"]
    assert_all_served(ok, 2, 4)
    for server, words in ((refused, ("HTTP 404", "no-such-model")), (down, ("ConnectError",))):
        (level,) = server["levels"]
        assert (level["errors"], level["completed"], level["output_tokens_per_s"]) == (2, 0, 0)
        assert all(w in level["first_error"] for w in words), level["first_error"]
        assert any("every probe request failed" in n for n in server["notes"]), server["notes"]
        assert level["first_error"] in stdout
    ratios = {r["url"]: r for r in doc["results"]["ratios"]}
    for url in (stacks[1], nobody):  # no ratio to a server that served nothing
        assert ratios[url]["output_tokens_per_s"] is None and ratios[url]["ttft_p50"] is None
    assert ratios[stacks[0]]["output_tokens_per_s"] == 1.0


def test_ours_against_mlx_lm_server(stacks, mlx_lm_server, tiny_model, tmp_path):
    stdout, doc = bench(tmp_path, "--url", stacks[0], "--url", mlx_lm_server, "--concurrency",
                        "2", "--requests-per-level", "4", "--prompt-tokens", "20",
                        "--max-tokens", "8")
    ours, theirs = doc["results"]["servers"]
    assert theirs["model"] == str(tiny_model.resolve())  # its /v1/models names the folder
    for server in (ours, theirs):
        assert_all_served(server, 4, 8)
    assert f"ratios to {stacks[0]}" in stdout and mlx_lm_server in stdout


def test_a_server_that_refuses_ignore_eos_and_stream_options(openai_like, tmp_path):
    url = f"http://127.0.0.1:{openai_like[0]}/v1"
    stdout, doc = bench(tmp_path, "--url", url, "--concurrency", "1,3",
                        "--requests-per-level", "6", "--prompt-tokens", "20",
                        "--max-tokens", "8", "--warmup", "0")
    (server,) = doc["results"]["servers"]
    assert server["model"] == "gpt-like"
    assert not server["ignore_eos_sent"] and not server["stream_usage_asked"]
    assert "ignore_eos refused: output lengths may vary" in server["notes"]
    sent = [body for _, body in OpenAILike.seen[4:]]  # after the four probes
    assert sent and all("ignore_eos" not in b and "stream_options" not in b for b in sent)
    for level in server["levels"]:
        assert (level["completed"], level["errors"]) == (6, 0), level
        assert level["output_tokens_source"] == "chunks"
        tokens = level["output_tokens_per_request"]
        assert 3 <= tokens["min"] <= tokens["max"] <= 4  # chunks, U+2028 kept inside one
        assert any("output lengths" in n for n in level["notes"]), level
    assert "ratios" not in stdout  # one server: nothing to compare


def test_images_against_a_vision_language_stack(vision_stack, tmp_path):
    common = ("--url", vision_stack, "--concurrency", "2", "--requests-per-level", "2",
              "--rounds", "1", "--warmup", "1", "--prompt-tokens", "20", "--max-tokens", "6",
              "--image-size", "64x64")
    _, with_images = bench(tmp_path, *common, "--images", "1")
    _, text_only = bench(tmp_path, *common)
    (server,) = with_images["results"]["servers"]
    assert_all_served(server, 2, 6)
    assert with_images["results"]["settings"]["images"] == 1
    # Same words both times (same seeds): the image's own tokens are the difference,
    # a few merged patches between vision start and end markers.
    level, plain = server["levels"][0], text_only["results"]["servers"][0]["levels"][0]
    assert level["prompt_tokens_per_request"] >= plain["prompt_tokens_per_request"] + 3


def test_rounds_alternate_between_servers(openai_like, tmp_path):
    a, b = openai_like
    bench(tmp_path, "--url", f"http://127.0.0.1:{a}", "--url", f"http://127.0.0.1:{b}",
          "--concurrency", "1,2", "--requests-per-level", "4", "--rounds", "2",
          "--warmup", "1", "--prompt-tokens", "20", "--max-tokens", "8")
    ports = [port for port, _ in OpenAILike.seen]
    # Each server's four probes and its warm-up, then per level: A's first round
    # (half the level's requests), B's, A's second, B's.
    per_level = [a] * 2 + [b] * 2 + [a] * 2 + [b] * 2
    assert ports == [a] * 5 + [b] * 5 + per_level * 2
    prompts = [body["messages"][0]["content"] for _, body in OpenAILike.seen]
    timed = prompts[10:]
    assert len(set(timed)) == len(timed)  # no prompt twice, not even across servers


def test_plot_without_matplotlib_says_what_to_install(openai_like, tmp_path):
    hidden = tmp_path / "hidden" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    done = subprocess.run(
        [sys.executable, "-m", "vllm_mlx.bench.cli", "serve", "--url",
         f"http://127.0.0.1:{openai_like[0]}", "--plot", str(tmp_path / "x.png")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(hidden.parent)}, capture_output=True,
        text=True, timeout=60)
    assert done.returncode != 0
    assert "pip install 'vllm-mlx[plot]'" in done.stderr, done.stderr
    assert OpenAILike.seen == []  # refused before any request
