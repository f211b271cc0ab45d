"""Logs mlx-lm prefill passes and inserts to a file (probe only)."""
import importlib
import time


def install(path: str) -> None:
    g = importlib.import_module("mlx_lm.generate")

    f = open(path, "a", buffering=1)
    prompt, insert = g.PromptProcessingBatch.prompt, g.BatchGenerator.insert

    def logged_prompt(self, tokens):
        if tokens:
            f.write(f"P {len(tokens)} {max(len(t) for t in tokens)} {time.monotonic():.6f}\n")
        return prompt(self, tokens)

    def logged_insert(self, prompts, *a, **k):
        f.write(f"I {len(prompts)} {time.monotonic():.6f}\n")
        return insert(self, prompts, *a, **k)

    g.PromptProcessingBatch.prompt = logged_prompt
    g.BatchGenerator.insert = logged_insert
