"""The whole HTTP path (gateway + SSE) vs the engine's gRPC alone, side by side.

One engine process and one gateway process (`python -m gateway`) serve the
same model. At each concurrency, `concurrency` streams generate max_tokens
tokens each with greedy decoding and EOS ignored, once straight over gRPC and
once through the gateway as OpenAI streaming completions (httpx, or the
`openai` SDK with `--client openai`), in alternating rounds after one untimed
warm-up of each. Reported: median aggregate tokens/s, median time to first
token (per stream, then median over rounds), the ratios, and the CPU each
process spent per 1,000 tokens (Linux).

`--prompt-form` picks what the prompt is: token ids (`ids`, identical engine
work on both paths), raw text (`text`), chat messages (`chat`, templated and
tokenized by the engine), or the same chat messages templated and tokenized
by the client with the model's tokenizer, per request inside the timed run,
and sent as token ids (`chat-ids`: what a gateway that owned templating would
do). `chat` vs `chat-ids` measures where templating should live.

    vllm-mlx-bench gateway --model smollm2-135m --output bench-gateway.json

`--ttft-probes N` measures what the gateway adds to time to first token
under load instead: at each concurrency C, C-1 streams keep generating
through the gateway (closed loop, in client processes), while this process
sends N probe requests by each path, alternating gRPC and HTTP, on fresh
prompts and over connections kept open. Both probes meet the same engine and
the same loaded gateway, so their difference is the HTTP path's own cost;
rounds of whole runs cannot resolve a few milliseconds on a noisy machine.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

from vllm_mlx.bench import report
from vllm_mlx.bench.workloads import (
    PROMPT_LEN,
    default_cache,
    has_proc,
    model_folder,
    model_name,
    ports,
    prompts,
    start_engine,
    start_gateway,
    tree_cpu_seconds,
    vocab_of,
)

WORDS = "the quick brown fox jumps over a lazy dog while café culture thrives".split()
PROBE_WARMUPS = 5


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="tiny",
                    help="a test-model shape (tiny, smollm2-135m: built on first use) or a "
                         "model folder")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64],
                    help="streams generating at once")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per concurrency")
    ap.add_argument("--prompt-form", choices=["ids", "text", "chat", "chat-ids"],
                    default="ids", help="what a prompt is (see above)")
    ap.add_argument("--client", choices=["httpx", "openai"], default="httpx",
                    help="the HTTP client (openai: the OpenAI SDK, installed apart)")
    ap.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes sharing each run's streams (both paths), so "
                         "that one Python client's CPU does not limit what is measured")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run both paths at once in every round, half the streams each "
                         "(at least one each), on fresh prompts per round")
    ap.add_argument("--ttft-probes", type=int, default=0,
                    help="measure added time to first token with this many probes per path "
                         "beside concurrency-1 gateway streams (see above)")
    ap.add_argument("--engine-flags", default="",
                    help="extra engine flags, one string (--engine-flags=\"--no-prefix-cache\")")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="where test models are built")
    ap.add_argument("--engine-port", type=int, default=0, help="the engine's; 0: a free port")
    ap.add_argument("--port", type=int, default=0, help="the gateway's; 0: a free port")


def make_prompts(n: int, vocab: int, form: str, seed: int = 0) -> list:
    if form == "ids":
        return prompts(n, vocab, seed)
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(PROMPT_LEN)) for _ in range(n)]
    if form == "text":
        return texts
    return [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}]
            for t in texts]


class Templater:
    """Chat template + tokenizer in the client process (`chat-ids`)."""

    def __init__(self, model: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model))

    def __call__(self, messages: list[dict]) -> list[int]:
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)


# One per process (this one, each client process), loaded before any timing.
TEMPLATER: Templater | None = None


class Run:
    """One timed run: aggregate tokens/s, each stream's time to first token,
    and the CPU each process spent on it (per 1000 tokens)."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tokens = 0
        self.elapsed = 0.0
        self.started = self.ended = 0.0  # time.monotonic(), comparable across processes
        self.cpu_ms_per_1k: dict[str, float] = {}

    @property
    def tps(self) -> float:
        return self.tokens / self.elapsed

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.ttft) * 1000


# -- the engine over gRPC ---------------------------------------------------------------


