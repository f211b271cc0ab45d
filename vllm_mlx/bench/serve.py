"""Drive running OpenAI-compatible servers (this project's, mlx_lm.server,
upstream vllm-mlx, LM Studio, ...) over HTTP with streaming chat completions,
closed loop: at concurrency C, C workers each send their next request when
the previous one ends, until the level's requests are done.

With several --url, each gets the same load in the same run, interleaved: at
each concurrency, rounds alternate between servers (A round 1, B round 1,
A round 2, ...), so noise on the machine hits all alike. Each server first
answers a probe (which optional fields it accepts) and a short warm-up.

What is measured, on the client, per request:
  TTFT   request sent -> first chunk with content (text, reasoning or a tool
         call; the empty role chunk does not count)
  ITL    the gaps between successive network reads that brought new content:
         a chunk carrying several tokens, or several chunks arriving in one
         read, count one gap (not spread over their tokens); see TPOT for a
         per-token figure
  TPOT   (end-to-end - TTFT) / (output tokens - 1)
  E2E    request sent -> end of the stream
Output tokens come from the stream's `usage` (asked for with
stream_options.include_usage where the server accepts it), else from the
count of content chunks; each level says which it used. Output tok/s and
requests/s are totals over the level's wall time (its rounds added up).

Prompts are plain English words drawn at random (about 1.1 tokens per word
with a Llama-style tokenizer, so ~P tokens is P/1.1 words; the prompt_tokens
each server reports in usage, chat template included, shows the real
count), a different prompt per request and per server, so no request finds
another's prefix in a cache (beyond the chat template's own opening),
unless --shared-prefix gives every prompt the same preamble. --images adds
generated JPEGs (data: URLs, different per request) after the text.
temperature is 0, and ignore_eos is sent where the server accepts it, so
that each request makes exactly --max-tokens tokens.

    vllm-mlx-bench serve --url http://127.0.0.1:8000 --url http://127.0.0.1:8080 \\
        --concurrency 1,4,16,64 --plot serve.png --output serve.json
"""

import argparse
import asyncio
import json
import os
import random
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from vllm_mlx.bench import report
from vllm_mlx.bench.inputs import data_url, jpeg, photo_like
from vllm_mlx.bench.sse_client import Outcome, closed_loop, error_text, stream_chat
from vllm_mlx.settings import freeze_startup_objects

# These words through SmolLM2-135M's tokenizer, sentences and all: 1.10 tokens
# per word (measured); Llama- and Qwen-style BPE vocabularies are close.
TOKENS_PER_WORD = 1.1
PROBE_TOKENS = 2

