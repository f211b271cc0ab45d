"""`vllm-mlx-chat` driven in headless Chromium (Debian's chromium and
chromium-driver through Selenium; no browser is downloaded), on two real stacks:

- `vllm-mlx-up --chat` on the tiny vision-language model: the page offers
  uploads because /v1/models says the model takes images, an uploaded image
  reaches the model, and the stop button ends a long generation in the engine.
- `vllm-mlx-chat --share` on its own in front of `vllm-mlx-up` serving the
  embedded SmolLM2, through a TCP relay that keeps what the page's server
  sends: real text streams in, a follow-up carries the history and the
  settings panel's values, regenerate and clear, and the server stopping and
  coming back.

Screenshots go to test-artifacts/chat/."""

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port, needs_smollm2, wait_until
from tests.test_supervisor import Running, Up
from vllm_mlx.chat.conversation import Exchange, media_part, openai_messages, shown
from vllm_mlx.supervision.health import answers

ARTIFACTS = ROOT / "test-artifacts" / "chat"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ERROR_MARK = "⚠️"  # how the page shows a failure in the chat
# The vision stack requires an API key: vllm-mlx-up --chat hands it to the page.
API_KEY = "chat-test-key"
KEYED = {"Authorization": f"Bearer {API_KEY}"}
SUMMARY = re.compile(r"^(\d+) tokens · [\d.]+ tokens/s · [\d.]+ s to first token · "
                     r"(\d+) prompt tokens")