async def grpc_run(address: str, prompts: list, form: str, max_tokens: int) -> Run:
    import grpc

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    run = Run()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)

        async def one(p) -> int:
            start = time.perf_counter()
            req = pb.GenerateRequest(max_tokens=max_tokens, ignore_eos=True)
            if form == "chat-ids":
                req.token_ids.ids.extend(TEMPLATER(p))
            elif form == "ids":
                req.token_ids.ids.extend(p)
            elif form == "text":
                req.text = p
            else:
                req.chat.messages.extend(pb.ChatMessage(**m) for m in p)
            n = 0
            async for r in stub.Generate(req, timeout=3600):
                if r.token_ids and n == 0:
                    run.ttft.append(time.perf_counter() - start)
                n += len(r.token_ids)
            return n

        run.started = time.monotonic()
        run.tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        run.ended = time.monotonic()
        run.elapsed = run.ended - run.started
    assert run.tokens == len(prompts) * max_tokens, run.tokens
    return run


# -- the gateway over HTTP + SSE ---------------------------------------------------------


def _body(p, form: str, max_tokens: int) -> tuple[str, dict]:
    common = {"model": "default", "max_tokens": max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}, "ignore_eos": True}
    if form == "chat":
        return "/v1/chat/completions", {**common, "messages": p}
    if form == "chat-ids":
        return "/v1/completions", {**common, "prompt": TEMPLATER(p)}
    return "/v1/completions", {**common, "prompt": p}


async def http_run(url: str, prompts: list, form: str, max_tokens: int, client: str) -> Run:
    import httpx

    run = Run()
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:

        async def one_httpx(p) -> int:
            start, first, usage = time.perf_counter(), True, 0
            path, body = _body(p, form, max_tokens)
            async with c.stream("POST", path, json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
                    choice = chunk["choices"][0] if chunk["choices"] else {}
                    delta = choice.get("delta", {}).get("content") or choice.get("text")
                    if first and delta:
                        run.ttft.append(time.perf_counter() - start)
                        first = False
            return usage

        async def one_openai(p) -> int:
            start, first, usage = time.perf_counter(), True, 0
            path, body = _body(p, form, max_tokens)
            extra = {"ignore_eos": True}
            body = {k: v for k, v in body.items() if k != "ignore_eos"}
            if path == "/v1/chat/completions":
                stream = await sdk.chat.completions.create(**body, extra_body=extra)
            else:
                stream = await sdk.completions.create(**body, extra_body=extra)
            async for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
                if chunk.choices:
                    ch = chunk.choices[0]
                    delta = ch.delta.content if path == "/v1/chat/completions" else ch.text
                    if first and delta:
                        run.ttft.append(time.perf_counter() - start)
                        first = False
            return usage

        if client == "openai":
            from openai import AsyncOpenAI

            sdk = AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                              timeout=3600)
        one = one_openai if client == "openai" else one_httpx
        run.started = time.monotonic()
        run.tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        run.ended = time.monotonic()
        run.elapsed = run.ended - run.started
    assert run.tokens == len(prompts) * max_tokens, run.tokens
    return run


# -- time to first token under load, by probes ------------------------------------------


