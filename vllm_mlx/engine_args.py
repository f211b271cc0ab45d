"""The engine's batching and memory flags, shared by `python -m engine_worker`
and `vllm-mlx-up` (which passes them on to the engine it starts)."""

import argparse

from vllm_mlx.settings import EngineSettings

# Kept in step with engine_worker/tool_calls.py FORMATS (a test checks): the
# supervisor parses these flags without importing the engine. Both reasoning
# parsers read <think> blocks (engine_worker/reasoning.py).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_engine_arguments(ap: argparse.ArgumentParser) -> None:
    d = EngineSettings(model="")
    g = ap.add_argument_group("engine (batching, memory, caches)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="requests decoded together in one batch")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests allowed to wait before Generate is refused")
    g.add_argument("--max-model-len", type=int, help="cap the context length")
    g.add_argument("--admit-window-ms", type=float, default=d.admit_window_s * 1000,
                   help="requests still arriving wait up to this long to be prefilled "
                        "together, a whole prefill batch at a time; an idle engine waits "
                        "for a 1 ms gap in arrivals (default 3; 0: no waiting)")
    g.add_argument("--prefill-chunk-while-decoding", type=_at_least_one,
                   default=d.prefill_chunk_while_decoding, metavar="TOKENS",
                   help="while other requests decode, a prompt prefills at most this many "
                        "tokens a step, so that their streams never wait for a whole long "
                        "prompt")
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse KV across requests that share a prompt prefix")
    g.add_argument("--prefix-cache-bytes", type=int,
                   help="byte budget of the prefix cache (default: 10%% of memory, "
                        "at most 8 GiB)")
    g.add_argument("--prefix-cache-dir", metavar="DIR",
                   help="keep the prefix cache in this folder too, so that a restarted "
                        "engine starts warm (within the cache's byte budget; another "
                        "model's files there are ignored)")
    g.add_argument("--max-memory", type=int,
                   help="bytes for weights + KV + prefix cache (default: 90%% of the "
                        "device's memory)")
    g.add_argument("--liveness-timeout", type=float, default=d.liveness_timeout_s,
                   help="seconds a hung process (no health answer, or an engine core "
                        "that makes no progress) is given before it is killed and "
                        "restarted (default 30)")
    g.add_argument("--allocator-cache-bytes", type=int,
                   help="freed buffers MLX keeps for reuse (default: 5%% of the memory "
                        "limit; 0: empty it after every prefill pass, as mlx-lm does)")

    g = ap.add_argument_group("output parsing")
    g.add_argument("--tool-call-parser", default=d.tool_call_parser,
                   choices=["auto", *TOOL_CALL_PARSERS],
                   help="how the model writes tool calls (default auto: read off the "
                        "chat template)")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                   help="split the model's <think> block into reasoning_content")


def engine_worker_argv(a: argparse.Namespace) -> list[str]:
    """The flags that give an engine the settings parsed into `a`."""
    argv = ["--max-num-seqs", str(a.max_num_seqs), "--max-queue", str(a.max_queue),
            "--admit-window-ms", str(a.admit_window_ms),
            "--prefill-chunk-while-decoding", str(a.prefill_chunk_while_decoding),
            "--liveness-timeout", str(a.liveness_timeout),
            "--tool-call-parser", a.tool_call_parser]
    if not a.prefix_cache:
        argv.append("--no-prefix-cache")
    for name in ("reasoning_parser", "max_model_len", "prefix_cache_bytes", "prefix_cache_dir",
                 "max_memory",
                 "allocator_cache_bytes"):
        if getattr(a, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    return argv