# Common English words; a prompt is these at random, in sentences.
WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at
which but have an they you were her she there one all we their can has been if more
when will would who so no time people year way day man thing woman life child world
school state family student group country problem hand part place case week company
system program question work government number night point home water room mother area
money story fact month lot right study book eye job word business issue side kind head
house service friend father power hour game line end member law car city community name
president team minute idea body information back parent face others level office door
health person art war history party result change morning reason research girl guy
moment air teacher force education foot boy age policy process music market sense nation
plan college interest death experience effect use class control care field development
role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model
season society tax director position player record paper space ground form event
official matter center couple site project activity star table need court oil situation
cost industry figure street image phone data picture practice piece land product doctor
wall patient worker news test movie north love support technology step baby computer
type attention film tree source organization hair window evidence population site river
good new first last long great little own other old big high different small large
next early young important few public bad same able quickly slowly often always never
again still also just very well even back only really almost together already perhaps
find make take give tell come think look want seem ask show try call keep provide hold
turn follow begin bring write stand hear allow meet lead understand watch walk learn
""".split()


# -- arguments ------------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", action="append", required=True,
                    help="a server's base URL (http://host:port, with or without /v1); "
                         "repeat to compare servers, the first is the reference")
    ap.add_argument("--concurrency", type=_levels, default="1,4,16,64", metavar="C,C,...",
                    help="comma-separated concurrency levels")
    ap.add_argument("--requests-per-level", type=int, default=0, metavar="N",
                    help="requests per server and level, split across the rounds; "
                         "0: 4 x concurrency, at least 16")
    ap.add_argument("--rounds", type=int, default=2, metavar="R",
                    help="rounds per level; servers alternate round by round")
    ap.add_argument("--prompt-tokens", type=int, default=256, metavar="P",
                    help="about this many prompt tokens per request (without the chat "
                         "template)")
    ap.add_argument("--max-tokens", type=int, default=128, metavar="K",
                    help="output tokens per request")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                    help="the first ~TOKENS of --prompt-tokens are the same in every prompt")
    ap.add_argument("--images", type=int, default=0, metavar="K",
                    help="generated JPEGs per request")
    ap.add_argument("--image-size", type=_size, default="512x512", metavar="WxH",
                    help="WIDTHxHEIGHT of each image")
    ap.add_argument("--model", action="append", metavar="NAME",
                    help="model name to send, once for every server or once per --url; "
                         "without it, the first id in each server's /v1/models")
    ap.add_argument("--warmup", type=int, default=4, metavar="N",
                    help="untimed requests per server before the first level")
    ap.add_argument("--timeout", type=float, default=600.0, metavar="S",
                    help="seconds a request may take before it counts as an error")
    ap.add_argument("--api-key", metavar="KEY",
                    help="sent as a bearer token (or set OPENAI_API_KEY)")
    ap.add_argument("--plot", metavar="PNG",
                    help="write a PNG of output tok/s and p99 TTFT against concurrency, "
                         "one line per server")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WIDTHxHEIGHT: {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError("image sides must be positive")
    return w, h


def _check(args: argparse.Namespace) -> None:
    for name in ("rounds", "prompt_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            sys.exit(f"vllm-mlx-bench serve: --{name.replace('_', '-')} must be at least 1")
    if args.requests_per_level < 0:
        sys.exit("vllm-mlx-bench serve: --requests-per-level cannot be negative")
    if args.images < 0 or args.warmup < 0:
        sys.exit("vllm-mlx-bench serve: --images and --warmup cannot be negative")
    if not 0 <= args.shared_prefix <= args.prompt_tokens:
        sys.exit("vllm-mlx-bench serve: --shared-prefix is part of --prompt-tokens: "
                 "0 <= shared prefix <= prompt tokens")
    for url in args.url:
        if not url.startswith(("http://", "https://")):
            sys.exit(f"vllm-mlx-bench serve: --url {url!r} is not an http(s) URL")
    if args.model and len(args.model) not in (1, len(args.url)):
        sys.exit("vllm-mlx-bench serve: give --model once, or once per --url")
    if args.plot:
        _require_matplotlib()


def requests_at(args: argparse.Namespace, concurrency: int) -> int:
    return args.requests_per_level or max(16, 4 * concurrency)


def split(n: int, parts: int) -> list[int]:
    """n as `parts` near-equal counts, the larger first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


# -- what each request sends ----------------------------------------------------------


