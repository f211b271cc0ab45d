"""Convert a llama-architecture GGUF file into an mlx-lm model folder.

The folder holds model.safetensors (MLX names; Q4_0/Q4_1/Q8_0 tensors stay
quantized as MLX affine 4/8-bit with group size 32), config.json, and the
tokenizer files. `mx.load` does the GGUF decoding; this module checks the
tensor types first, renames tensors, and writes the config mlx-lm needs.

llama.cpp stores Q and K projections permuted for its interleaved ("GPT-J")
rotary layout, which is what MLX calls `traditional` rope, so the config sets
`rope_traditional: true` instead of un-permuting the weights.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from vllm_mlx.model_files.gguf_header import GGUFHeader, TensorInfo, read_gguf_header
from vllm_mlx.model_files.gguf_tokenizer import TokenizerImportError, eos_token_ids, write_tokenizer

# Bumped whenever the output of this module changes, so cached folders made
# by an older converter are not reused.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama",)
GROUP_SIZE = 32
# GGUF types `mx.load` turns into MLX quantized triplets (weight, scales, biases).
QUANTIZED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
# GGUF types kept as dense arrays. Q6_K and Q2_K come back from `mx.load`
# dequantized to float16, matching gguf-py's reference dequantizer; Q4_K also
# comes back as float16 but with wrong values (mlx 0.32.4), and other types
# fail or are silently dropped, so those are refused up front. BF16 is read
# here instead of through `mx.load`, which narrows it to float16 (inf past 65504).
DENSE_TYPES = ("F32", "F16", "BF16", "Q6_K", "Q2_K")
SUPPORTED_TENSOR_TYPES = tuple(QUANTIZED_BITS) + DENSE_TYPES
FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# `.biases` (MLX quantization offsets) and `.bias` (a layer's bias) differ.
_PARAMS = ("weight", "bias", "scales", "biases")
_ROPE_FREQS = "rope_freqs.weight"


class GGUFImportError(ValueError):
    """The GGUF file holds something this importer cannot convert."""


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Convert `gguf_path` into an mlx-lm folder at `out_dir` (created; must not hold a model).

    `dtype` is the type of every non-quantized array (norms, dense weights,
    quantization scales and biases): "float16", "bfloat16" or "float32".
    Default: bfloat16 if the file has BF16 tensors, else float16 (GGUF's
    quantization scales are float16, so that keeps them exact).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    header = read_gguf_header(gguf_path)
    check_supported(header, gguf_path)
    dtype = dtype or _default_dtype(header)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, not {dtype!r}")

    raw, metadata = mx.load(str(gguf_path), return_metadata=True)
    _check_loaded(header, raw, gguf_path)
    _read_bf16(gguf_path, header, raw)
    rope_freqs = np.array(raw[_ROPE_FREQS], dtype=np.float64) if _ROPE_FREQS in raw else None
    config = llama_config(metadata, header, rope_freqs)
    config["quantization"] = quantization_config(header)
    if not config["quantization"]:
        del config["quantization"]
    else:
        # Older mlx-lm releases and other MLX tools read this key instead.
        config["quantization_config"] = config["quantization"]

    weights = {}
    for name, array in raw.items():
        if name == _ROPE_FREQS:
            continue  # folded into config["rope_scaling"]
        if array.dtype in (mx.float16, mx.bfloat16, mx.float32):
            array = array.astype(FLOAT_DTYPES[dtype])
        weights[mlx_name(name)] = array
    config["torch_dtype"] = dtype

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    try:
        write_tokenizer(metadata, out_dir, max_length=config.get("max_position_embeddings"))
    except TokenizerImportError as e:
        raise GGUFImportError(f"{gguf_path}: {e}") from e
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def check_supported(header: GGUFHeader, gguf_path: Path) -> None:
    """Raise GGUFImportError naming the architecture or tensor type we can't convert."""
    if header.split_count > 1:
        raise GGUFImportError(
            f"{gguf_path} is one of {header.split_count} parts of a split GGUF; merge them "
            "first (llama-gguf-split --merge)"
        )
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{gguf_path}: architecture {header.architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for info in header.tensors.values():
        if info.type_name not in SUPPORTED_TENSOR_TYPES:
            raise GGUFImportError(
                f"{gguf_path}: tensor {info.name!r} has type {info.type_name}, which is "
                f"not supported (supported: {', '.join(SUPPORTED_TENSOR_TYPES)}); "
                "re-export the model with e.g. llama.cpp's Q4_0, Q8_0 or F16 types"
            )
        if info.name != _ROPE_FREQS:
            try:
                mlx_name(info.name)
            except GGUFImportError as e:
                raise GGUFImportError(f"{gguf_path}: {e}") from None


def _check_loaded(header: GGUFHeader, loaded: dict[str, mx.array], gguf_path: Path) -> None:
    # mx.load skips tensors of types it does not know instead of failing.
    for info in header.tensors.values():
        extra = (".scales", ".biases") if info.type_name in QUANTIZED_BITS else ()
        base = info.name.removesuffix(".weight")
        names = [info.name] + [base + suffix for suffix in extra]
        if any(n not in loaded for n in names):
            raise GGUFImportError(f"{gguf_path}: mx.load did not return tensor {info.name!r}")


def mlx_name(gguf_name: str) -> str:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales'."""
    module, _, param = gguf_name.rpartition(".")
    target = None
    if param in _PARAMS:
        if module.startswith("blk."):
            _, layer, part = (module.split(".", 2) + ["", ""])[:3]
            if layer.isdigit() and part in _PER_LAYER:
                target = f"model.layers.{layer}.{_PER_LAYER[part]}"
        else:
            target = _TOP_LEVEL.get(module)
    if target is None:
        raise GGUFImportError(f"GGUF tensor {gguf_name!r} has no place in mlx-lm's llama model")
    return f"{target}.{param}"


def quantization_config(header: GGUFHeader) -> dict[str, Any]:
    """mlx-lm's `quantization` entry: the most common bit width, plus per-layer
    entries for layers quantized differently (SmolLM2's Q4_1 file keeps its
    embedding in Q8_0). Dense layers need no entry: mlx-lm only quantizes
    layers whose `.scales` are in the weights."""
    bits = {
        mlx_name(name).rpartition(".")[0]: QUANTIZED_BITS[info.type_name]
        for name, info in header.tensors.items()
        if info.type_name in QUANTIZED_BITS
    }
    if not bits:
        return {}
    common = Counter(bits.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for path, b in sorted(bits.items()):
        if b != common:
            config[path] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return config


def _default_dtype(header: GGUFHeader) -> str:
    has_bf16 = any(t.type_name == "BF16" for t in header.tensors.values())
    return "bfloat16" if has_bf16 else "float16"


def _read_bf16(gguf_path: Path, header: GGUFHeader, weights: dict[str, mx.array]) -> None:
    """Replace mx.load's float16 narrowing of BF16 tensors by the exact values."""
    for info in header.tensors.values():
        if info.type_name == "BF16":
            weights[info.name] = _read_raw(gguf_path, info, np.uint16).view(mx.bfloat16)


def _read_raw(gguf_path: Path, info: TensorInfo, np_dtype: type) -> mx.array:
    count = int(np.prod(info.shape))
    data = np.fromfile(gguf_path, dtype=np_dtype, count=count, offset=info.offset)
    return mx.array(data.reshape(info.shape))


def _value(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value


def llama_config(
    metadata: dict[str, Any], header: GGUFHeader, rope_freqs: np.ndarray | None = None
) -> dict[str, Any]:
    """mlx-lm config.json fields for a llama GGUF, from its metadata, tensor table
    and (Llama 3.1+) rope frequency factors."""
    arch = header.architecture

    def meta(key: str, default: Any = None) -> Any:
        value = _value(metadata, f"{arch}.{key}", default)
        if isinstance(value, list):
            # Per-layer head counts or widths (e.g. OpenELM) have no llama equivalent.
            raise GGUFImportError(f"per-layer {arch}.{key} is not supported")
        return value

    tensors = header.tensors
    hidden = meta("embedding_length")
    heads = meta("attention.head_count")
    head_dim = meta("attention.key_length") or hidden // heads
    rope_dim = meta("rope.dimension_count") or head_dim
    if rope_dim != head_dim:
        raise GGUFImportError(
            f"partial rotary embedding ({rope_dim} of {head_dim}) is not supported"
        )
    # The embedding's rows are what mlx-lm must allocate, whatever the metadata says.
    vocab = tensors["token_embd.weight"].shape[0]
    rope_theta = float(meta("rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": meta("block_count"),
        "intermediate_size": meta("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv") or heads,
        "head_dim": head_dim,
        # GGUF stores it as float32: 1e-5 reads back as 9.9999997e-06.
        "rms_norm_eps": float(f"{meta('attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "rope_theta": rope_theta,
        "rope_traditional": True,
        "max_position_embeddings": meta("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    rope_scaling = _rope_scaling(metadata, arch, rope_freqs, rope_theta, head_dim)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    bos = _value(metadata, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = bos
    eos = eos_token_ids(metadata)
    if eos:
        config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    return {k: v for k, v in config.items() if v is not None}


def _rope_scaling(
    metadata: dict[str, Any],
    arch: str,
    rope_freqs: np.ndarray | None,
    theta: float,
    head_dim: int,
) -> dict[str, Any] | None:
    kind = _value(metadata, f"{arch}.rope.scaling.type", "none")
    factor = _value(metadata, f"{arch}.rope.scaling.factor")
    if rope_freqs is not None:
        # Llama 3.1+ stores its frequency factors as a tensor, not parameters.
        params = _llama3_parameters(rope_freqs, metadata, arch, theta, head_dim)
        return {"rope_type": "llama3", **params}
    if kind in ("none", None) or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    raise GGUFImportError(f"rope scaling type {kind!r} is not supported")


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """Per-frequency divisors as Llama 3.1's HF config defines them (llama.cpp's rope_freqs)."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium)
    )


def _llama3_parameters(
    factors: np.ndarray, metadata: dict[str, Any], arch: str, theta: float, head_dim: int
) -> dict[str, Any]:
    # The GGUF keeps only the resulting factors; find the HF parameters that
    # produce them (Meta's releases all use low=1, high=4, and an original
    # context of 8192) and refuse the file if none do.
    factors = factors.reshape(-1)
    original = _value(metadata, f"{arch}.rope.scaling.original_context_length") or 8192
    params = {
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original),
    }
    expected = llama3_rope_factors(
        theta,
        head_dim,
        params["factor"],
        params["low_freq_factor"],
        params["high_freq_factor"],
        params["original_max_position_embeddings"],
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise GGUFImportError(
            "rope_freqs tensor does not match Llama 3 rope scaling; not supported"
        )
    return params
