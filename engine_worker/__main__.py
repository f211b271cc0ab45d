"""`python -m engine_worker --model PATH --port N`: one engine process."""

import argparse
import logging

from engine_worker.server import serve
from vllm_mlx.engine_args import add_engine_arguments
from vllm_mlx.flags import HelpFormatter
from vllm_mlx.settings import EngineSettings
from vllm_mlx.supervision import lifeline


def build_parser() -> argparse.ArgumentParser:
    d = EngineSettings(model="")
    ap = argparse.ArgumentParser(prog="vllm-mlx-engine", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="a local mlx-lm model folder")
    ap.add_argument("--served-model-name", help="the model's name in the API "
                                                "(default: the folder's name)")
    ap.add_argument("--host", default=d.host, help="address to listen on")
    ap.add_argument("--port", type=int, default=d.port, help="gRPC port")
    ap.add_argument("--prefill-batch-size", type=int, default=d.prefill_batch_size,
                    help="prompts prefilled together")
    ap.add_argument("--prefill-step-size", type=int, default=d.prefill_step_size,
                    help="tokens of a long prompt prefilled per step")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="report ready without warming the kernels up")
    ap.add_argument("--stream-interval-ms", type=float, default=d.stream_interval_s * 1000,
                    help="after the first token, send at most one message per stream "
                         "per interval (0: one per decode step)")
    ap.add_argument("--mllm", action="store_true",
                    help="load the model as a vision-language model through mlx-vlm "
                         "(detected from config.json's vision_config otherwise)")
    ap.add_argument("--media-worker", dest="media_workers", action="append", default=[],
                    metavar="HOST:PORT",
                    help="a media worker that prepares images and videos (repeatable)")
    add_engine_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> EngineSettings:
    a = build_parser().parse_args(argv)
    return EngineSettings(
        model=a.model, served_model_name=a.served_model_name, host=a.host, port=a.port,
        max_num_seqs=a.max_num_seqs, max_queue=a.max_queue,
        prefill_batch_size=a.prefill_batch_size, prefill_step_size=a.prefill_step_size,
        admit_window_s=a.admit_window_ms / 1000,
        prefill_chunk_while_decoding=a.prefill_chunk_while_decoding,
        max_model_len=a.max_model_len, warmup=a.warmup,
        stream_interval_s=a.stream_interval_ms / 1000,
        prefix_cache=a.prefix_cache, prefix_cache_bytes=a.prefix_cache_bytes,
        prefix_cache_dir=a.prefix_cache_dir,
        max_memory=a.max_memory, allocator_cache_bytes=a.allocator_cache_bytes,
        mllm=a.mllm, media_workers=tuple(a.media_workers),
        liveness_timeout_s=a.liveness_timeout, tool_call_parser=a.tool_call_parser,
        reasoning_parser=a.reasoning_parser)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    lifeline.watch()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    lifeline.run_until_signal(lambda: serve(settings), "engine")


if __name__ == "__main__":
    main()