def words(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of sentences of 6 to 14 random common words."""
    n = max(1, round(tokens / TOKENS_PER_WORD))
    out: list[str] = []
    while len(out) < n:
        sentence = rng.choices(WORDS, k=min(rng.randint(6, 14), n - len(out)))
        out.extend([sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."]
                   if len(sentence) > 1 else [sentence[0].capitalize() + "."])
    return " ".join(out)


def jpeg_data_url(seed: str, size: tuple[int, int]) -> str:
    """A real JPEG, different for each `seed`, as a data: URL."""
    return data_url(jpeg(photo_like(*size, seed=zlib.crc32(seed.encode())), 90))


@dataclass
class Workload:
    prompt_tokens: int
    shared_prefix: int
    images: int
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.preamble = words(random.Random("preamble"), self.shared_prefix) \
            if self.shared_prefix else ""

    def content(self, key: str) -> str | list[dict]:
        """The user message for request `key` (seeds its words and images)."""
        rng = random.Random(f"prompt/{key}")
        text = words(rng, self.prompt_tokens - self.shared_prefix) \
            if self.prompt_tokens > self.shared_prefix else ""
        text = f"{self.preamble} {text}".strip()
        if not self.images:
            return text
        # Text first, so that a shared preamble stays a prefix of the prompt.
        return [{"type": "text", "text": text}] + [
            {"type": "image_url", "image_url": {"url": jpeg_data_url(f"{key}/{i}",
                                                                     self.image_size)}}
            for i in range(self.images)]


# -- a server -------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    client: httpx.AsyncClient
    model: str = "default"
    include_usage: bool = True
    ignore_eos: bool = True
    notes: list[str] = field(default_factory=list)

    def body(self, content: str | list[dict], max_tokens: int) -> bytes:
        req: dict[str, Any] = {"model": self.model, "stream": True, "temperature": 0,
                               "max_tokens": max_tokens,
                               "messages": [{"role": "user", "content": content}]}
        if self.include_usage:
            req["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            req["ignore_eos"] = True
        return json.dumps(req).encode()


def base_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


async def discover_model(server: Server) -> None:
    try:
        r = await server.client.get("/v1/models", timeout=30)
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}: {error_text(r.content)}")
        server.model = r.json()["data"][0]["id"]
    except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        server.notes.append(f"GET /v1/models failed ({type(e).__name__}: {e}); "
                            f"sending model {server.model!r}")


async def probe(server: Server, content: str | list[dict]) -> None:
    """Finds which of stream_options and ignore_eos the server takes: the
    first of (both, no ignore_eos, no stream_options, neither) it answers."""
    first = None
    for usage, eos in ((True, True), (True, False), (False, True), (False, False)):
        server.include_usage, server.ignore_eos = usage, eos
        out = await stream_chat(server.client, server.body(content, PROBE_TOKENS))
        if out.error is None:
            break
        first = first or out.error
        if out.status is None:  # no answer at all: other fields will not help
            break
    if out.error is not None:
        server.include_usage = server.ignore_eos = False
        server.notes.append(f"every probe request failed (first: {first}); sending neither "
                            "stream_options nor ignore_eos")
        return
    if not server.ignore_eos:
        server.notes.append("ignore_eos refused: output lengths may vary")
    if not server.include_usage:
        server.notes.append("stream_options refused: output tokens are counted chunks")


# -- load -----------------------------------------------------------------------------


def level_result(concurrency: int, outcomes: list[Outcome], wall: float,
                 max_tokens: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    tokens = [o.output_tokens for o in ok]
    with_usage = sum(o.usage_tokens is not None for o in ok)
    source = "none" if not ok else "usage" if with_usage == len(ok) \
        else "chunks" if not with_usage else "mixed"
    ttft = [o.ttft for o in ok if o.ttft is not None]
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in ok
            if o.ttft is not None and o.output_tokens > 1]
    prompts = [o.prompt_tokens for o in ok if o.prompt_tokens is not None]
    result = {
        "concurrency": concurrency, "requests": len(outcomes), "completed": len(ok),
        "errors": len(failed), "first_error": failed[0].error if failed else None,
        "ttft_s": report.summary(ttft), "itl_s": report.summary([g for o in ok for g in o.gaps]),
        "tpot_s": report.summary(tpot), "e2e_s": report.summary([o.e2e for o in ok]),
        "output_tokens": sum(tokens), "output_tokens_source": source,
        "output_tokens_per_request": {"min": min(tokens, default=0),
                                      "mean": sum(tokens) / len(tokens) if tokens else 0.0,
                                      "max": max(tokens, default=0)},
        "prompt_tokens_per_request": sum(prompts) / len(prompts) if prompts else None,
        "output_tokens_per_s": sum(tokens) / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "wall_s": wall, "notes": [],
    }
    if tokens and (min(tokens) != max_tokens or max(tokens) != max_tokens):
        result["notes"].append(f"output lengths {min(tokens)}..{max(tokens)} tokens, "
                               f"not all {max_tokens}")
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Workload(args.prompt_tokens, args.shared_prefix, args.images, args.image_size)
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    most = max(args.concurrency) + 4
    # Proxies from the environment are ignored: the server is measured, not a proxy.
    # Idle connections are dropped after 2 s, well before servers close them
    # (uvicorn and Node after 5 s): a server's connections sit idle through the
    # other servers' rounds, and a request sent on one the server is closing
    # meets a reset (seen at concurrency 64 with httpx's 5 s default).
    clients = [httpx.AsyncClient(
        base_url=base_url(url), timeout=httpx.Timeout(args.timeout, connect=30),
        limits=httpx.Limits(max_connections=most, max_keepalive_connections=most,
                            keepalive_expiry=2.0),
        headers={"Authorization": f"Bearer {key}"} if key else {}, trust_env=False)
        for url in args.url]
    servers = [Server(url, client) for url, client in zip(args.url, clients)]
    freeze_startup_objects()  # the client's own collections are no server's latency
    try:
        return await _bench(args, work, servers)
    finally:
        for client in clients:
            await client.aclose()


async def _bench(args: argparse.Namespace, work: Workload,
                 servers: list[Server]) -> dict[str, Any]:
    for i, s in enumerate(servers):
        if args.model:
            s.model = args.model[i if len(args.model) > 1 else 0]
        else:
            await discover_model(s)
        await probe(s, work.content(f"{i}/probe"))
        if args.warmup:
            warm = [s.body(work.content(f"{i}/warmup/{k}"), args.max_tokens)
                    for k in range(args.warmup)]
            outcomes, _ = await closed_loop(s.client, warm, args.warmup, lambda: None)
            failed = [o for o in outcomes if o.error]
            if failed:
                s.notes.append(f"warm-up: {len(failed)} of {len(warm)} failed "
                               f"(first: {failed[0].error})")
        print(f"{s.url}: model {s.model!r}, stream usage "
              f"{'asked' if s.include_usage else 'not asked'}, ignore_eos "
              f"{'sent' if s.ignore_eos else 'not sent'}", flush=True)
        for note in s.notes:
            print(f"  note: {note}", flush=True)

    total = sum(requests_at(args, c) for c in args.concurrency) * len(servers)
    bar = tqdm(total=total, desc="requests", file=sys.stderr, leave=False, disable=None)
    levels: list[list[dict]] = [[] for _ in servers]
    try:
        for level, c in enumerate(args.concurrency):
            sizes = split(requests_at(args, c), args.rounds)
            outcomes: list[list[Outcome]] = [[] for _ in servers]
            walls = [0.0] * len(servers)
            first = 0
            for size in (n for n in sizes if n):
                for i, s in enumerate(servers):
                    # Made before the clock starts: images are not cheap.
                    bodies = [s.body(work.content(f"{i}/{level}/{first + k}"), args.max_tokens)
                              for k in range(size)]
                    got, wall = await closed_loop(s.client, bodies, c, lambda: bar.update(1))
                    outcomes[i] += got
                    walls[i] += wall
                first += size
            for i, s in enumerate(servers):
                result = level_result(c, outcomes[i], walls[i], args.max_tokens)
                if max(sizes) < c:
                    result["notes"].append(f"rounds of {max(sizes)} requests never had {c} "
                                           "in flight: raise --requests-per-level")
                levels[i].append(result)
                tqdm.write(f"{s.url} concurrency {c}: {result['output_tokens_per_s']:.1f} "
                           f"output tok/s, TTFT p50 {result['ttft_s']['p50'] * 1e3:.1f} ms, "
                           f"{result['errors']} errors")
    finally:
        bar.close()
    return {"servers": [{"url": s.url, "model": s.model, "stream_usage_asked": s.include_usage,
                         "ignore_eos_sent": s.ignore_eos, "notes": s.notes, "levels": lv}
                        for s, lv in zip(servers, levels)],
            "ratios": ratios(servers, levels),
            "settings": settings(args)}


def ratios(servers: list[Server], levels: list[list[dict]]) -> list[dict[str, Any]]:
    """Each server's output tok/s and p50 TTFT over the first server's, per
    level; None where either completed nothing (a TTFT of 0 from a server
    that only failed would read as infinitely fast)."""
    def over(x: float, r: float, both: bool) -> float | None:
        return x / r if both and r else None

    out = []
    for k, ref in enumerate(levels[0]):
        for s, lv in zip(servers, levels):
            both = bool(ref["completed"] and lv[k]["completed"])
            out.append({"concurrency": ref["concurrency"], "url": s.url,
                        "output_tokens_per_s": over(lv[k]["output_tokens_per_s"],
                                                    ref["output_tokens_per_s"], both),
                        "ttft_p50": over(lv[k]["ttft_s"]["p50"], ref["ttft_s"]["p50"], both)})
    return out


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"urls": args.url, "concurrency": args.concurrency,
            "requests_per_level": [requests_at(args, c) for c in args.concurrency],
            "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
            "words_per_prompt": max(1, round(args.prompt_tokens / TOKENS_PER_WORD)),
            "tokens_per_word_assumed": TOKENS_PER_WORD, "shared_prefix": args.shared_prefix,
            "images": args.images, "image_size": list(args.image_size),
            "max_tokens": args.max_tokens, "temperature": 0, "warmup": args.warmup,
            "timeout_s": args.timeout,
            "itl": "gap between network reads that brought content; counted once per read",
            "output_tokens": "usage.completion_tokens when sent, else content chunks"}


# -- what is printed and drawn ---------------------------------------------------------


def _ms(summary: dict[str, float]) -> str:
    return f"{summary['p50'] * 1e3:.1f} / {summary['p99'] * 1e3:.1f}"


def _figures(lv: dict[str, Any]) -> list[str]:
    if not lv["completed"]:
        return ["-"] * 7
    return [f"{lv['output_tokens_per_s']:.1f}", f"{lv['requests_per_s']:.2f}",
            _ms(lv["ttft_s"]), _ms(lv["itl_s"]), f"{lv['tpot_s']['p50'] * 1e3:.1f}",
            f"{lv['e2e_s']['p50']:.2f} / {lv['e2e_s']['p99']:.2f}", lv["output_tokens_source"]]


def print_results(results: dict[str, Any]) -> None:
    for s in results["servers"]:
        print()
        print(report.banner(f"{s['url']}  (model {s['model']})"))
        print(report.table(
            [[lv["concurrency"], lv["completed"], lv["errors"], *_figures(lv)]
             for lv in s["levels"]],
            ["conc", "done", "errors", "out tok/s", "req/s", "TTFT ms p50/p99",
             "ITL ms p50/p99", "TPOT ms", "E2E s p50/p99", "tokens from"]))
        for lv in s["levels"]:
            if lv["first_error"]:
                print(f"  concurrency {lv['concurrency']}: {lv['errors']} errors, first: "
                      f"{lv['first_error']}")
            for note in lv["notes"]:
                print(f"  concurrency {lv['concurrency']}: {note}")
        for note in s["notes"]:
            print(f"  note: {note}")
    if len(results["servers"]) < 2:
        return
    ref = results["servers"][0]["url"]
    others = [s["url"] for s in results["servers"][1:]]
    print()
    print(report.banner(f"ratios to {ref} (output tok/s: higher is better; "
                        "TTFT p50: lower is better)"))

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    rows: dict[int, list[str]] = {}
    for r in results["ratios"]:
        if r["url"] != ref:
            rows.setdefault(r["concurrency"], []).extend(
                [x(r["output_tokens_per_s"]), x(r["ttft_p50"])])
    header = ["conc"] + [f"{label} {u}" for u in others for label in ("tok/s", "TTFT")]
    print(report.table([[c, *cells] for c, cells in rows.items()], header))


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("vllm-mlx-bench serve: --plot needs matplotlib: "
                 "pip install 'vllm-mlx[plot]'")


def plot(results: dict[str, Any], path: str) -> None:
    """Two panels against concurrency: output tok/s and p99 TTFT."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    tput, ttft = fig.subplots(1, 2)
    for s in results["servers"]:
        conc = [lv["concurrency"] for lv in s["levels"]]
        label = f"{s['url']} ({s['model']})"
        tput.plot(conc, [lv["output_tokens_per_s"] for lv in s["levels"]], "o-", label=label)
        ttft.plot(conc, [lv["ttft_s"]["p99"] * 1e3 for lv in s["levels"]], "o-", label=label)
    levels = results["settings"]["concurrency"]
    for ax, title, unit in ((tput, "throughput", "output tokens/s"),
                            (ttft, "time to first token, p99", "ms")):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        if len(levels) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.grid(True, alpha=0.3)
    tput.legend(fontsize="small")
    st = results["settings"]
    fig.suptitle(f"{st['prompt_tokens']} prompt tokens, {st['max_tokens']} output tokens"
                 + (f", {st['images']} images" if st["images"] else ""))
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    results = asyncio.run(bench(args))
    print_results(results)
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot written to {args.plot}")
    return results
