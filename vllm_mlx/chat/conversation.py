"""The history a chat page keeps, one exchange per message sent, and what it
becomes: the OpenAI messages sent to the server and the messages shown."""

import base64
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Exchange:
    text: str
    files: list[str] = field(default_factory=list)  # uploaded images and videos
    reply: str = ""
    error: str = ""  # shown in the chat in place of a reply; never sent back


def media_kind(path: str) -> str:
    """"image" or "video", from the file's name."""
    kind = (mimetypes.guess_type(path)[0] or "").split("/")[0]
    if kind not in ("image", "video"):
        raise ValueError(f"{Path(path).name} is neither an image nor a video")
    return kind


def media_part(path: str) -> dict:
    """An uploaded file as an OpenAI content part with a data: URL (the
    server may run on another machine, so never a local path)."""
    kind = media_kind(path)
    mime = mimetypes.guess_type(path)[0]
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": f"{kind}_url", f"{kind}_url": {"url": f"data:{mime};base64,{data}"}}


def user_message(exchange: Exchange) -> dict:
    if not exchange.files:
        return {"role": "user", "content": exchange.text}
    parts = [media_part(p) for p in exchange.files]
    if exchange.text:
        parts.append({"type": "text", "text": exchange.text})
    return {"role": "user", "content": parts}


def openai_messages(history: list[Exchange], system_prompt: str) -> list[dict]:
    """The request for the last exchange's reply. Earlier exchanges that got
    no reply (an error, or stopped before any text) are left out, so user and
    assistant turns alternate as chat templates expect."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for exchange in history[:-1]:
        if exchange.reply and not exchange.error:
            messages += [user_message(exchange), {"role": "assistant", "content": exchange.reply}]
    return messages + [user_message(history[-1])]


def shown(history: list[Exchange]) -> list[dict]:
    """The Chatbot's messages: the uploads and the text sent, then the reply
    as far as it came and the error that ended it, if any."""
    messages = []
    for exchange in history:
        content = [{"path": p} for p in exchange.files]
        if exchange.text:
            content.append(exchange.text)
        messages.append({"role": "user", "content": content})
        warning = f"⚠️ {exchange.error}" if exchange.error else ""
        reply = "\n\n".join(filter(None, [exchange.reply, warning]))
        if reply:
            messages.append({"role": "assistant", "content": reply})
    return messages
