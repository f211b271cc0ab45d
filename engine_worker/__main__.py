"""`python -m engine_worker --model PATH --port N`: one engine process."""

import argparse
import logging

from engine_worker.server import serve
from vllm_mlx import lifeline
from vllm_mlx.engine_args import add_engine_arguments
from vllm_mlx.settings import DEFAULT_ENGINE_PORT, DEFAULT_HOST, EngineSettings


def parse_args(argv: list[str] | None = None) -> EngineSettings:
    ap = argparse.ArgumentParser(prog="vllm-mlx-engine", description=__doc__)
    ap.add_argument("--model", required=True, help="a local mlx-lm model folder")
    ap.add_argument("--served-model-name")
    ap.add_argument("--host", default=DEFAULT_HOST,
                    help="address to listen on (default loopback)")
    ap.add_argument("--port", type=int, default=DEFAULT_ENGINE_PORT)
    ap.add_argument("--prefill-batch-size", type=int, default=8)
    ap.add_argument("--prefill-step-size", type=int, default=2048)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--stream-interval-ms", type=float, default=0.0,
                    help="after the first token, send at most one message per stream "
                         "per interval (0: one per decode step)")
    ap.add_argument("--mllm", action="store_true",
                    help="load the model as a vision-language model through mlx-vlm "
                         "(detected from config.json's vision_config otherwise)")
    ap.add_argument("--media-worker", dest="media_workers", action="append", default=[],
                    metavar="HOST:PORT",
                    help="a media worker that prepares images and videos (repeatable)")
    add_engine_arguments(ap)
    a = ap.parse_args(argv)
    return EngineSettings(
        model=a.model, served_model_name=a.served_model_name, host=a.host, port=a.port,
        max_num_seqs=a.max_num_seqs, max_queue=a.max_queue,
        prefill_batch_size=a.prefill_batch_size, prefill_step_size=a.prefill_step_size,
        admit_window_s=a.admit_window_ms / 1000,
        max_model_len=a.max_model_len, warmup=a.warmup,
        stream_interval_s=a.stream_interval_ms / 1000,
        prefix_cache=a.prefix_cache, prefix_cache_bytes=a.prefix_cache_bytes,
        max_memory=a.max_memory, allocator_cache_bytes=a.allocator_cache_bytes,
        mllm=a.mllm, media_workers=tuple(a.media_workers),
        liveness_timeout_s=a.liveness_timeout)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    lifeline.watch()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    lifeline.run_until_signal(lambda: serve(settings), "engine")


if __name__ == "__main__":
    main()
