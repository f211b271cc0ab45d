"""Settings shared by the command-line entry points and the worker processes."""

from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_ENGINE_PORT = 50051
# Clients should always set a deadline; this is the one our own clients use
# for calls that return at once (Abort, GetModelInfo, GetStats, health).
UNARY_DEADLINE_S = 5.0


@dataclass
class EngineSettings:
    model: str
    served_model_name: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_ENGINE_PORT
    # Requests decoded together; more wait in the queue.
    max_num_seqs: int = 64
    # Requests allowed to wait; past this Generate fails with RESOURCE_EXHAUSTED.
    max_queue: int = 256
    # Prompts prefilled together, and the chunk size a long prompt is cut into.
    prefill_batch_size: int = 8
    prefill_step_size: int = 2048
    # Overrides the model's own context length (max_position_embeddings).
    max_model_len: int | None = None
    warmup: bool = True
    # Streams send at most one message per interval after the first token;
    # the tokens of that interval travel together.
    stream_interval_s: float = 0.0
    # Reuse the KV of finished requests for later prompts that share a prefix.
    prefix_cache: bool = True
    # The cache's byte budget; None: derived from the machine's memory.
    prefix_cache_bytes: int | None = None
    # Weights + reserved KV + prefix cache stay under this; None: 90% of the
    # device's memory. Requests that do not fit yet wait; one that never can
    # is refused.
    max_memory: int | None = None
