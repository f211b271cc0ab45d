"""http(s) downloads that cannot be pointed at the machine's own network.

Every hop (the first URL and each redirect) is checked the same way: scheme,
allowed domains, then DNS, and the connection goes to the address that was
checked, so a second DNS answer (rebinding) is never used. The body is
streamed under a byte cap, and one deadline covers the whole fetch.
"""

import http.client
import ipaddress
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from media_worker.errors import MediaError

REDIRECTS = {301, 302, 303, 307, 308}
CHUNK = 64 * 1024
# getaddrinfo has no timeout of its own; it runs here so the deadline holds.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dns")


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    allowed_domains: tuple[str, ...] = ()
    max_bytes: int = 50 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 5


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for loopback, private, link-local, shared (CGNAT), reserved,
    multicast and unspecified addresses, including IPv4 ones written as IPv6."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public(mapped)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _domain_allowed(host: str, domains: tuple[str, ...]) -> bool:
    host = host.rstrip(".").lower()
    return any(host == d or host.endswith("." + d)
               for d in (d.strip(".").lower() for d in domains))


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError(f"fetching the URL took longer than the timeout ({what})")
    return left


def _resolve(host: str, port: int, policy: FetchPolicy, deadline: float) -> list[str]:
    """The addresses to try, all checked; refuses if any answer is not public,
    since a name that can point inside is not one we fetch."""
    try:
        literal = ipaddress.ip_address(host)
        infos = [str(literal)]
    except ValueError:
        future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            answers = future.result(timeout=_remaining(deadline, "resolving the host"))
        except FutureTimeout:
            raise MediaError(f"fetching the URL took longer than the timeout "
                             f"(resolving {host!r})") from None
        except OSError as e:
            raise MediaError(f"cannot resolve host {host!r}: {e}") from None
        infos = list(dict.fromkeys(a[4][0] for a in answers))
    if not policy.allow_private:
        for addr in infos:
            if not is_public(ipaddress.ip_address(addr.split("%")[0])):
                raise MediaError(f"URL host {host!r} resolves to {addr}, a private, loopback, "
                                 "link-local or reserved address, which is not allowed")
    if not infos:
        raise MediaError(f"cannot resolve host {host!r}")
    return infos


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a checked address while speaking HTTP to the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with TLS verified against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _check_url(url: str, policy: FetchPolicy) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"URL scheme {parts.scheme!r} is not allowed (http and https only)")
    host = parts.hostname
    if not host:
        raise MediaError("URL has no host")
    if parts.username or parts.password:
        raise MediaError("URLs with credentials are not allowed")
    if policy.allowed_domains and not _domain_allowed(host, policy.allowed_domains):
        raise MediaError(f"URL host {host!r} is not in the allowed media domains")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise MediaError("URL has an invalid port") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


def _read_body(resp: http.client.HTTPResponse, sock: socket.socket | None,
               policy: FetchPolicy, deadline: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise MediaError(f"the media is {int(length)} bytes, over the limit of "
                         f"{policy.max_bytes} bytes")
    chunks, total = [], 0
    while True:
        if sock is not None:
            # A server that trickles bytes must not outlast the deadline.
            sock.settimeout(min(policy.timeout_s, _remaining(deadline, "reading the body")))
        chunk = resp.read1(CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > policy.max_bytes:
            raise MediaError(f"the media is over the limit of {policy.max_bytes} bytes")
        chunks.append(chunk)


def _get_once(url: str, policy: FetchPolicy, deadline: float
              ) -> tuple[int, str | None, bytes | None, str | None]:
    """One hop: (status, Location, body if 200, content type)."""
    scheme, host, port, target = _check_url(url, policy)
    addresses = _resolve(host, port, policy, deadline)
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    last_error: Exception | None = None
    for address in addresses:
        conn = cls(host, port, address, timeout=_remaining(deadline, "connecting"))
        try:
            conn.request("GET", target, headers={"User-Agent": "vllm-mlx-media",
                                                  "Accept-Encoding": "identity"})
            conn.sock.settimeout(_remaining(deadline, "waiting for the response"))
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                return resp.status, resp.getheader("Location"), None, None
            if resp.status != 200:
                raise MediaError(f"the URL answered HTTP {resp.status} {resp.reason}")
            body = _read_body(resp, conn.sock, policy, deadline)
            return 200, None, body, resp.getheader("Content-Type")
        except TimeoutError:
            raise MediaError(f"fetching the URL took longer than the timeout "
                             f"({policy.timeout_s:g} s)") from None
        except MediaError:
            raise
        except (OSError, http.client.HTTPException) as e:
            last_error = e  # try the host's next address
        finally:
            conn.close()
    raise MediaError(f"cannot fetch the URL: {last_error}")


def fetch_url(url: str, policy: FetchPolicy) -> tuple[bytes, str | None]:
    """The body and Content-Type of `url`, after following redirects; raises
    MediaError for anything refused or failed, within policy.timeout_s."""
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        status, location, body, content_type = _get_once(url, policy, deadline)
        if body is not None:
            return body, content_type
        if not location:
            raise MediaError(f"the URL answered HTTP {status} without a Location")
        url = urljoin(url, location)
    raise MediaError(f"the URL redirected more than {policy.max_redirects} times")
