"""`vllm-mlx-bench`: the seed's benchmark modes and this project's own.

    vllm-mlx-bench --model M [--mllm | --video] ...   in-process, as the seed documents
    vllm-mlx-bench serve --url U [--url U2] ...      running OpenAI servers, side by side
    vllm-mlx-bench engine | gateway | cache | media  what the engine is held to

Every mode writes JSON that embeds the command line, the versions and the
hardware (report.py), so a figure can be traced to how it was made.
"""
