"""Soak: mixed traffic through `vllm-mlx-up` serving the tiny vision-language
model (text chats sharing a long system prompt, so the prefix cache hits;
completions; images; streams abandoned half way) while the resident memory
of every process it runs, grandchildren included, is sampled. Every process
must level off once its caches are full.

--soak-requests sets the count (300 by default; the figures in
docs/reliability.md come from 5,000). With 1,000 or more requests, each
process must grow less than 1% per 1,000 requests over the last half of the
run; with fewer, less than 5% over the last half (the caches may still be
filling)."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from ..test_multimodal_e2e import noise_png, png_url
from ..test_supervisor import Up

SYSTEM = ("You are a careful assistant who answers briefly and precisely. " * 12).strip()
CONCURRENCY = 8


@pytest.fixture(scope="module")
def up(tiny_vlm, tmp_path_factory):
    # Small caches, so that they fill early in the run and what follows
    # shows any growth beyond them.
    u = Up("--model", str(tiny_vlm), "--prefix-cache-bytes", str(4 << 20),
           "--allocator-cache-bytes", str(32 << 20), cache=tmp_path_factory.mktemp("cache"))
    u.wait_for(r"ready: http://127\.0\.0\.1:\d+/v1 serving")
    yield u
    u.stop()


def _tree_rss(pid: int) -> dict[str, int]:
    """Resident bytes of every process under `pid`, by a stable name."""
    out = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" in cmd:
            continue
        name = ("engine-core" if "spawn_main" in cmd else
                cmd.split(" -m ")[1].split()[0] if " -m " in cmd else cmd.split()[0])
        out[f"{name}-{len([k for k in out if k.startswith(name)])}"] = rss
    return out


ACCOUNTED = ("active_memory_bytes", "allocator_cache_bytes", "prefix_cache_bytes",
             "kv_bytes", "core_rss_bytes")


def _accounting(port: int) -> dict[str, int]:
    """The engine's own memory accounting, from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {name: int(float(line.split()[-1])) for line in text.splitlines()
            for name in ACCOUNTED if line.startswith(f"vllm_mlx_engine_{name} ")}


def _one(client: httpx.Client, i: int, images: list[str]) -> int:
    kind = i % 10
    if kind < 5:  # chat sharing the system prompt: prefix-cache hits
        body = {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Question {i}: what is {i} + 1?"}]}
    elif kind < 7:
        return client.post("/v1/completions", json={
            "model": "default", "prompt": f"Item {i} of the list is", "max_tokens": 8}
        ).status_code
    elif kind < 9:  # an image (a few distinct ones: the media cache hits too)
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
            {"type": "text", "text": f"Describe picture {i}."}]}]}
    else:  # a stream abandoned after a few events: an abort in the engine
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "default", "stream": True, "max_tokens": 200,
                "messages": [{"role": "user", "content": f"Tell a long story {i}."}]}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break
            return r.status_code
    r = client.post("/v1/chat/completions", json={"model": "default", "max_tokens": 8, **body})
    return r.status_code


def test_memory_levels_off_under_mixed_traffic(up, request):
    total = request.config.getoption("soak_requests")
    images = [png_url(noise_png(64 + 16 * k, 48 + 16 * k, seed=k)) for k in range(6)]
    samples: list[tuple[int, dict[str, int]]] = []
    accounts: list[dict[str, int]] = []
    done = [0]
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    every = max(total // 20, 10)

    def work(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{up.port}", timeout=120) as client:
            status = _one(client, i, images)
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            done[0] += 1
            if done[0] % every == 0:
                samples.append((done[0], _tree_rss(up.proc.pid)))
                accounts.append(_accounting(up.port))

    order = list(range(total))
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(work, order))
    assert statuses == {200: total}, statuses

    half = [s for s in samples if s[0] >= total // 2]
    first, last = half[0], half[-1]
    lines = [f"\n[reliability] soak of {total} requests, RSS by process (MB) at "
             + ", ".join(str(n) for n, _ in samples)]
    for name in sorted(last[1]):
        series = [s[1].get(name, 0) / 1e6 for s in samples]
        lines.append(f"[reliability]   {name}: " + " ".join(f"{v:.0f}" for v in series))
    for name in ACCOUNTED:
        lines.append(f"[reliability]   engine {name}: "
                     + " ".join(f"{a.get(name, 0) / 1e6:.0f}" for a in accounts))
    print("\n".join(lines))
    for name, rss in last[1].items():
        before = first[1].get(name)
        if before is None:
            continue  # restarted: a fault would show in the statuses
        growth = (rss - before) / before
        per_1000 = growth * 1000 / max(last[0] - first[0], 1)
        if total >= 1000:
            assert per_1000 < 0.01, f"{name} grew {growth:.1%} over the last half"
        else:
            assert growth < 0.05, f"{name} grew {growth:.1%} over the last half"
