"""Connection guards of the gateway's HTTP server, below the ASGI app.

uvicorn's HTTP protocol (httptools) has no header-read or body-read timeout
and no connection cap, and an attack run held 20,200 half-sent requests open
until the gateway ran out of file descriptors: /health and every request
then timed out. A 100 MB body was read and parsed whole before its 400. This
protocol refuses what it can before the app sees anything:

- more than `max_connections` open connections (503), or more than
  `max_connections_per_client` from one address (429: one client cannot
  starve the others);
- a request whose headers are not complete `header_timeout_s` after the
  connection (or the request) began, or whose body sends nothing for
  `body_timeout_s` (408);
- headers over `max_header_bytes` (431), a body over `max_body_bytes`
  (413), counted as they arrive, before any parsing.

The settings reach each uvicorn worker through the environment (config.py).
"""

import asyncio
import functools
import json
from collections import Counter

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import GatewaySettings

REASONS = {408: "Request Timeout", 413: "Content Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@functools.cache
def _settings() -> GatewaySettings:
    return GatewaySettings.from_env()


def refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP response in OpenAI's error envelope, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    retry = b"retry-after: 1\r\n" if status in (429, 503) else b""
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n" % (status, REASONS[status].encode(), len(body), retry)
            + body)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    per_client: Counter = Counter()  # open connections by client address, in this worker

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        s = _settings()
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._counted: str | None = None
        self._header_bytes = self._body_bytes = 0
        super().connection_made(transport)
        host = self.client[0] if self.client else ""
        if len(self.connections) > s.max_connections:
            return self._refuse(503, f"the gateway holds its limit of {s.max_connections} "
                                     f"connections; retry later", "too_many_connections")
        if self.per_client[host] >= s.max_connections_per_client:
            return self._refuse(429, f"{s.max_connections_per_client} connections from this "
                                     f"address are open already", "too_many_connections")
        self.per_client[host] += 1
        self._counted = host
        self._arm(s.header_timeout_s, "the request headers did not arrive in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted is not None:
            self.per_client[self._counted] -= 1
            if not self.per_client[self._counted]:
                del self.per_client[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_bytes = self._body_bytes = 0
        if self._timer is None:  # a later request on a kept-alive connection
            self._arm(_settings().header_timeout_s, "the request headers did not arrive in time")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._count_header(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count_header(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        s = _settings()
        declared = next((v for k, v in self.headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > s.max_body_bytes:
            return self._refuse(413, f"the body of {int(declared)} bytes is over the "
                                     f"{s.max_body_bytes}-byte limit", "body_too_large")
        self._arm(s.body_timeout_s, "the request body stopped arriving")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        s = _settings()
        self._body_bytes += len(body)
        if self._body_bytes > s.max_body_bytes:
            return self._refuse(413, f"the body is over the {s.max_body_bytes}-byte limit",
                                "body_too_large")
        self._arm(s.body_timeout_s, "the request body stopped arriving")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self._refused:
            super().on_message_complete()

    # -- guards ----------------------------------------------------------------------

    def _count_header(self, n: int) -> bool:
        if self._refused:
            return False
        self._header_bytes += n
        limit = _settings().max_header_bytes
        if self._header_bytes > limit:
            self._refuse(431, f"the request line and headers are over {limit} bytes",
                         "headers_too_large")
            return False
        return True

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._refuse, 408, why, "request_timeout")

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer and close, unless the app has begun its own answer (then
        only close: the app sees the client gone)."""
        self._disarm()
        self._refused = True
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(refusal(status, message, code))
        self.transport.close()
