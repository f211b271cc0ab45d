"""What a JSON-schema-constrained request costs: decode tokens/s at each
batch size with every request unconstrained, and with one of them
constrained, side by side in one run (rounds alternate the two).

In process (the engine's loop, no gRPC), token-id prompts, sampling at
temperature 0.7; unconstrained requests ignore EOS, and the schema asks for
more items than --max-tokens can hold, so every request decodes all its
tokens. Per request: (tokens - 1) / (last token's time - first token's).

- neighbours: the unconstrained requests' median tok/s with a constrained
  one in the batch, over their median without (target >= 0.95);
- constrained: the constrained request's tok/s over the unconstrained
  median of the same round without it (target >= 0.90).

    vllm-mlx-bench structured --model smollm2-135m --batch 1 32 --output FILE
"""

import argparse
import json
import random
import statistics

from vllm_mlx.bench import report
from vllm_mlx.bench.workloads import default_cache, model_folder, model_name, random_ids

PROMPT_LEN = 32
# Longer than any --max-tokens: the constrained request never ends early.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"items": {
        "type": "array", "minItems": 1000,
        "items": {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 12},
                                 "count": {"type": "integer", "minimum": 0, "maximum": 999},
                                 "kind": {"enum": ["a", "b", "c"]}},
                  "required": ["name", "count", "kind"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="tiny",
                    help="a test-model shape (tiny, smollm2-135m, llama-3.2-1b-4bit) or a "
                         "model folder")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32],
                    help="requests decoded together")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (unconstrained, with one constrained) per batch size, "
                         "after one untimed")


def _tok_s(gen) -> float:
    """Decode tokens/s of one finished in-process Generation."""
    times = [d.time for d in gen.deltas]
    return (len(gen.token_ids) - 1) / (times[-1] - times[0])


def _request(prompt: list[int], max_tokens: int, seed: int, constrained: bool):
    from vllm_mlx.v1 import engine_pb2 as pb

    req = pb.GenerateRequest(max_tokens=max_tokens, ignore_eos=not constrained,
                             sampling=pb.SamplingParams(temperature=0.7, seed=seed))
    req.token_ids.ids.extend(prompt)
    if constrained:
        req.structured_output.json_schema = json.dumps(LONG_SCHEMA)
    return req


def one_batch(engine, batch: int, constrained: bool, max_tokens: int,
              rng: random.Random) -> tuple[list[float], float | None]:
    """(unconstrained requests' tok/s, the constrained one's or None)."""
    import threading

    vocab = engine.facts.vocab_size
    reqs = [_request(random_ids(PROMPT_LEN, vocab, rng), max_tokens, rng.randrange(1 << 30),
                     constrained and i == 0) for i in range(batch)]
    gens = [engine.generate(r) for r in reqs]
    for g in gens:
        g.deltas = []

    def drain(g) -> None:
        for d in g:
            g.deltas.append(d)

    threads = [threading.Thread(target=drain, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rates = [_tok_s(g) for g in gens]
    return (rates[1:], rates[0]) if constrained else (rates, None)


def run(a: argparse.Namespace) -> dict:
    from vllm_mlx.in_process import InProcessEngine
    from vllm_mlx.settings import EngineSettings

    folder = model_folder(a.model, default_cache())
    engine = InProcessEngine(str(folder), EngineSettings(
        model=str(folder), max_num_seqs=max(a.batch), prefix_cache=False))
    rng = random.Random(0)
    results = []
    try:
        for batch in a.batch:
            one_batch(engine, batch, True, a.max_tokens, rng)  # warm-up, untimed
            plain, neighbours, constrained = [], [], []
            for _ in report.progress(range(a.rounds), f"batch {batch}"):
                rates, _ = one_batch(engine, batch, False, a.max_tokens, rng)
                base = statistics.median(rates)
                rates, own = one_batch(engine, batch, True, a.max_tokens, rng)
                plain.append(base)
                if rates:
                    neighbours.append(statistics.median(rates) / base)
                constrained.append(own / base)
            results.append({
                "batch": batch, "unconstrained_tok_s": statistics.median(plain),
                "neighbours_ratio": statistics.median(neighbours) if neighbours else None,
                "constrained_ratio": statistics.median(constrained),
                "rounds": a.rounds})
    finally:
        engine.close()
    rows = [(r["batch"], f"{r['unconstrained_tok_s']:.1f}",
             "-" if r["neighbours_ratio"] is None else f"{r['neighbours_ratio']:.3f}",
             f"{r['constrained_ratio']:.3f}") for r in results]
    print(report.banner(f"JSON-schema constraint cost, {model_name(a.model)}"))
    print(report.table(rows, ["batch", "unconstrained tok/s (per request)",
                              "neighbours with / without", "constrained / unconstrained"]))
    return {"model": model_name(a.model), "max_tokens": a.max_tokens, "results": results}