def _background(url: str, prompts: list, max_tokens: int, stop_at: float) -> int:
    """Streams through the gateway, each sending its next request when the
    last ends, until stop_at; returns the requests completed."""
    import httpx

    async def main() -> int:
        limits = httpx.Limits(max_connections=len(prompts) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:
            async def stream(p) -> int:
                n = 0
                path, body = _body(p, "ids", max_tokens)
                while time.monotonic() < stop_at:
                    async with c.stream("POST", path, json=body) as r:
                        r.raise_for_status()
                        async for _ in r.aiter_lines():
                            pass
                    n += 1
                return n
            return sum(await asyncio.gather(*(stream(p) for p in prompts)))

    return asyncio.run(main())


async def _probes(address: str, url: str, prompts: list,
                  desc: str | None) -> tuple[list[float], list[float]]:
    """Time to first token of one request at a time, alternating gRPC and
    HTTP (max_tokens 4, fresh prompts), over connections kept open."""
    import grpc
    import httpx

    from vllm_mlx.v1 import engine_pb2 as pb
    from vllm_mlx.v1 import engine_pb2_grpc

    grpc_ms, http_ms = [], []
    rng = random.Random(0)
    async with grpc.aio.insecure_channel(address) as channel, \
            httpx.AsyncClient(base_url=url, timeout=3600) as client:
        stub = engine_pb2_grpc.EngineStub(channel)
        await channel.channel_ready()
        each = report.progress(prompts, desc) if desc else prompts
        for i, p in enumerate(each):
            # Probes land at random points of the decode step.
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            start = time.perf_counter()
            if i % 2 == 0:
                async for r in stub.Generate(pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=p), max_tokens=4, ignore_eos=True),
                        timeout=600):
                    if r.token_ids and len(grpc_ms) * 2 <= i:
                        grpc_ms.append(1000 * (time.perf_counter() - start))
                continue
            path, body = _body(p, "ids", 4)
            async with client.stream("POST", path, json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if (line.startswith("data: {") and len(http_ms) * 2 < i
                            and (json.loads(line[6:])["choices"] or [{}])[0].get("text")):
                        http_ms.append(1000 * (time.perf_counter() - start))
    return grpc_ms, http_ms


def ttft_probes(address: str, url: str, c: int, n_probes: int, vocab: int,
                a: argparse.Namespace, pool, desc: str | None = None) -> dict:
    background = make_prompts(c - 1, vocab, "ids", seed=7 * c)
    probes = make_prompts(2 * n_probes, vocab, "ids", seed=11 * c + n_probes)
    # Long enough for every probe; the probes end the run, not the clock.
    stop_at = time.monotonic() + 3600
    if background:  # the caller ends these by terminating the pool
        n = max(1, min(a.client_procs, len(background)))
        for k in range(n):
            pool.apply_async(_background, (url, background[k::n], a.max_tokens, stop_at))
        time.sleep(2.0)  # the background streams are up and decoding
    grpc_ms, http_ms = asyncio.run(_probes(address, url, probes, desc))
    pairs = [h - g for g, h in zip(grpc_ms, http_ms)]
    return dict(concurrency=c, probes=len(pairs),
                grpc_ttft_ms=statistics.median(grpc_ms), http_ttft_ms=statistics.median(http_ms),
                added_ttft_ms=statistics.median(http_ms) - statistics.median(grpc_ms),
                added_ttft_ms_paired=statistics.median(pairs),
                grpc_ttft_ms_all=grpc_ms, http_ttft_ms_all=http_ms)


# -- client processes --------------------------------------------------------------------


def mp_pool(n: int):
    import multiprocessing as mp

    return mp.get_context("spawn").Pool(n, initializer=_client_imports)


def _client_imports() -> None:
    """Pool initializer: what a client run imports, loaded before any timing
    (which process gets which task varies between rounds)."""
    import grpc  # noqa: F401
    import httpx  # noqa: F401

    from vllm_mlx.v1 import engine_pb2, engine_pb2_grpc  # noqa: F401


def _client_run(kind: str, target: str, prompts: list, form: str, max_tokens: int,
                client: str, start_at: float, model: str | None) -> tuple:
    """One client process's share of a run (see --client-procs)."""
    global TEMPLATER
    if model and TEMPLATER is None:
        TEMPLATER = Templater(Path(model))
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu = time.process_time()
    if kind == "grpc":
        run = asyncio.run(grpc_run(target, prompts, form, max_tokens))
    else:
        run = asyncio.run(http_run(target, prompts, form, max_tokens, client))
    return run.tokens, run.ttft, run.started, run.ended, time.process_time() - cpu


def _median_cpu(runs: list[Run]) -> dict[str, float]:
    keys = runs[0].cpu_ms_per_1k.keys()
    return {k: round(statistics.median(r.cpu_ms_per_1k[k] for r in runs), 1) for k in keys}


def measured(kind: str, target: str, prompts: list, a: argparse.Namespace, model: Path,
             pids: dict[str, int], pool) -> Run:
    """One timed run, in this process or split evenly over the pool's client
    processes (started together; tokens/s over the span from the first
    start to the last end)."""
    before = {k: tree_cpu_seconds(p) for k, p in pids.items()} if has_proc() else {}
    if pool is None:
        client_before = time.process_time()
        run = asyncio.run(grpc_run(target, prompts, a.prompt_form, a.max_tokens)
                          if kind == "grpc" else
                          http_run(target, prompts, a.prompt_form, a.max_tokens, a.client))
        client_cpu = time.process_time() - client_before
    else:
        n, start_at = a.client_procs, time.monotonic() + 0.2
        templater = str(model) if a.prompt_form == "chat-ids" else None
        parts = pool.starmap(_client_run, [
            (kind, target, prompts[k::n], a.prompt_form, a.max_tokens, a.client, start_at,
             templater) for k in range(n) if prompts[k::n]])
        run = Run()
        run.tokens = sum(p[0] for p in parts)
        run.ttft = [t for p in parts for t in p[1]]
        run.started, run.ended = min(p[2] for p in parts), max(p[3] for p in parts)
        run.elapsed = run.ended - run.started
        client_cpu = sum(p[4] for p in parts)
    if before:
        spent = {k: tree_cpu_seconds(p) - before[k] for k, p in pids.items()}
        spent["client"] = client_cpu
        run.cpu_ms_per_1k = {k: 1e6 * v / run.tokens for k, v in spent.items()}
    return run


def side_by_side(address: str, url: str, prompts: list, a: argparse.Namespace, model: Path,
                 pids: dict[str, int], pool) -> tuple[Run, Run]:
    """Both paths in the same round at the same time, half the streams each
    (at least one): the engine batches them together, so drift of the
    machine between rounds cancels, and what differs is what each path adds
    to delivering the same engine's tokens. tok/s of a path: its tokens over
    the span from the common start to its own last token."""
    half = len(prompts) // 2
    per_path = max(1, a.client_procs // 2)
    start_at = time.monotonic() + 0.2
    templater = str(model) if a.prompt_form == "chat-ids" else None
    jobs = [(kind, target, ps[k::per_path], a.prompt_form, a.max_tokens, a.client, start_at,
             templater)
            for kind, target, ps in (("grpc", address, prompts[:half]),
                                     ("http", url, prompts[half:]))
            for k in range(per_path) if ps[k::per_path]]
    before = {k: tree_cpu_seconds(p) for k, p in pids.items()} if has_proc() else {}
    parts = pool.starmap(_client_run, jobs)
    spent = {k: tree_cpu_seconds(p) - before[k] for k, p in pids.items()} if before else {}
    start = min(p[2] for p in parts)
    runs = []
    for kind in ("grpc", "http"):
        mine = [p for job, p in zip(jobs, parts) if job[0] == kind]
        run = Run()
        run.tokens = sum(p[0] for p in mine)
        run.ttft = [t for p in mine for t in p[1]]
        run.started, run.ended = start, max(p[3] for p in mine)
        run.elapsed = run.ended - run.started
        # Shared processes: the engine's and gateway's CPU over both paths' tokens.
        run.cpu_ms_per_1k = {**{k: 1e6 * v / sum(p[0] for p in parts) for k, v in spent.items()},
                             "client": 1e6 * sum(p[4] for p in mine) / run.tokens}
        runs.append(run)
    return runs[0], runs[1]


# -- the runs ----------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    import mlx.core as mx

    global TEMPLATER
    model = model_folder(a.model, a.cache)
    if a.prompt_form == "chat-ids":
        TEMPLATER = Templater(model)
    if a.side_by_side or a.ttft_probes:
        a.client_procs = max(2, a.client_procs)
    engine_port, port = ports(0, 2)
    engine_port, port = a.engine_port or engine_port, a.port or port
    address, url = f"127.0.0.1:{engine_port}", f"http://127.0.0.1:{port}"
    engine = start_engine(model, engine_port, a.engine_flags.split())
    gateway = pool = None
    try:
        gateway = start_gateway(address, port, a.workers)
        pool = mp_pool(a.client_procs) if a.client_procs > 1 else None
        if a.ttft_probes:
            results, pool = probe_runs(address, url, vocab_of(model), a, pool)
            print_probes(results)
        else:
            pids = {"engine": engine.pid, "gateway": gateway.pid}
            results = [throughput(address, url, c, a, model, pids, pool)
                       for c in a.concurrency]
            print_throughput(results)
    finally:
        if pool is not None:
            pool.terminate()
        for child in (gateway, engine):
            if child is not None:
                child.stop()
    return dict(cpus=os.cpu_count(), device=str(mx.default_device()),
                model=model_name(a.model), concurrency=a.concurrency,
                max_tokens=a.max_tokens, prompt_form=a.prompt_form, prompt_len=PROMPT_LEN,
                client=a.client, gateway_workers=a.workers, client_procs=a.client_procs,
                side_by_side=a.side_by_side, rounds=a.rounds, ttft_probes=a.ttft_probes,
                engine_flags=a.engine_flags, results=results)


def probe_runs(address: str, url: str, vocab: int, a: argparse.Namespace,
               pool) -> tuple[list[dict], object]:
    """Per concurrency, an untimed warm-up then the probes; the pool is
    renewed after each, which ends its background streams."""
    results = []
    for c in a.concurrency:
        for n, desc in ((PROBE_WARMUPS, None), (a.ttft_probes, f"probes c={c}")):
            row = ttft_probes(address, url, c, n, vocab, a, pool, desc)
            pool.terminate()
            pool = mp_pool(a.client_procs)
        results.append(row)
    return results, pool


def throughput(address: str, url: str, c: int, a: argparse.Namespace, model: Path,
               pids: dict[str, int], pool) -> dict:
    vocab = vocab_of(model)
    prompts = make_prompts(c, vocab, a.prompt_form)
    grpc_runs, http_runs = [], []
    for i in report.progress(range(a.rounds + 1), f"c={c}"):
        if a.side_by_side:
            fresh = make_prompts(2 * max(1, c // 2), vocab, a.prompt_form, seed=1000 * c + i)
            g, h = side_by_side(address, url, fresh, a, model, pids, pool)
        else:
            g = measured("grpc", address, prompts, a, model, pids, pool)
            h = measured("http", url, prompts, a, model, pids, pool)
        if i:  # the first of each is an untimed warm-up
            grpc_runs.append(g)
            http_runs.append(h)
    row = dict(
        concurrency=c,
        grpc_tps=statistics.median(r.tps for r in grpc_runs),
        http_tps=statistics.median(r.tps for r in http_runs),
        grpc_ttft_ms=statistics.median(r.ttft_ms for r in grpc_runs),
        http_ttft_ms=statistics.median(r.ttft_ms for r in http_runs),
        grpc_tps_all=[r.tps for r in grpc_runs], http_tps_all=[r.tps for r in http_runs],
        grpc_ttft_ms_all=[r.ttft_ms for r in grpc_runs],
        http_ttft_ms_all=[r.ttft_ms for r in http_runs],
        grpc_cpu_ms_per_1k_tokens=_median_cpu(grpc_runs),
        http_cpu_ms_per_1k_tokens=_median_cpu(http_runs))
    row["tps_ratio"] = row["http_tps"] / row["grpc_tps"]
    row["added_ttft_ms"] = row["http_ttft_ms"] - row["grpc_ttft_ms"]
    return row


def _cpu(figures: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.0f}" for k, v in figures.items())


def print_throughput(results: list[dict]) -> None:
    print(report.banner("gateway (HTTP + SSE) vs the engine's gRPC alone, medians"))
    print(report.table(
        [[r["concurrency"], f"{r['grpc_tps']:.1f}", f"{r['http_tps']:.1f}",
          f"{r['tps_ratio']:.3f}", f"{r['grpc_ttft_ms']:.1f}", f"{r['http_ttft_ms']:.1f}",
          f"{r['added_ttft_ms']:.1f}", _cpu(r["grpc_cpu_ms_per_1k_tokens"]),
          _cpu(r["http_cpu_ms_per_1k_tokens"])] for r in results],
        ["conc", "grpc tok/s", "http tok/s", "ratio", "grpc TTFT ms", "http TTFT ms",
         "added ms", "CPU ms/1k tok, grpc", "http"]))


def print_probes(results: list[dict]) -> None:
    print(report.banner("time to first token the gateway adds under load, probes (p50)"))
    print(report.table(
        [[r["concurrency"], r["probes"], f"{r['grpc_ttft_ms']:.1f}", f"{r['http_ttft_ms']:.1f}",
          f"{r['added_ttft_ms']:.1f}", f"{r['added_ttft_ms_paired']:.1f}"] for r in results],
        ["conc", "pairs", "gRPC TTFT ms", "HTTP TTFT ms", "added ms", "added, paired"]))
