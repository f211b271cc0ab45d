"""The second turn of a chat about a picture, against the first: time to
first token when the engine encodes the picture and prefills the whole
prompt, and when the prefix cache holds the picture's KV and the first
turn's (the next prompt brings the same picture, by content, with the
first turn and its answer), through the whole stack.

Each round: a fresh picture first in the user's message, then filler text
up to --prompt-tokens, then a question; streamed, greedy, --max-tokens of
answer. Then the second turn: those messages, the answer, a new question.
One untimed round first; medians of the rest.
"""

import asyncio
import json
import random
import statistics

import httpx

from vllm_mlx.bench.inputs import data_url, jpeg, photo_like
from vllm_mlx.bench.sse_client import stream_chat

WORDS = ("the picture shows a quiet street with old houses trees and people walking under "
         "a grey sky while cars wait at the corner near a small shop").split()


def filler(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def _turn(client: httpx.AsyncClient, messages: list[dict], max_tokens: int):
    out = await stream_chat(client, json.dumps({
        "model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}}).encode())
    if out.error:
        raise RuntimeError(out.error)
    return out


def _first(image: str, words: int, seed: int) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": filler(words, seed) + ". What is in the picture?"}]}]


async def _words_for(client, size: tuple[int, int], prompt_tokens: int) -> tuple[int, int]:
    """Filler words that bring the first turn's prompt to about `prompt_tokens`
    (measured, with pictures the rounds do not use), and the tokens it came to."""
    image = data_url(jpeg(photo_like(*size, seed=10**6), 85))
    base = (await _turn(client, _first(image, 0, 0), 1)).prompt_tokens
    probe = (await _turn(client, _first(image, 400, 1), 1)).prompt_tokens
    words = max(0, round((prompt_tokens - base) * 400 / max(1, probe - base)))
    return words, (await _turn(client, _first(image, words, 2), 1)).prompt_tokens


async def second_turns(url: str, size: tuple[int, int], prompt_tokens: int, rounds: int,
                       max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        words, measured = await _words_for(client, size, prompt_tokens)
        first_s, second_s = [], []
        for r in range(rounds + 1):
            image = data_url(jpeg(photo_like(*size, seed=r), 85))
            messages = _first(image, words, 100 + r)
            one = await _turn(client, messages, max_tokens)
            messages += [{"role": "assistant", "content": one.text},
                         {"role": "user", "content": "And what colours does it have?"}]
            two = await _turn(client, messages, max_tokens)
            if r:  # the first round warms up
                first_s.append(one.ttft)
                second_s.append(two.ttft)
    t1, t2 = statistics.median(first_s), statistics.median(second_s)
    return dict(image_size=f"{size[0]}x{size[1]}", prompt_tokens=measured, rounds=rounds,
                max_tokens=max_tokens, first_ttft_ms=1e3 * t1, second_ttft_ms=1e3 * t2,
                speedup=t1 / t2, first_ttft_all_ms=[1e3 * t for t in first_s],
                second_ttft_all_ms=[1e3 * t for t in second_s])


def run_turns(url: str, size: tuple[int, int], prompt_tokens: int, rounds: int,
              max_tokens: int) -> dict:
    return asyncio.run(second_turns(url, size, prompt_tokens, rounds, max_tokens))
