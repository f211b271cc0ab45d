"""The `vllm-mlx-bench` command: the seed's mode when the first argument is
a flag, a subcommand otherwise. Each mode is a module with
`add_arguments(parser)` and `run(args) -> dict`; `main` writes what `run`
returns, with its provenance, to --output."""

import argparse
import importlib
import sys

from vllm_mlx.bench import report
from vllm_mlx.flags import HelpFormatter

# subcommand -> (module, one line of help)
SUBCOMMANDS = {
    "serve": ("vllm_mlx.bench.serve", "drive running OpenAI-compatible servers over HTTP"),
    "engine": ("vllm_mlx.bench.engine", "the engine over gRPC vs raw mlx-lm's BatchGenerator"),
    "gateway": ("vllm_mlx.bench.gateway", "the gateway's HTTP + SSE vs the engine's gRPC alone"),
    "cache": ("vllm_mlx.bench.cache", "time to first token, prefix-cache miss vs hit"),
    "media": ("vllm_mlx.bench.media", "text latency while images are prepared, and what "
                                      "preparing images and video costs"),
    "structured": ("vllm_mlx.bench.structured", "what a JSON-schema-constrained request costs "
                                                "itself and its batch"),
}
SEED_MODE = "vllm_mlx.bench.seed_mode"


def build_parser(command: str | None) -> argparse.ArgumentParser:
    module = importlib.import_module(SUBCOMMANDS[command][0] if command else SEED_MODE)
    prog = "vllm-mlx-bench" + (f" {command}" if command else "")
    ap = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                 formatter_class=HelpFormatter,
                                 epilog=None if command else _subcommand_help())
    module.add_arguments(ap)
    ap.add_argument("--output", help="write the results, with how they were made, to this "
                                     "JSON file")
    return ap


def _subcommand_help() -> str:
    return "subcommands:\n" + "\n".join(f"  {name:<9} {text}"
                                         for name, (_, text) in SUBCOMMANDS.items())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv[1:] if command else argv)
    module = importlib.import_module(SUBCOMMANDS[command][0] if command else SEED_MODE)
    results = module.run(args)
    if args.output:
        report.write_json(args.output, command or "seed", argv, results)
        print(f"\nresults written to {args.output}")


if __name__ == "__main__":
    main()
