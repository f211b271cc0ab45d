"""GSM8K through a running OpenAI-compatible server: accuracy, tokens/s, time.

    python tests/evals/gsm8k/gsm8k_eval.py --port 8000 [--num-questions N]
        [--concurrency C] [--output results.json] [--data-file test.jsonl]

Each question goes as one chat message asking for step-by-step work ending in
"The answer is N"; the reply's answer is the number after the last "answer
is" (or "####"), else its last number, compared with the reference's number
after "####". Data: --data-file (JSONL of question/answer, as in OpenAI's
release), or the release's test split downloaded when online.
"""

import argparse
import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import httpx
from tqdm import tqdm

RELEASE = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
           "grade_school_math/data/test.jsonl")
INSTRUCTION = ("Solve this math problem step by step. End with a line of the form "
               "'The answer is N', where N is a number.\n\n")
NUMBER = r"-?[\d,]*\.?\d+"


def load(data_file: str | None) -> list[dict]:
    if data_file:
        text = Path(data_file).read_text()
    else:
        with urllib.request.urlopen(RELEASE, timeout=60) as r:
            text = r.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def reference(answer: str) -> float | None:
    return _number(answer.split("####")[-1].strip())


def extract(reply: str) -> float | None:
    """The reply's final answer: after the last "answer is" or "####", else
    its last number."""
    for marker in (r"answer is[:\s$]*(" + NUMBER + ")", r"####\s*\$?(" + NUMBER + ")"):
        found = re.findall(marker, reply, flags=re.IGNORECASE)
        if found:
            return _number(found[-1])
    numbers = re.findall(NUMBER, reply)
    return _number(numbers[-1]) if numbers else None


async def ask(client: httpx.AsyncClient, args: argparse.Namespace, question: str) -> dict:
    body = {"model": args.model, "temperature": args.temperature, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": INSTRUCTION + question}]}
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    data = r.json()
    return {"reply": data["choices"][0]["message"]["content"] or "",
            "completion_tokens": data.get("usage", {}).get("completion_tokens", 0)}


async def evaluate(args: argparse.Namespace, items: list[dict]) -> dict:
    base = args.base_url or f"http://{args.host}:{args.port}"
    limit = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=len(items), desc="gsm8k")
    results: list[dict] = [{}] * len(items)

    async with httpx.AsyncClient(base_url=base, timeout=args.timeout, trust_env=False) as client:
        async def one(i: int, item: dict) -> None:
            async with limit:
                try:
                    out = await ask(client, args, item["question"])
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    out = {"reply": "", "completion_tokens": 0, "error": repr(e)}
            want, got = reference(item["answer"]), extract(out["reply"])
            results[i] = {**out, "expected": want, "extracted": got,
                          "correct": got is not None and want is not None
                          and abs(got - want) < 1e-6}
            bar.update()

        tic = time.perf_counter()
        await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        elapsed = time.perf_counter() - tic
    bar.close()
    tokens = sum(r["completion_tokens"] for r in results)
    return {"num_questions": len(items), "correct": sum(r["correct"] for r in results),
            "accuracy": sum(r["correct"] for r in results) / len(items),
            "errors": sum("error" in r for r in results), "completion_tokens": tokens,
            "tokens_per_s": tokens / elapsed, "time_s": elapsed, "server": base,
            "model": args.model, "concurrency": args.concurrency, "results": results}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--base-url", help="instead of --host/--port, e.g. http://host:8000")
    ap.add_argument("--model", default="default")
    ap.add_argument("--num-questions", type=int, help="the first N (default: all)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--data-file", help="JSONL of question/answer (default: download)")
    ap.add_argument("--output", help="write the figures and every reply to this JSON file")
    args = ap.parse_args(argv)
    items = load(args.data_file)[:args.num_questions]
    summary = asyncio.run(evaluate(args, items))
    print(f"Accuracy: {summary['accuracy']:.3f} ({summary['correct']}/{len(items)}), "
          f"errors {summary['errors']}")
    print(f"Tokens/s: {summary['tokens_per_s']:.1f} ({summary['completion_tokens']} tokens)")
    print(f"Time: {summary['time_s']:.1f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
