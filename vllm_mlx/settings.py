"""Settings shared by the command-line entry points and the worker processes."""

import gc
import os
import sys
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
# The API key, for the gateway that requires it and the clients that send it.
API_KEY_ENV = "VLLM_MLX_API_KEY"
DEFAULT_ENGINE_PORT = 50051
# Clients should always set a deadline; this is the one our own clients use
# for calls that return at once (Abort, GetModelInfo, GetStats, health).
UNARY_DEADLINE_S = 5.0
# The largest message the engine takes and the gateway sends: a data: URL of
# tens of MB must reach the media workers (--max-media-bytes is 50 MB), and
# gRPC's default of 4 MiB refused one of 3 MB.
MAX_GRPC_MESSAGE_BYTES = 96 << 20


def favour_the_waiting_thread() -> None:
    """Let a thread that waits for the interpreter have it within 0.1 ms
    instead of Python's 5: for processes whose latency-critical thread (the
    engine loop; the engine front end's event loop, which forwards every
    token) shares it with threads that work in long stretches (the vision
    encoder, the core's request reader, the front end's request building).
    A whole default interval was a stall of every text stream."""
    sys.setswitchinterval(min(sys.getswitchinterval(), 1e-4))


def freeze_startup_objects() -> None:
    """Put what starting up made (modules, the app, a tokenizer, a model's
    Python objects), which lives as long as the process, out of the cyclic
    collector's view: a full collection pauses every thread, and scanning
    those objects made it 25 to 130 ms on the 2-core CPU, in processes that
    forward tokens a millisecond apart (docs/benchmarks.md). Garbage is collected first, so
    none of it is kept for good."""
    gc.collect()
    gc.freeze()


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
    # While other requests decode, a prompt prefills at most this many tokens
    # a step: a whole 2,048-token chunk stalls every stream for its pass (an
    # image prompt's ~1,000 tokens took one text gap from 1 to 6 ms on a GPU,
    # 50 on the CPU), where chunks of this size spread it over a few steps.
    prefill_chunk_while_decoding: int = 512
    # While requests keep arriving, they join in whole prefill batches,
    # waiting at most this long: each prefill pass costs several decode steps
    # whatever its size, and over gRPC a burst arrives spread over a few
    # milliseconds, which without waiting doubled the passes of raw mlx-lm's
    # (docs/benchmarks.md). An idle engine gathers a burst until 1 ms passes
    # with no new arrival. 0: no waiting.
    admit_window_s: float = 0.003
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
    # A folder that keeps the prefix cache across engine restarts (within its
    # byte budget, for this model only); None: kept in memory only.
    prefix_cache_dir: str | None = None
    # Weights + reserved KV + prefix cache stay under this; None: 90% of the
    # device's memory. Requests that do not fit yet wait; one that never can
    # is refused.
    max_memory: int | None = None
    # Freed buffers MLX's allocator keeps for reuse, in bytes; None: 5% of the
    # memory limit; 0: mlx-lm's own way, emptied after every prefill pass.
    allocator_cache_bytes: int | None = None
    # Load through mlx-vlm as a vision-language model even when the config
    # does not say so (auto-detected from vision_config otherwise).
    mllm: bool = False
    # Media workers (HOST:PORT) that prepare the images and videos of requests.
    media_workers: tuple[str, ...] = ()
    # A loaded engine core that sends nothing for this long (it reports every
    # decode step, and at least every 0.5 s otherwise) is taken for hung: the worker
    # kills it and exits, failing what was in flight, and its supervisor
    # starts a new one. Prompt passes are cut to take a 16th of it
    # (engine_worker/batch.py).
    liveness_timeout_s: float = 30.0
    # How the model writes tool calls (engine_worker/tool_calls.py FORMATS);
    # "auto": read off its chat template.
    tool_call_parser: str = "auto"
    # Splits the model's thinking into reasoning_content ("qwen3",
    # "deepseek_r1"); None: the reply is all content.
    reasoning_parser: str | None = None


# vllm-mlx-up's liveness check of its children (every LIVENESS_PROBE_S): one
# that answers no health check for the liveness timeout is killed and
# restarted like one that crashed. Answering "not serving" (loading) counts.
LIVENESS_PROBE_S = 1.0


DEFAULT_MEDIA_PORT = 50061  # media worker k listens on DEFAULT_MEDIA_PORT + k


@dataclass
class MediaSettings:
    """Limits and guards of the media workers (docs/architecture.md, failure and
    input rules). Every refusal is INVALID_ARGUMENT naming the item and why."""

    model: str                     # the processor of this model prepares the tensors
    host: str = DEFAULT_HOST
    port: int = DEFAULT_MEDIA_PORT
    # Local files are read only under these roots (checked after resolving links).
    allowed_local_media_paths: tuple[str, ...] = ()
    # URLs to private, loopback and link-local addresses are refused unless set.
    allow_private_media_urls: bool = False
    # When set, only these hosts (and their subdomains) may be fetched.
    allowed_media_domains: tuple[str, ...] = ()
    max_media_bytes: int = 50 * 1024 * 1024
    fetch_timeout_s: float = 10.0
    max_redirects: int = 5
    # Decompression-bomb guard: decoded width * height.
    max_image_pixels: int = 40_000_000
    max_video_seconds: float = 600.0
    # Defaults for a request's video_fps / video_max_frames, and their caps.
    default_video_fps: float = 2.0
    default_video_max_frames: int = 16
    max_video_fps: float = 30.0
    max_video_frames: int = 64


@dataclass
class ChatSettings:
    """`vllm-mlx-chat`: the browser chat UI, a client of any OpenAI-compatible
    server."""

    server_url: str = "http://localhost:8000"
    host: str = DEFAULT_HOST
    port: int = 7860
    # A public link through Gradio's share servers (needs the network).
    share: bool = False
    # No upload widgets, whatever the model takes. Without it, uploads are
    # offered unless /v1/models says the model takes text only.
    text_only: bool = False
    # The settings panel's starting values.
    max_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 1.0
    system_prompt: str = ""
    api_key: str | None = None


# Tests set VLLM_MLX_FAULT_INJECTION=1 to make engine faults happen on cue
# (a request whose id starts "fault-" fails inside the batch; the core's exit
# hangs as OpenBLAS's once did). Never set in production.
FAULT_INJECTION_ENV = "VLLM_MLX_FAULT_INJECTION"


def fault_injection() -> bool:
    return os.environ.get(FAULT_INJECTION_ENV) == "1"
