"""`vllm-mlx-bench` in the seed's modes, run as a user runs it, on the tiny
models; and the hardware detection it reports."""

import json
import subprocess
import sys

import pytest

from vllm_mlx.optimizations import Hardware, apple_chip, bandwidth, detect_hardware


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "vllm_mlx.bench.cli", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def results_of(path) -> dict:
    doc = json.loads(path.read_text())
    prov = doc["provenance"]
    assert prov["command"].startswith("vllm-mlx-bench ")
    assert {"python", "mlx", "mlx-lm", "vllm-mlx"} <= set(prov["versions"])
    assert prov["hardware"]["mlx_device"] in ("cpu", "gpu")
    return doc["results"]


def test_llm_mode_measures_every_seed_metric(tiny_model, tmp_path):
    out = tmp_path / "llm.json"
    done = bench("--model", str(tiny_model), "--prompts", "3", "--max-tokens", "12",
                 "--warmup", "1", "--output", str(out))
    for label in ("BENCHMARK RESULTS", "TTFT (Time to First Token)", "TPOT", "Generation Speed",
                  "Processing Speed", "Total Throughput", "Requests/Second",
                  "Process Memory (peak)", "MLX Peak Memory", "System Memory"):
        assert label in done.stdout, label
    r = results_of(out)
    assert r["total_runs"] == 3 and len(r["runs"]) == 3
    assert r["output_tokens"] == sum(run["output_tokens"] for run in r["runs"]) > 0
    for name in ("ttft_s", "tpot_s", "generation_tps", "processing_tps", "latency_s"):
        stats = r["metrics"][name]
        assert 0 < stats["mean"] <= stats["max"], (name, stats)
    assert r["total_throughput_tps"] > 0 and r["requests_per_s"] > 0
    assert r["resources"]["process_peak_rss_bytes"] > 0
    assert r["resources"]["system_memory_total_bytes"] > 0


@pytest.mark.parametrize("mode, rows", [((), 4), (("--video",), 3)])
def test_vision_sweeps_quick(tiny_vlm, tmp_path, mode, rows):
    out = tmp_path / "vision.json"
    done = bench("--model", str(tiny_vlm), "--quick", "--max-tokens", "4", *mode,
                 "--output", str(out))
    r = results_of(out)
    assert len(r["rows"]) == rows
    for row in r["rows"]:
        assert row["time_s"] > 0 and row["tokens"] > 0 and row["tokens_per_s"] > 0
        assert row["config"] in done.stdout
    assert "Summary: average" in done.stdout
    if not mode:
        # Bigger images take more of the prompt: the real decode and processor ran.
        tokens = [row["prompt_tokens"] for row in r["rows"]]
        assert tokens[0] < tokens[1] < tokens[2], tokens


def test_video_from_a_local_file(tiny_vlm, tmp_path):
    from vllm_mlx.bench.inputs import encode_clip

    video = tmp_path / "clip.mp4"
    video.write_bytes(encode_clip(3, 4, 96, 64))
    out = tmp_path / "v.json"
    bench("--model", str(tiny_vlm), "--video", "--quick", "--max-tokens", "2",
          "--video-path", str(video), "--warmup", "0", "--output", str(out))
    assert all(row["tokens"] > 0 for row in results_of(out)["rows"])


def test_hardware_on_this_machine_is_read_not_guessed():
    hw = detect_hardware()
    assert isinstance(hw, Hardware)
    assert hw.total_memory_gb and hw.total_memory_gb > 0
    assert hw.cpu_cores and hw.cpu_cores > 0
    if hw.system != "Darwin":
        # No table of Apple bandwidths applies off a Mac, and MLX's CPU
        # build has no GPU to name.
        assert hw.memory_bandwidth_gbs is None and hw.gpu_cores is None
        assert hw.chip_name  # the CPU's model name
        if hw.mlx_device == "cpu":
            assert hw.gpu_name is None and hw.gpu_memory_gb is None
    assert hw.summary()


def test_apple_chips_and_their_bandwidths():
    assert apple_chip("Apple M4 Max") == "M4 Max"
    assert apple_chip("Apple M1") == "M1"
    assert apple_chip("Intel(R) Core(TM) i9") is None
    assert bandwidth("M2 Pro", 19) == 200.0
    assert bandwidth("M4 Max", 40) == 546.0 and bandwidth("M4 Max", 32) == 410.0
    assert bandwidth("M4 Max", None) is None  # which bin is unknown: not guessed
    assert bandwidth("M9", 10) is None
