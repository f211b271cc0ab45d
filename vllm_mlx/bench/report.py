"""What every benchmark shares: provenance (command line, versions, hardware)
embedded in its JSON, summary statistics, tables printed as the seed prints
them, and a progress bar for long runs."""

import json
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
PACKAGES = ("vllm-mlx", "mlx", "mlx-lm", "mlx-vlm", "mlx-metal", "mlx-cuda-13", "mlx-cpu")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def provenance(mode: str, argv: Sequence[str]) -> dict[str, Any]:
    from vllm_mlx.optimizations import detect_hardware

    return {"mode": mode, "command": "vllm-mlx-bench " + " ".join(argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
            "hardware": detect_hardware().to_dict(), "platform": platform.platform()}


def write_json(path: str | Path, mode: str, argv: Sequence[str],
               results: dict[str, Any]) -> None:
    doc = {"provenance": provenance(mode, argv), "results": results}
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p95, p99 and max of `values` (all 0 when empty)."""
    if not values:
        return dict.fromkeys(("mean", "p50", "p95", "p99", "max"), 0.0)
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "p50": percentile(ordered, 50),
            "p95": percentile(ordered, 95), "p99": percentile(ordered, 99),
            "max": ordered[-1]}


def percentile(ordered: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on stderr (quiet when stderr is not a terminal)."""
    return iter(tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False,
                     disable=None))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Columns padded to their widest cell, a dashed rule under the header."""
    cells = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def banner(title: str) -> str:
    return f"{'=' * 60}\n{title}\n{'=' * 60}"
