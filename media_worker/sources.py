"""Where an item's bytes come from: a data: URL, an http(s) URL, or a local
file under an allowed root. Each returns the raw bytes, capped in size."""

import base64
import binascii
import os
import re
import stat
import urllib.parse

from media_worker.errors import MediaError
from media_worker.fetch import FetchPolicy, fetch_url

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)\Z",
                       re.DOTALL | re.IGNORECASE)


def _check_mime(mime: str, kind: str, where: str) -> None:
    # Generic binary types carry no claim; a wrong top-level type is a mistake
    # we name instead of letting the decoder fail on it.
    mime = mime.split(";")[0].strip().lower()
    if mime and mime != "application/octet-stream" and not mime.startswith(kind + "/"):
        raise MediaError(f"{where} has type {mime!r}, not an {kind}" if kind == "image"
                         else f"{where} has type {mime!r}, not a {kind}")


def read_data_url(url: str, kind: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise MediaError("malformed data URL (expected data:<type>;base64,<data>)")
    params = [p.strip().lower() for p in m["params"].split(";") if p.strip()]
    if "base64" not in params:
        raise MediaError("data URLs must be base64-encoded (data:<type>;base64,...)")
    mime = m["mime"].strip().lower()
    if not mime:
        raise MediaError(f"data URL has no media type (expected data:{kind}/...;base64,...)")
    _check_mime(mime, kind, "data URL")
    payload = re.sub(r"\s+", "", m["payload"])
    # Checked before decoding, so an oversized payload costs no memory.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise MediaError(f"the media is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise MediaError(f"the media is {len(data)} bytes, over the limit of {max_bytes} bytes")
    if not data:
        raise MediaError("data URL is empty")
    return data


def resolve_local_path(path: str, roots: tuple[str, ...]) -> str:
    """The real path of `path` if it lies under one of `roots` after every
    link and `..` is resolved; MediaError otherwise."""
    if not roots:
        raise MediaError("local media paths are not allowed (the server has no "
                         "--allowed-local-media-path)")
    if not path or "\0" in path:
        raise MediaError("invalid local path")
    real = os.path.realpath(path)
    for root in roots:
        root_real = os.path.realpath(root)
        if os.path.commonpath([real, root_real]) == root_real:
            return real
    raise MediaError(f"local path {path!r} is outside the allowed media paths")


def read_local_file(path: str, roots: tuple[str, ...], max_bytes: int) -> bytes:
    real = resolve_local_path(path, roots)
    try:
        # O_NOFOLLOW: the last component cannot be swapped for a link after the
        # check. O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise MediaError(f"local file {path!r} does not exist") from None
    except OSError as e:
        raise MediaError(f"cannot open local file {path!r}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(f"local path {path!r} is not a regular file")
        if st.st_size > max_bytes:
            raise MediaError(f"the media is {st.st_size} bytes, over the limit of "
                             f"{max_bytes} bytes")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise MediaError(f"the media is over the limit of {max_bytes} bytes")
    return data


def read_source(url: str | None, path: str | None, kind: str, policy: FetchPolicy,
                roots: tuple[str, ...]) -> bytes:
    """The bytes of one item, from exactly one of `url` and `path`."""
    if path is not None:
        return read_local_file(path, roots, policy.max_bytes)
    if not url:
        raise MediaError("no url or path given")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return read_data_url(url, kind, policy.max_bytes)
    if scheme in ("http", "https"):
        # Servers label media loosely (octet-stream, text/plain); the decoder
        # decides what the bytes are.
        return fetch_url(url, policy)[0]
    if scheme == "file":  # as vLLM takes them: a local path, under the same roots
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file URL of another host ({parts.netloc!r}) is not allowed")
        return read_local_file(urllib.parse.unquote(parts.path), roots, policy.max_bytes)
    raise MediaError(f"URL scheme {scheme!r} is not allowed (http, https, data, and file "
                     f"under --allowed-local-media-path)"
                     if scheme else "not a URL (expected http(s)://, data: or file://)")
