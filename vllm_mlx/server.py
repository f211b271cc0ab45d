"""`python -m vllm_mlx.server --model M --port P`, as the seed's README runs it."""

from vllm_mlx.cli import main

if __name__ == "__main__":
    main()
