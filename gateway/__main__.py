"""`python -m gateway --engine HOST:PORT --port P`: the OpenAI-compatible HTTP
front of one engine, in one or more uvicorn worker processes on one port."""

import argparse
import atexit
import logging
import os
import shutil
import tempfile

import uvicorn

from gateway.config import API_KEY_ENV, SETTINGS_ENV, GatewaySettings
from vllm_mlx.flags import HelpFormatter
from vllm_mlx.supervision import lifeline


def build_parser() -> argparse.ArgumentParser:
    d = GatewaySettings()
    ap = argparse.ArgumentParser(prog="python -m gateway", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--engine", default=d.engine, help="the engine's gRPC address (host:port)")
    ap.add_argument("--host", default=d.host, help="address to listen on")
    ap.add_argument("--port", type=int, default=d.port, help="HTTP port")
    # Not shown in --help: its default may be a secret from the environment.
    ap.add_argument("--api-key", default=argparse.SUPPRESS,
                    help=f"require this key on every route but /health (or set {API_KEY_ENV})")
    ap.add_argument("--served-model-name",
                    help="the model name clients use (default: the engine's)")
    ap.add_argument("--model-alias", action="append", default=[], metavar="ALIAS",
                    help="another name accepted for the model; repeatable")
    ap.add_argument("--workers", type=int, default=d.workers,
                    help="gateway processes sharing the port")
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                    help="seconds one generation may take before a 504")
    ap.add_argument("--max-choices", type=int, default=d.max_choices,
                    help="most choices (n x prompts) in one request")
    g = ap.add_argument_group("connection guards (per gateway process)")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; past it new ones get a 503")
    g.add_argument("--max-connections-per-client", type=int,
                   default=d.max_connections_per_client,
                   help="open connections from one address; past it a 429 (raise it "
                        "behind a reverse proxy)")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds for a request's headers to arrive (408 after)")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request body may pause (408 after)")
    g.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="request line and headers (431 past it)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="larger bodies get a 413 before they are read")
    r = ap.add_argument_group("request size caps")
    r.add_argument("--max-messages", type=int, default=d.max_messages,
                   help="messages in one chat request")
    r.add_argument("--max-content-parts", type=int, default=d.max_content_parts,
                   help="content parts in one message")
    r.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help="stop strings in one request")
    r.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="characters of one prompt or message (tokens of a token-id prompt)")
    ap.add_argument("--log-level", default=d.log_level, help="uvicorn's and the gateway's")
    return ap


def parse_args(argv: list[str] | None = None) -> GatewaySettings:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error("--workers must be at least 1")
    return GatewaySettings(
        engine=a.engine, host=a.host, port=a.port,
        api_key=getattr(a, "api_key", None) or os.environ.get(API_KEY_ENV) or None,
        served_model_name=a.served_model_name, model_aliases=a.model_alias,
        workers=a.workers, request_timeout_s=a.request_timeout, max_choices=a.max_choices,
        max_connections=a.max_connections,
        max_connections_per_client=a.max_connections_per_client,
        header_timeout_s=a.header_timeout, body_timeout_s=a.body_timeout,
        max_header_bytes=a.max_header_bytes, max_body_bytes=a.max_body_bytes,
        max_messages=a.max_messages, max_content_parts=a.max_content_parts,
        max_stop_strings=a.max_stop_strings, max_prompt_chars=a.max_prompt_chars,
        log_level=a.log_level)


def _multiprocess_metrics_dir() -> None:
    """Workers write their metrics to files here so that any of them can
    answer a scrape with all of them; set before any worker starts."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="vllm-mlx-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def _raise_open_file_limit(max_connections: int) -> None:
    """Room for max_connections sockets and the gRPC channel beside them (the
    soft limit is 256 on macOS, 1024 on many Linux systems)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + 512
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < want:
        logging.getLogger("gateway").warning(
            "open-file limit %d is below --max-connections %d plus headroom; new connections "
            "may fail before the cap answers", soft, max_connections)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    lifeline.watch()  # end with vllm-mlx-up, however it ends
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ[SETTINGS_ENV] = settings.to_env()
    if settings.workers > 1:
        _multiprocess_metrics_dir()
    logging.getLogger("gateway").info(
        "gateway on http://%s:%d (%d worker%s), engine at %s", settings.host, settings.port,
        settings.workers, "s" if settings.workers > 1 else "", settings.engine)
    _raise_open_file_limit(settings.max_connections)
    uvicorn.run("gateway.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level, access_log=False,
                http="gateway.connections:GuardedHttpToolsProtocol",
                # Streams can be long; on SIGTERM give them a moment, then go.
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