# -- the browser and the page -----------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        why = ("chromium and chromedriver not found (Debian: apt-get install chromium "
               "chromium-driver, which ./scripts/test does)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1000,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class ChatPage:
    """The page as a person uses it: by its elements, read through the DOM."""

    def __init__(self, driver, url: str):
        self.driver, self.url = driver, url

    def open(self) -> None:
        self.driver.get(self.url)
        self.until(lambda: self.js("return !!document.querySelector('#chat-input textarea')"),
                   30, "the page never showed its message box")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def element(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def texts(self, css: str) -> list[str]:
        return self.js("return [...document.querySelectorAll(arguments[0])]"
                       ".map(e => e.innerText)", css)

    def replies(self) -> list[str]:
        return self.texts('#chat-history [data-testid="bot"]')

    def stats(self) -> str:
        return self.texts("#chat-stats")[0].strip()

    def streaming(self) -> bool:
        return not self.js("return document.querySelector('#chat-stop').disabled")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.js("window.scrollTo(0, 0)")  # typing in the settings panel scrolled down
        self.driver.save_screenshot(str(path))
        return path

    def until(self, predicate, timeout: float, what: str) -> None:
        if not wait_until(predicate, timeout, interval=0.1):
            self.shot(f"failed-{re.sub(r'[^a-z]+', '-', what.lower())[:40]}")
            raise AssertionError(f"{what}; replies {self.replies()!r}, stats {self.stats()!r}")

    def send(self, text: str, files: tuple[Path, ...] = ()) -> None:
        from selenium.webdriver.common.keys import Keys

        for f in files:
            self.element("#chat-input input[type=file]").send_keys(str(f))
        self.until(lambda: len(self.texts("#chat-input .thumbnail-item")) == len(files), 20,
                   "the upload never showed in the message box")
        box = self.element("#chat-input textarea")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def wait_reply(self, count: int, errors: int = 0, timeout: float = 90) -> str:
        """The `count`-th reply once it has ended; the chat must show no error
        text but the `errors` expected."""
        self.until(lambda: len(self.replies()) >= count and not self.streaming(), timeout,
                   f"reply {count} never came")
        shown_errors = [r for r in self.replies() if ERROR_MARK in r]
        assert len(shown_errors) == errors, shown_errors
        reply = self.replies()[count - 1]
        assert ERROR_MARK not in reply, reply
        assert reply.strip(), self.replies()
        return reply

    def click(self, css: str) -> None:
        self.element(css).click()

    def set_settings(self, **values) -> None:
        """Types into the settings panel, as a person would."""
        from selenium.webdriver.common.keys import Keys

        fields = {"temperature": "#chat-temperature input[type=number]",
                  "top_p": "#chat-top-p input[type=number]",
                  "max_tokens": "#chat-max-tokens input",
                  "system_prompt": "#chat-system-prompt textarea"}
        def panel_open() -> bool:
            return self.js("const e = document.querySelector(arguments[0]);"
                           "return !!e && e.offsetParent !== null", fields["max_tokens"])

        if not panel_open():
            self.click("#chat-settings .label-wrap")
            self.until(panel_open, 10, "the settings panel did not open")
        for name, value in values.items():
            field = self.element(fields[name])
            field.clear()
            field.send_keys(str(value))
            field.send_keys(Keys.TAB)  # Gradio takes a number's value when it loses focus
        time.sleep(0.3)


# -- what the page's server sent --------------------------------------------------


class Relay:
    """A TCP relay on a loopback port in front of the gateway that keeps the
    bytes each connection sends, so the test reads the page's requests."""

    def __init__(self, upstream: int, port: int = 0):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sent: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            self.sent.append(bytearray())
            for src, dst, keep in ((client, server, self.sent[-1]), (server, client, None)):
                threading.Thread(target=self._pipe, args=(src, dst, keep), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if keep is not None:
                    keep += data
                dst.sendall(data)
        except OSError:
            pass
        finally:  # either side gone: both go, as the page's client would see it
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def chat_requests(self) -> list[dict]:
        """The bodies of every chat completion request, in order."""
        bodies = []
        for sent in list(self.sent):
            data = bytes(sent)
            while (end := data.find(b"\r\n\r\n")) >= 0:
                head = data[:end].decode("latin-1")
                length = re.search(r"(?im)^content-length:\s*(\d+)", head)
                size = int(length.group(1)) if length else 0
                if head.startswith("POST") and "/chat/completions" in head.split("\r\n")[0]:
                    bodies.append(json.loads(data[end + 4:end + 4 + size]))
                data = data[end + 4 + size:]
        return bodies

    def close(self) -> None:
        if self.listener.fileno() >= 0:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self.listener.close()


def metric(gateway_url: str, name: str) -> float:
    text = httpx.get(f"{gateway_url}/metrics", headers=KEYED, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


def noise_png(path: Path) -> Path:
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


# -- vllm-mlx-up --chat on the tiny vision-language model -------------------------


@pytest.fixture(scope="module")
def vision_chat(tiny_vlm, tmp_path_factory, browser):
    chat_port = free_port()
    up = Up("--model", str(tiny_vlm), "--media-workers", "1", "--chat", "--chat-port",
            str(chat_port), "--api-key", API_KEY, cache=tmp_path_factory.mktemp("cache"))
    try:
        up.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving tiny-qwen2-vl")
        assert f"chat UI: http://127.0.0.1:{chat_port}" in up.text()
        page = ChatPage(browser, f"http://127.0.0.1:{chat_port}/")
        page.open()
        yield up, page
    finally:
        up.stop()


def test_an_uploaded_image_reaches_the_vision_model(vision_chat, tmp_path):
    up, page = vision_chat
    assert "tiny-qwen2-vl" in page.texts("#chat-server")[0]
    accepts = page.element("#chat-input input[type=file]").get_attribute("accept")
    assert "image/*" in accepts and "video/*" in accepts
    picture = noise_png(tmp_path / "noise.png")
    page.set_settings(max_tokens=16)
    page.send("What is in this picture?", files=(picture,))
    page.wait_reply(1)
    shown_images = page.js("return [...document.querySelectorAll("
                           "'#chat-history [data-testid=\"user\"] img')].map(e => e.src)")
    assert any(src.endswith("/noise.png") for src in shown_images), shown_images
    stats = SUMMARY.match(page.stats())
    assert stats, page.stats()
    page.shot("vision-upload")
    # The page's request carried the image: the same content sent here
    # makes a prompt of as many tokens, and the text alone of fewer.
    client = openai.OpenAI(base_url=up.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    data = base64.b64encode(picture.read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
             {"type": "text", "text": "What is in this picture?"}]
    with_image = client.chat.completions.create(
        model="default", max_tokens=1, messages=[{"role": "user", "content": parts}])
    text_only = client.chat.completions.create(
        model="default", max_tokens=1, messages=[{"role": "user", "content": parts[1]["text"]}])
    assert int(stats.group(2)) == with_image.usage.prompt_tokens
    assert text_only.usage.prompt_tokens < with_image.usage.prompt_tokens


def test_stop_ends_the_generation_in_the_engine(vision_chat):
    up, page = vision_chat
    gateway = f"http://127.0.0.1:{up.port}"
    longest = 3900  # the tiny model's context is 4096; greedy, it never stops early
    page.click("#chat-clear")  # the prompt and the longest reply must fit the context
    page.set_settings(temperature=0, max_tokens=longest)
    before = metric(gateway, "vllm_mlx_engine_generation_tokens_total")
    page.send("Tell me a long story.")
    page.until(lambda: len(page.replies()) == 1 and page.replies()[0].strip()
               and page.streaming(), 30, "the long reply never started")
    page.click("#chat-stop")
    stopped_at = time.monotonic()
    assert wait_until(lambda: metric(gateway, "vllm_mlx_engine_running") == 0, 10)
    generated = metric(gateway, "vllm_mlx_engine_generation_tokens_total") - before
    assert 0 < generated < longest, generated  # aborted, not run to its end
    time.sleep(1)
    assert metric(gateway, "vllm_mlx_engine_generation_tokens_total") - before == generated
    page.until(lambda: page.stats() == "Stopped." and not page.streaming(), 10,
               "the page did not say it stopped")
    print(f"[chat] stop: engine idle {time.monotonic() - stopped_at:.2f}s after the click, "
          f"{generated:.0f} of {longest} tokens generated")
    page.shot("stopped")
    # The page is usable again at once.
    page.set_settings(max_tokens=8)
    page.send("Hello")
    page.wait_reply(2)


def test_a_refused_request_reads_as_the_servers_message(vision_chat):
    up, page = vision_chat
    page.click("#chat-clear")
    page.set_settings(max_tokens=5000)  # past the tiny model's context of 4096
    page.send("Hello")
    page.until(lambda: len(page.replies()) == 1 and not page.streaming(), 30, "no answer")
    refusal = page.replies()[0]
    assert refusal.startswith(f"{ERROR_MARK} The server answered 400:"), refusal
    assert "context length of 4096 tokens" in refusal, refusal
    page.click("#chat-clear")


def test_the_chat_ui_is_restarted_like_the_other_processes(vision_chat):
    up, page = vision_chat
    first = up.pid("chat")
    after = len(up.lines)
    os.kill(first, signal.SIGKILL)
    assert up.pid("chat", after=after) != first
    assert wait_until(lambda: answers(page.url, timeout=1), 120)
    page.open()  # the page is back, and chats
    page.set_settings(max_tokens=8)
    page.send("Hello")
    page.wait_reply(1)


# -- vllm-mlx-chat on its own, SmolLM2 behind a relay -----------------------------


class TextStack:
    """`vllm-mlx-up` with the embedded model on a fixed port, a relay before
    it, and the chat page pointed at the relay; the first two can be stopped
    and started again."""

    def __init__(self, cache: Path):
        self.cache, self.port = cache, free_port()
        self.up = self.relay = None
        self.start()
        self.chat_port = free_port()
        self.chat = Running([sys.executable, "-m", "vllm_mlx.chat", "--server-url",
                             f"http://127.0.0.1:{self.relay.port}", "--port",
                             str(self.chat_port), "--share", "--max-tokens", "40",
                             "--temperature", "0"])
        self.chat.wait_for(r"ready: http://127\.0\.0\.1:\d+", timeout=120)

    def start(self) -> None:
        self.up = Up(cache=self.cache, port=self.port)
        self.up.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving SmolLM2-135M-Instruct")
        self.relay = Relay(self.port, port=self.relay.port if self.relay else 0)

    def stop_server(self) -> None:
        self.relay.close()
        self.up.stop()

    def close(self) -> None:
        self.chat.stop()
        self.stop_server()


@pytest.fixture(scope="module")
def text_chat(tmp_path_factory, browser):
    stack = TextStack(tmp_path_factory.mktemp("cache"))
    try:
        page = ChatPage(browser, f"http://127.0.0.1:{stack.chat_port}/")
        page.open()
        yield stack, page
    finally:
        stack.close()


def normalized(text: str) -> str:
    return " ".join(text.split())


@needs_smollm2
def test_text_chat_streams_and_sends_the_history(text_chat):
    stack, page = text_chat
    assert "SmolLM2-135M-Instruct" in page.texts("#chat-server")[0]
    # /v1/models says the model takes text only: no upload widget.
    assert not page.js("return !!document.querySelector('#chat-input input[type=file]')")
    system = "You are a helpful assistant. Answer in one sentence."
    page.set_settings(top_p=0.9, system_prompt=system)

    page.send("What is the capital of France?")
    first = page.wait_reply(1)
    assert SUMMARY.match(page.stats()), page.stats()
    page.send("And the capital of Germany?")
    page.wait_reply(2)
    page.shot("text-chat")

    requests = stack.relay.chat_requests()
    assert len(requests) == 2, json.dumps(requests, indent=1)
    first_request, follow_up = requests
    assert first_request["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is the capital of France?"}]
    history = follow_up["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[:2] == first_request["messages"]
    assert normalized(history[2]["content"]) == normalized(first)
    assert history[3] == {"role": "user", "content": "And the capital of Germany?"}
    # The command line's settings and the panel's, as sent.
    assert (follow_up["model"], follow_up["temperature"], follow_up["top_p"],
            follow_up["max_tokens"], follow_up["stream"]) == \
        ("SmolLM2-135M-Instruct", 0, 0.9, 40, True)
    assert follow_up["stream_options"] == {"include_usage": True}

    page.click("#chat-regenerate")
    page.until(lambda: len(stack.relay.chat_requests()) == 3, 20, "regenerate sent nothing")
    page.wait_reply(2)
    assert len(page.replies()) == 2
    assert stack.relay.chat_requests()[2]["messages"] == history

    page.click("#chat-clear")
    page.until(lambda: not page.replies(), 10, "clear left replies")
    page.send("Hello")
    page.wait_reply(1)
    assert stack.relay.chat_requests()[-1]["messages"][1:] == [
        {"role": "user", "content": "Hello"}]


@needs_smollm2
def test_a_stopped_server_shows_a_readable_error_then_chat_resumes(text_chat):
    stack, page = text_chat
    stack.stop_server()
    page.send("Are you there?")
    page.until(lambda: len(page.replies()) == 2 and not page.streaming(), 30,
               "no reply while the server was down")
    error = page.replies()[1]
    assert ERROR_MARK in error and "Cannot reach the server" in error, error
    assert "Traceback" not in error and "File \"" not in error
    page.shot("server-down")

    stack.start()
    page.send("Hello again")
    page.wait_reply(3, errors=1)
    # The exchange that failed is not sent back to the model.
    last = stack.relay.chat_requests()[-1]["messages"]
    assert [m["content"] for m in last if m["role"] == "user"] == ["Hello", "Hello again"]
    page.shot("server-back")


@needs_smollm2
def test_share_without_network_says_so_and_serves_locally(text_chat):
    stack, page = text_chat
    log = stack.chat.text()
    assert ("could not make a public link" in log) or re.search(r"ready: .* and https://", log)
    assert "Traceback" not in log


# -- what the page offers, and what it sends (no browser) -------------------------


def test_uploads_follow_the_models_metadata():
    from vllm_mlx.chat.app import build
    from vllm_mlx.chat.client import ServedModel
    from vllm_mlx.settings import ChatSettings

    def upload_types(settings: ChatSettings, model: ServedModel | None):
        page = build(settings, model)
        box = next(b for b in page.blocks.values() if getattr(b, "elem_id", "") == "chat-input")
        return getattr(box, "file_types", None)

    vlm = ServedModel("vlm", ["text", "image", "video"])
    assert upload_types(ChatSettings(), vlm) == ["image", "video"]
    assert upload_types(ChatSettings(), ServedModel("lm", ["text"])) is None
    assert upload_types(ChatSettings(), ServedModel("images", ["text", "image"])) == ["image"]
    assert upload_types(ChatSettings(text_only=True), vlm) is None
    # A server that does not say, or does not answer: uploads offered, as the
    # seed's chat does by default.
    assert upload_types(ChatSettings(), ServedModel("other", None)) == ["image", "video"]
    assert upload_types(ChatSettings(), None) == ["image", "video"]


def test_the_request_leaves_out_exchanges_that_got_no_reply(tmp_path):
    picture = noise_png(tmp_path / "p.png")
    history = [Exchange("one", reply="first"),
               Exchange("down?", error="Cannot reach the server"),
               Exchange("stopped early"),               # stopped before any text
               Exchange("look", files=[str(picture)])]
    messages = openai_messages(history, "Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    image, text = messages[-1]["content"]
    assert text == {"type": "text", "text": "look"}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (128, 96)
    assert openai_messages(history[:1], "  ") == [{"role": "user", "content": "one"}]
    # Shown: every exchange, the error in words.
    assert [m["role"] for m in shown(history)] == ["user", "assistant"] * 2 + ["user"] * 2
    assert shown(history)[3]["content"] == "⚠️ Cannot reach the server"
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")
    assert media_part(str(clip))["type"] == "video_url"
    with pytest.raises(ValueError, match="neither an image nor a video"):
        media_part(str(tmp_path / "notes.txt"))


def test_reply_figures_whether_tokens_came_one_by_one_or_together():
    from vllm_mlx.chat.client import Reply

    streamed = Reply(completion_tokens=9, ttft_s=0.5, decode_s=2.0, prompt_tokens=30)
    assert SUMMARY.match(streamed.summary())
    assert "4.0 tokens/s" in streamed.summary()  # 8 gaps in 2 s after the first token
    # A busy server may send a short reply in one piece: the rate is then
    # over the time to that piece, never left out.
    together = Reply(completion_tokens=8, ttft_s=0.5, prompt_tokens=30, finish_reason="length")
    assert SUMMARY.match(together.summary())
    assert "16.0 tokens/s" in together.summary()
    assert together.summary().endswith("stopped at max tokens")
