"""`vllm-mlx-chat`: a chat page in the browser for a vllm-mlx server, or any
OpenAI-compatible one, through the OpenAI API. Replies stream as they are
generated; images and videos can be attached when the model takes them
(multimodal mode, unless the server's /v1/models says text only).

  vllm-mlx-chat --server-url http://localhost:8000 --port 7860
  vllm-mlx-chat --text-only
"""

import argparse
import asyncio
import os
import sys

from vllm_mlx.chat.client import ServedModel, make_client, readable, served_model
from vllm_mlx.flags import HelpFormatter
from vllm_mlx.settings import API_KEY_ENV, ChatSettings
from vllm_mlx.supervision import lifeline


def say(message: str) -> None:
    print(f"[vllm-mlx-chat] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    d = ChatSettings()
    ap = argparse.ArgumentParser(prog="vllm-mlx-chat", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--server-url", default=d.server_url,
                    help="the server (its OpenAI API is under /v1)")
    ap.add_argument("--host", default=d.host, help="address the page is served on")
    ap.add_argument("--port", type=int, default=d.port, help="port the page is served on")
    ap.add_argument("--share", action="store_true",
                    help="also make a public link through Gradio's share servers (needs the "
                         "network)")
    ap.add_argument("--text-only", action="store_true",
                    help="no image or video uploads, whatever the model takes")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens,
                    help="most tokens in one reply (the settings panel changes it)")
    ap.add_argument("--temperature", type=float, default=d.temperature,
                    help="sampling temperature (the settings panel changes it)")
    ap.add_argument("--top-p", type=float, default=d.top_p,
                    help="nucleus sampling (the settings panel changes it)")
    ap.add_argument("--system-prompt", default=d.system_prompt,
                    help="system message sent before the chat (the settings panel changes it)")
    # Not shown in --help: its default may be a secret from the environment.
    ap.add_argument("--api-key", default=argparse.SUPPRESS,
                    help=f"the server's API key (or set {API_KEY_ENV})")
    return ap


def parse_settings(argv: list[str] | None = None) -> ChatSettings:
    ap = build_parser()
    args = vars(ap.parse_args(argv))
    args["api_key"] = args.get("api_key") or os.environ.get(API_KEY_ENV)
    if args["max_tokens"] < 1:
        ap.error("--max-tokens must be at least 1")
    if not 0 < args["top_p"] <= 1:
        ap.error("--top-p must be in (0, 1]")
    if args["temperature"] < 0:
        ap.error("--temperature must be at least 0")
    return ChatSettings(**args)


async def probe(settings: ChatSettings) -> ServedModel | None:
    """What the server serves, or None (said why) when it does not answer."""
    try:
        async with make_client(settings.server_url, settings.api_key) as client:
            return await served_model(client)
    except Exception as e:  # noqa: BLE001 - the page starts anyway and says so
        say(f"{readable(e, settings.server_url)} The page starts anyway.")
        return None


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    lifeline.watch()  # end with vllm-mlx-up, however it ends
    # Gradio asks the network for its latest version unless told not to.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vllm_mlx.chat import app

    model = asyncio.run(probe(settings))
    if model is not None and model.modalities is None:
        say(f"{settings.server_url} serves {model.name} (it does not say what the model "
            f"takes in: uploads are offered)")
    elif model is not None:
        say(f"{settings.server_url} serves {model.name}, which takes "
            f"{', '.join(model.modalities)}")
    page = app.build(settings, model)
    try:
        page.launch(server_name=settings.host, server_port=settings.port,
                    share=settings.share, prevent_thread_lock=True, quiet=True,
                    ssr_mode=False, theme=app.THEME, css=app.CSS, footer_links=[])
    except OSError as e:
        say(f"error: cannot serve on {settings.host}:{settings.port}: {e}")
        sys.exit(1)
    if settings.share and not page.share_url:
        say("--share: Gradio could not make a public link (it needs the network); "
            "the page is served locally only")
    say(f"ready: {page.local_url}" + (f" and {page.share_url}" if page.share_url else ""))
    page.block_thread()


if __name__ == "__main__":
    main()
