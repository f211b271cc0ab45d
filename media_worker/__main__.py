"""`python -m media_worker --model PATH --port N`: one media worker process."""

import argparse
import logging
import os

from media_worker.server import serve
from vllm_mlx.flags import HelpFormatter
from vllm_mlx.media_args import add_media_arguments, check_media_arguments, media_settings
from vllm_mlx.settings import MediaSettings
from vllm_mlx.supervision import lifeline

MEDIA_NICENESS = 19


def build_parser() -> argparse.ArgumentParser:
    d = MediaSettings(model="")
    ap = argparse.ArgumentParser(prog="python -m media_worker", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True,
                    help="the served model's folder (its processor prepares the media)")
    ap.add_argument("--host", default=d.host, help="address to listen on")
    ap.add_argument("--port", type=int, default=d.port, help="gRPC port")
    add_media_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> MediaSettings:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_media_arguments(ap, a)
    return media_settings(a, a.model, a.host, a.port)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    lifeline.watch()  # end with vllm-mlx-up, however it ends
    # Decoding is throughput work; the engine and gateway are latency work.
    # Where they share too few cores, the scheduler should favour them
    # (docs/benchmarks.md, "What we learned": media).
    os.nice(MEDIA_NICENESS)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    lifeline.run_until_signal(lambda: serve(settings), "media")


if __name__ == "__main__":
    main()
