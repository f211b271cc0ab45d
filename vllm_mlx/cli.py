"""`vllm-mlx`: the seed's command line, as aliases over `vllm-mlx-up`.

    vllm-mlx --model M --port P
    vllm-mlx serve M --port P
    python -m vllm_mlx.server --model M --port P
"""

import sys

from vllm_mlx.supervision import supervisor


def to_supervisor_argv(argv: list[str]) -> list[str]:
    if argv and argv[0] == "serve":
        rest = argv[1:]
        if rest and not rest[0].startswith("-"):
            return ["--model", rest[0], *rest[1:]]
        return rest
    return argv


def main(argv: list[str] | None = None) -> None:
    supervisor.main(to_supervisor_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
