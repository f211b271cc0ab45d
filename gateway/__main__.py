"""`python -m gateway --engine HOST:PORT --port P`: the OpenAI-compatible HTTP
front of one engine, in one or more uvicorn worker processes on one port."""

import argparse
import atexit
import logging
import os
import shutil
import tempfile

import uvicorn

from gateway.config import API_KEY_ENV, DEFAULT_GATEWAY_PORT, SETTINGS_ENV, GatewaySettings
from vllm_mlx import lifeline
from vllm_mlx.settings import DEFAULT_ENGINE_PORT, DEFAULT_HOST


def parse_args(argv: list[str] | None = None) -> GatewaySettings:
    ap = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    ap.add_argument("--engine", default=f"{DEFAULT_HOST}:{DEFAULT_ENGINE_PORT}",
                    help="the engine's gRPC address (host:port)")
    ap.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default loopback)")
    ap.add_argument("--port", type=int, default=DEFAULT_GATEWAY_PORT)
    ap.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                    help=f"require this key on every route but /health (or set {API_KEY_ENV})")
    ap.add_argument("--served-model-name",
                    help="the model name clients use (default: the engine's)")
    ap.add_argument("--model-alias", action="append", default=[], metavar="ALIAS",
                    help="another name accepted for the model; repeatable")
    ap.add_argument("--workers", type=int, default=1,
                    help="gateway processes sharing the port")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds one generation may take before a 504")
    ap.add_argument("--max-choices", type=int, default=128,
                    help="most choices (n x prompts) in one request")
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error("--workers must be at least 1")
    return GatewaySettings(
        engine=a.engine, host=a.host, port=a.port, api_key=a.api_key,
        served_model_name=a.served_model_name, model_aliases=a.model_alias,
        workers=a.workers, request_timeout_s=a.request_timeout, max_choices=a.max_choices,
        log_level=a.log_level)


def _multiprocess_metrics_dir() -> None:
    """Workers write their metrics to files here so that any of them can
    answer a scrape with all of them; set before any worker starts."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="vllm-mlx-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


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
    uvicorn.run("gateway.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level, access_log=False,
                # Streams can be long; on SIGTERM give them a moment, then go.
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
