"""What machine this is: `detect_hardware()`.

On Apple Silicon the chip name and GPU cores come from sysctl and
system_profiler, the memory bandwidth from a table of Apple's published
figures; on Linux the CPU model, RAM and, when MLX runs on CUDA, the GPU's
name and memory. A field the machine does not tell is None, never guessed.
"""

import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass

import psutil

# Apple's published unified-memory bandwidth, GB/s. Where one chip name
# comes in two bandwidths (the binned M3 Max and M4 Max), the table holds
# the lower and the GPU core count picks the higher one (HIGHER_BANDWIDTH).
BANDWIDTH_GBS = {
    "M1": 68.25, "M1 Pro": 200.0, "M1 Max": 400.0, "M1 Ultra": 800.0,
    "M2": 100.0, "M2 Pro": 200.0, "M2 Max": 400.0, "M2 Ultra": 800.0,
    "M3": 100.0, "M3 Pro": 150.0, "M3 Max": 300.0, "M3 Ultra": 819.0,
    "M4": 120.0, "M4 Pro": 273.0, "M4 Max": 410.0,
}
# chip -> (GPU cores from which the full part's bandwidth applies, that bandwidth)
HIGHER_BANDWIDTH = {"M3 Max": (40, 400.0), "M4 Max": (40, 546.0)}


@dataclass
class Hardware:
    chip_name: str | None  # "M4 Max", or the CPU's model name off a Mac
    total_memory_gb: float | None
    memory_bandwidth_gbs: float | None
    gpu_cores: int | None
    cpu_cores: int | None
    mlx_device: str  # "gpu" or "cpu", as MLX runs by default
    gpu_name: str | None  # Metal or CUDA device name, when MLX has one
    gpu_memory_gb: float | None  # the GPU's own memory (None on unified memory)
    system: str  # Darwin, Linux, ...

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and reports, e.g. 'M4 Max (128 GB)'."""
        name = self.gpu_name if self.mlx_device == "gpu" and self.gpu_name else self.chip_name
        memory = self.gpu_memory_gb if self.gpu_memory_gb else self.total_memory_gb
        parts = [name or "unknown machine"]
        if memory:
            parts.append(f"({memory:.0f} GB)")
        if self.mlx_device == "cpu":
            parts.append(f"[MLX on CPU, {self.cpu_cores} cores]")
        return " ".join(parts)


def _run(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _mac_gpu_cores() -> int | None:
    out = _run("system_profiler", "SPDisplaysDataType")
    m = re.search(r"Total Number of Cores:\s*(\d+)", out or "")
    return int(m.group(1)) if m else None


def apple_chip(brand: str | None) -> str | None:
    """'Apple M4 Max' -> 'M4 Max'; None for anything else."""
    m = re.match(r"Apple (M\d+(?: (?:Pro|Max|Ultra))?)$", (brand or "").strip())
    return m.group(1) if m else None


def bandwidth(chip: str | None, gpu_cores: int | None) -> float | None:
    if chip not in BANDWIDTH_GBS:
        return None
    higher = HIGHER_BANDWIDTH.get(chip)
    if higher and gpu_cores is not None and gpu_cores >= higher[0]:
        return higher[1]
    if higher and gpu_cores is None:
        return None  # which of the two parts, the machine did not say
    return BANDWIDTH_GBS[chip]


def _linux_cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def detect_hardware() -> Hardware:
    import mlx.core as mx

    system = platform.system()
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    total_gb = round(psutil.virtual_memory().total / 1e9, 1)
    if system == "Darwin":
        brand = _run("sysctl", "-n", "machdep.cpu.brand_string")
        chip = apple_chip(brand) or brand
        gpu_cores = _mac_gpu_cores() if apple_chip(brand) else None
        return Hardware(chip, total_gb, bandwidth(apple_chip(brand), gpu_cores), gpu_cores,
                        os.cpu_count(), device, info.get("device_name") if device == "gpu"
                        else None, None, system)
    gpu_name = gpu_memory = None
    if device == "gpu":
        gpu_name = info.get("device_name")
        size = info.get("memory_size") or info.get("total_memory")
        gpu_memory = round(size / 1e9, 1) if size else None
    return Hardware(_linux_cpu_name(), total_gb, None, None, os.cpu_count(), device,
                    gpu_name, gpu_memory, system)
