"""The gateway's settings, and how they reach uvicorn's worker processes."""

import json
import os
import time
from dataclasses import asdict, dataclass, field

from vllm_mlx.settings import API_KEY_ENV, DEFAULT_ENGINE_PORT, DEFAULT_HOST

# uvicorn starts workers by importing an app factory in a fresh process, so
# settings travel through the environment rather than through arguments.
SETTINGS_ENV = "VLLM_MLX_GATEWAY_SETTINGS"
DEFAULT_GATEWAY_PORT = 8000


@dataclass
class GatewaySettings:
    engine: str = f"{DEFAULT_HOST}:{DEFAULT_ENGINE_PORT}"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_GATEWAY_PORT
    api_key: str | None = None
    # None: the name the engine reports (GetModelInfo).
    served_model_name: str | None = None
    model_aliases: list[str] = field(default_factory=list)
    workers: int = 1
    # Deadline of one Generate call: the longest a request may run.
    request_timeout_s: float = 600.0
    # Deadline of the health check behind GET /health; a hung engine must
    # not hang the probe.
    health_timeout_s: float = 1.0
    # Most choices (n x prompts) one request may fan out to.
    max_choices: int = 128
    # Connection guards (gateway/connections.py), per worker process.
    max_connections: int = 4096
    # Behind a reverse proxy every client has the proxy's address: raise it.
    max_connections_per_client: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0  # with no byte of the body arriving
    max_header_bytes: int = 64 * 1024
    # One data: URL at the media workers' 50 MB cap, base64-encoded, fits.
    max_body_bytes: int = 72 * 1024 * 1024
    # What one request may hold: 100,000 messages slowed a concurrent chat
    # from 0.4 s to 8.2 s, and 100,000 stop strings tripled a request's time
    # on the engine front end's event loop (each is scanned per token).
    max_messages: int = 4096
    max_content_parts: int = 1024  # in one message
    max_stop_strings: int = 64
    max_prompt_chars: int = 4 * 1024 * 1024  # one prompt or message text
    # `created` of the model objects: one value for every worker.
    started_at: int = field(default_factory=lambda: int(time.time()))
    log_level: str = "info"

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "GatewaySettings":
        raw = os.environ.get(SETTINGS_ENV)
        settings = cls(**json.loads(raw)) if raw else cls()
        if settings.api_key is None:
            settings.api_key = os.environ.get(API_KEY_ENV) or None
        return settings
