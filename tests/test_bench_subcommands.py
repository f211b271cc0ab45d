"""`vllm-mlx-bench engine | gateway | cache | media`, each run as a user runs
it (a real process, which starts its own engine, gateway, media workers or
whole stack on loopback ports) on the tiny models at the smallest sizes: it
exits 0, prints its table, and writes JSON with its provenance and every
figure, each of them positive."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "vllm_mlx.bench.cli", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def results_of(path, mode: str) -> dict:
    doc = json.loads(path.read_text())
    prov = doc["provenance"]
    assert prov["mode"] == mode
    assert prov["command"].startswith(f"vllm-mlx-bench {mode} ")
    assert {"python", "mlx", "mlx-lm", "vllm-mlx"} <= set(prov["versions"])
    assert prov["hardware"]["mlx_device"] in ("cpu", "gpu")
    return doc["results"]


def positive(row: dict, *keys: str) -> None:
    for k in keys:
        value = row[k]
        values = value if isinstance(value, list) else [value]
        assert values and all(v > 0 for v in values), (k, value)


def spent(figures: dict, *keys: str) -> None:
    """CPU or loop time by part: each part there, none negative (a tiny run
    may spend less than a clock tick in one)."""
    assert set(keys) <= set(figures), figures
    assert all(v >= 0 for v in figures.values()), figures


# -- engine --------------------------------------------------------------------------


def engine_row_figures(row: dict, kinds: list[str], engines: list[str], rounds: int) -> None:
    positive(row, "raw_tps", "ratio", "paired_ratio")
    assert len(row["raw_all"]) == rounds
    for k in kinds:
        positive(row, f"{k}_tps", f"{k}_all", f"{k}_ratio", f"{k}_paired_ratio",
                 f"{k}_loop_steps", f"{k}_prefill_passes")
        assert len(row[f"{k}_all"]) == rounds
        spent(row[f"{k}_loop_us_per_step"], "step", "prefill", "admit", "publish")
        assert row[f"{k}_loop_us_per_step"]["step"] > 0
    for k in engines:
        spent(row[f"{k}_cpu_ms_per_1k_tokens"], "client", "front_end", "core")


def test_engine_against_raw_with_core_waves_and_restarts(tmp_path):
    out = tmp_path / "engine.json"
    done = bench("engine", "--models", "tiny", "--cache", str(tmp_path / "models"),
                 "--concurrency", "1", "2", "--rounds", "1", "--max-tokens", "4",
                 "--waves", "2", "--restarts", "2", "--output", str(out))
    for label in ("engine over gRPC vs raw mlx-lm", "raw tok/s", "core/raw", "engine/raw",
                  "us per step", "CPU ms per 1,000 tokens", "pooled over restarts"):
        assert label in done.stdout, label
    r = results_of(out, "engine")
    assert (r["models"], r["concurrency"], r["rounds"], r["waves"], r["restarts"]) == (
        ["tiny"], [1, 2], 1, 2, 2)
    assert r["max_tokens"] == 4 and r["prompt_len"] == 32 and r["core"] is True
    assert [(row["restart"], row["concurrency"]) for row in r["results"]] == [
        (0, 1), (0, 2), (1, 1), (1, 2)]
    for row in r["results"]:
        assert row["model"] == "tiny"
        engine_row_figures(row, ["core", "engine"], ["engine"], rounds=1)
    assert [(p["concurrency"], p["pairs"]) for p in r["pooled"]] == [(1, 2), (2, 2)]
    for p in r["pooled"]:
        positive(p["paired_ratio"], "core", "engine")


def test_engine_compared_with_other_flags_without_core(tiny_model, tmp_path):
    out = tmp_path / "engine.json"
    done = bench("engine", "--model", str(tiny_model), "--no-core", "--concurrency", "2",
                 "--rounds", "2", "--max-tokens", "3", "--compare-flags=--no-prefix-cache",
                 "--output", str(out))
    assert "engine_b/raw" in done.stdout and "core/raw" not in done.stdout
    r = results_of(out, "engine")
    assert r["compare_flags"] == "--no-prefix-cache" and r["core"] is False
    [row] = r["results"]
    assert row["model"] == tiny_model.name and "core_tps" not in row
    engine_row_figures(row, ["engine", "engine_b"], ["engine", "engine_b"], rounds=2)


# -- gateway -------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--side-by-side", "--prompt-form", "chat")],
                         ids=["ids", "side-by-side-chat"])
def test_gateway_against_grpc(tiny_model, tmp_path, flags):
    out = tmp_path / "gateway.json"
    done = bench("gateway", "--model", str(tiny_model), "--concurrency", "1", "2",
                 "--rounds", "1", "--max-tokens", "4", *flags, "--output", str(out))
    for label in ("gateway (HTTP + SSE) vs the engine's gRPC alone", "grpc tok/s",
                  "http tok/s", "added ms"):
        assert label in done.stdout, label
    r = results_of(out, "gateway")
    assert r["model"] == tiny_model.name and r["rounds"] == 1 and r["ttft_probes"] == 0
    assert r["side_by_side"] == bool(flags)
    assert r["prompt_form"] == ("chat" if flags else "ids")
    assert [row["concurrency"] for row in r["results"]] == [1, 2]
    for row in r["results"]:
        positive(row, "grpc_tps", "http_tps", "grpc_ttft_ms", "http_ttft_ms", "grpc_tps_all",
                 "http_tps_all", "grpc_ttft_ms_all", "http_ttft_ms_all", "tps_ratio")
        assert row["added_ttft_ms"] == row["http_ttft_ms"] - row["grpc_ttft_ms"]
        for path in ("grpc", "http"):
            spent(row[f"{path}_cpu_ms_per_1k_tokens"], "engine", "gateway", "client")


def test_gateway_ttft_probes_under_load(tiny_model, tmp_path):
    out = tmp_path / "probes.json"
    done = bench("gateway", "--model", str(tiny_model), "--concurrency", "2",
                 "--ttft-probes", "3", "--max-tokens", "4", "--output", str(out))
    assert "time to first token the gateway adds under load" in done.stdout
    assert "added, paired" in done.stdout
    r = results_of(out, "gateway")
    assert r["ttft_probes"] == 3 and r["client_procs"] == 2
    [row] = r["results"]
    assert row["concurrency"] == 2 and row["probes"] == 3
    positive(row, "grpc_ttft_ms", "http_ttft_ms", "grpc_ttft_ms_all", "http_ttft_ms_all")
    assert len(row["grpc_ttft_ms_all"]) == len(row["http_ttft_ms_all"]) == 3
    # Differences: a sign, not a size, is what a tiny run can tell.
    assert isinstance(row["added_ttft_ms"], float)
    assert isinstance(row["added_ttft_ms_paired"], float)


# -- cache ---------------------------------------------------------------------------


def test_cache_miss_against_hit(tiny_model, tmp_path):
    out = tmp_path / "cache.json"
    # This tree as the baseline too: the option's path, not a comparison.
    done = bench("cache", "--models", str(tiny_model), "--prefix-len", "300", "--rounds", "1",
                 "--turns", "2", "--shared-len", "100", "--concurrent", "3",
                 "--baseline-src", str(ROOT), "--output", str(out))
    assert "prefix cache: time to first token, miss vs hit" in done.stdout
    assert "TTFT miss ms (300 tok)" in done.stdout
    assert "3 at once, 100 shared: TTFT p50 ms" in done.stdout
    r = results_of(out, "cache")
    assert (r["prefix_len"], r["rounds"], r["turns"]) == (300, 1, 2)
    [row] = r["results"]
    positive(row, "ttft_miss_s", "ttft_hit_s", "speedup", "chat_final_len", "chat_cached_s",
             "chat_plain_s", "chat_cached_ttft_s", "chat_plain_ttft_s", "cache_hits",
             "cache_misses", "cache_tokens_reused", "cache_bytes", "abort_ttft_miss_s",
             "abort_ttft_hit_s", "abort_speedup", "shared_ttft_p50_s", "shared_ttft_max_s")
    positive(row["baseline"], "abort_ttft_miss_s", "abort_ttft_hit_s", "shared_ttft_p50_s")
    assert len(row["shared_ttfts_s"]) == len(row["baseline"]["shared_ttfts_s"]) == 3
    assert row["model"] == tiny_model.name and row["chat_turns"] == 2
    # Both engines decode greedily: the cache changes how fast, not what.
    assert row["chat_same_tokens"] is True
    # 200 system + 2 x (30 user + 32 completion) tokens.
    assert row["chat_final_len"] == 324


# -- media ---------------------------------------------------------------------------


def test_media_second_turn(tmp_path):
    out = tmp_path / "turns.json"
    done = bench("media", "--parts", "turns", "--cache", str(tmp_path / "models"),
                 "--rounds", "1", "--image-size", "320x240", "--prompt-tokens", "400",
                 "--max-tokens", "8", "--output", str(out))
    assert "the second turn about a picture" in done.stdout
    r = results_of(out, "media")["turns"]
    positive(r, "first_ttft_ms", "second_ttft_ms", "speedup", "prompt_tokens")
    # The filler is fitted to the asked length by measuring the prompt.
    assert abs(r["prompt_tokens"] - 400) <= 40, r["prompt_tokens"]
    assert len(r["first_ttft_all_ms"]) == len(r["second_ttft_all_ms"]) == 1


def test_media_load_and_prepare(tmp_path):
    out = tmp_path / "media.json"
    done = bench("media", "--cache", str(tmp_path / "models"),
                 "--rounds", "1", "--per-round", "3", "--gap-ms", "0",
                 "--image-size", "320x240", "--load-images", "8",
                 "--reps", "1", "--image-sizes", "64x48", "200x100", "--frame-counts", "2",
                 "--clip-seconds", "1", "--clip-size", "160x120", "--output", str(out))
    for label in ("text time to first token while images are prepared",
                  "4 images being decoded", "4 image requests in flight", "engine loop per state",
                  "media preparation", "profile tiny: images", "profile qwen2-vl-7b: video",
                  "decoders, the whole clip", "Prepare through a media worker process"):
        assert label in done.stdout, label
    r = results_of(out, "media")
    assert r["parts"] == ["load", "prepare"]

    load = r["load"]
    assert load["media_workers"] == 2 and load["samples_per_state"] == 3
    positive(load, *(f"{state}_{q}_ms" for state in ("quiet", "decoding", "loaded")
                     for q in ("p50", "p99")),
             *(f"{state}_{q}_ratio" for state in ("decoding", "loaded") for q in ("p50", "p99")),
             "prepare_calls", "prepare_latency_p50_ms", "image_requests",
             "image_latency_p50_ms", "quiet_all", "decoding_all", "loaded_all")
    # Each load sends its 8 images at most once, then again: the repeats are counted.
    assert load["prepare_repeats"] == max(0, load["prepare_calls"] - 8), load
    assert load["image_repeats"] == max(0, load["image_requests"] - 8), load
    for state in ("quiet", "decoding", "loaded"):
        loop = load["engine_loop_ms"][state]
        spent(loop, "admit", "prefill", "step", "steps", "prefill_passes")
        assert loop["steps"] > 0, loop

    prep = r["prepare"]
    positive(prep["clip"], "seconds", "fps", "bytes")
    assert prep["clip"]["size"] == "160x120"
    for name in ("tiny", "qwen2-vl-7b"):
        images, videos = prep["profiles"][name]["images"], prep["profiles"][name]["videos"]
        assert [x["size"] for x in images] == ["64x48", "200x100"]
        for x in images:
            positive(x, "jpeg_bytes", "decode_s", "preprocess_s", "total_s", "tokens",
                     "tensor_bytes")
        [video] = videos
        assert video["frames"] == 2
        positive(video, "decode_s", "preprocess_s", "total_s", "tokens", "tensor_bytes")
    # A bigger image is more tokens: the real decode and processor ran.
    tiny = prep["profiles"]["tiny"]["images"]
    assert tiny[0]["tokens"] < tiny[1]["tokens"]
    decoders = prep["decoders"]
    positive(decoders, "pyav_all_frames_threads_auto_s", "pyav_all_frames_one_thread_s",
             "pyav_16_sampled_s", "frames_decoded")
    assert decoders["frames_decoded"] == 30
    if decoders["opencv_version"] is not None:  # opencv-python is no dependency
        positive(decoders, "opencv_all_frames_s", "opencv_16_sampled_s")
        assert decoders["opencv_temp_file_write_s"] >= 0
    grpc = prep["grpc_tiny"]
    assert [x["size"] for x in grpc["images"]] == ["64x48", "200x100"]
    assert [x["frames"] for x in grpc["videos"]] == [2]
    for x in grpc["images"] + grpc["videos"]:
        positive(x, "round_trip_s")
    assert prep["loadavg_at_start"] and prep["loadavg_at_end"]


# -- flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["engine", "gateway", "cache", "media"])
def test_help_explains_every_flag_with_its_default(command):
    import argparse

    from vllm_mlx.bench.cli import build_parser

    parser = build_parser(command)
    text = " ".join(parser.format_help().split())
    assert parser.description.split("\n")[0] in text
    for action in parser._actions:  # argparse lists its actions nowhere public
        if not action.option_strings or action.default == argparse.SUPPRESS:
            continue
        assert action.help, f"{command}: {action.option_strings[0]} has no help text"
        if action.default is not None:
            assert f"(default: {action.default})" in text, (command, action.option_strings[0])
