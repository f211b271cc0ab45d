"""The chat page: history, a message box (with uploads in multimodal mode),
stop, regenerate and clear, a settings panel, and each reply's figures."""

import asyncio
import time

import gradio as gr

from vllm_mlx.chat.client import ServedModel, make_client, readable, served_model, stream_reply
from vllm_mlx.chat.conversation import Exchange, openai_messages, shown
from vllm_mlx.settings import ChatSettings

# System fonts: Gradio's default theme fetches web fonts, which an offline
# machine cannot.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
CSS = "#chat-stats { min-height: 1.5em; }"
# A reply is redrawn at most this often: the browser renders the whole
# message again each time, and a fast server sends hundreds of tokens a second.
REDRAW_EVERY_S = 0.05


def describe(settings: ChatSettings, model: ServedModel | None) -> str:
    if model is None:
        return f"Server: {settings.server_url} (not answering yet)"
    return f"Server: {settings.server_url} · model: **{model.name}**"


def controls(streaming: bool) -> tuple:
    """The message box, regenerate and stop: while a reply streams, only stop
    (nothing else may start another reply)."""
    return (gr.update(interactive=not streaming), gr.update(interactive=not streaming),
            gr.update(interactive=streaming))


def build(settings: ChatSettings, model: ServedModel | None) -> gr.Blocks:
    """The page. `model` is what the server said at start-up (None if it did
    not answer): uploads are offered unless it takes text only or
    `settings.text_only` is set."""
    media = [] if settings.text_only else (model.media if model else ["image", "video"])

    async def server_line() -> str:
        try:
            async with make_client(settings.server_url, settings.api_key) as client:
                return describe(settings, await served_model(client))
        except Exception:  # noqa: BLE001 - a server that does not answer is shown so
            return describe(settings, None)

    def add_message(message, history: list[Exchange]):
        text, files = (message["text"], message["files"]) if media else (message, [])
        if not text.strip() and not files:
            return (gr.skip(),) * 5
        history = [*history, Exchange(text.strip(), list(files))]
        _, again_off, stop_on = controls(True)
        return history, shown(history), gr.update(value=None, interactive=False), again_off, \
            stop_on

    def regenerate(history: list[Exchange]):
        if not history:
            return (gr.skip(),) * 5
        history = [*history[:-1], Exchange(history[-1].text, history[-1].files)]
        return history, shown(history), *controls(True)

    async def respond(history: list[Exchange], temperature: float, top_p: float,
                      max_tokens: float, system_prompt: str):
        if not history or history[-1].reply or history[-1].error:
            return
        exchange = history[-1]
        try:
            async with make_client(settings.server_url, settings.api_key) as client:
                served = await served_model(client)
                messages = openai_messages(history, system_prompt)
                drawn = 0.0
                async for reply in stream_reply(client, served.name, messages,
                                                temperature=temperature, top_p=top_p,
                                                max_tokens=int(max_tokens)):
                    exchange.reply = reply.text
                    if time.monotonic() - drawn >= REDRAW_EVERY_S:
                        drawn = time.monotonic()
                        yield shown(history), history, "Generating...", gr.skip()
                yield shown(history), history, reply.summary(), describe(settings, served)
        except asyncio.CancelledError:
            raise  # the stop button: the reply stays as far as it was shown
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            exchange.error = readable(e, settings.server_url)
            yield shown(history), history, "", gr.skip()

    with gr.Blocks(title="vllm-mlx chat", analytics_enabled=False) as page:
        history = gr.State([])
        gr.Markdown("## vllm-mlx chat")
        server = gr.Markdown(describe(settings, model), elem_id="chat-server")
        chatbot = gr.Chatbot(elem_id="chat-history", height=520, show_label=False,
                             feedback_options=None, buttons=["copy"])
        stats = gr.Markdown("", elem_id="chat-stats")
        if media:
            box = gr.MultimodalTextbox(
                placeholder=f"Type a message, or attach {' or '.join(media)} files",
                file_types=media, file_count="multiple", sources=["upload"],
                show_label=False, elem_id="chat-input", autofocus=True)
        else:
            box = gr.Textbox(placeholder="Type a message", show_label=False,
                             elem_id="chat-input", submit_btn=True, autofocus=True)
        with gr.Row():
            stop = gr.Button("Stop", elem_id="chat-stop", variant="stop", size="sm",
                             interactive=False)
            again = gr.Button("Regenerate", elem_id="chat-regenerate", size="sm")
            clear = gr.Button("Clear", elem_id="chat-clear", size="sm")
        with gr.Accordion("Settings", open=False, elem_id="chat-settings"):
            temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05,
                                    label="Temperature", elem_id="chat-temperature")
            top_p = gr.Slider(0.01, 1.0, value=settings.top_p, step=0.01, label="Top p",
                              elem_id="chat-top-p")
            max_tokens = gr.Number(settings.max_tokens, label="Max tokens", precision=0,
                                   minimum=1, elem_id="chat-max-tokens")
            system_prompt = gr.Textbox(settings.system_prompt, label="System prompt",
                                       lines=2, elem_id="chat-system-prompt")

        reply = dict(fn=respond, inputs=[history, temperature, top_p, max_tokens, system_prompt],
                     outputs=[chatbot, history, stats, server], concurrency_limit=None,
                     show_progress="hidden")
        buttons = [box, again, stop]
        done = dict(fn=lambda: controls(False), inputs=None, outputs=buttons, queue=False)
        sent = box.submit(add_message, [box, history], [history, chatbot, *buttons],
                          queue=False).then(**reply)
        sent.then(**done)
        redone = again.click(regenerate, [history], [history, chatbot, *buttons],
                             queue=False).then(**reply)
        redone.then(**done)
        stop.click(lambda: controls(False), None, buttons, queue=False,
                   cancels=[sent, redone]).then(lambda: "Stopped.", None, stats, queue=False)
        for cleared in (clear.click, chatbot.clear):  # the button, and the Chatbot's own icon
            cleared(lambda: ([], [], "", *controls(False)), None,
                    [history, chatbot, stats, *buttons], queue=False, cancels=[sent, redone])
        page.load(server_line, None, server)
    return page
