"""Write a dense (dequantized) copy of a quantized mlx-lm model folder.

On Linux CPUs, MLX's float32 matmuls go through BLAS (fast with OpenBLAS
preloaded) while quantized and half-precision matmuls run on slower generic
kernels, so a float32 copy of a small quantized model decodes several times
faster there. On Apple GPUs keep the quantized folder.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
_QUANT_KEYS = ("quantization", "quantization_config")


def _layer_quantization(config: dict[str, Any], path: str) -> dict[str, Any]:
    quant = config.get("quantization") or {}
    layer = quant.get(path)
    return layer if isinstance(layer, dict) else quant


def dequantize_weights(
    weights: dict[str, mx.array], config: dict[str, Any], dtype: str
) -> dict[str, mx.array]:
    """Replace every (weight, scales, biases) triplet by its dense weight; cast floats to dtype."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, not {dtype!r}")
    target = FLOAT_DTYPES[dtype]
    dense = {}
    for name, array in weights.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue
        path = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{path}.scales" in weights:
            layer = _layer_quantization(config, path)
            if layer.get("mode", "affine") != "affine":
                raise ValueError(f"{path}: only affine quantization can be dequantized here")
            group_size = layer.get("group_size", 64)
            scales = weights[f"{path}.scales"]
            # Bits follow from the packed width: in_dims * bits == packed_width * 32.
            bits = array.shape[-1] * 32 // (scales.shape[-1] * group_size)
            array = mx.dequantize(
                array,
                scales.astype(mx.float32),
                weights[f"{path}.biases"].astype(mx.float32),
                group_size=group_size,
                bits=bits,
            )
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(target)
        dense[name] = array
    return dense


def write_dense_copy(src: str | Path, dst: str | Path, dtype: str = "float32") -> Path:
    """Copy the mlx-lm folder `src` to `dst` with quantized layers dequantized to `dtype`."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config and "quantization" not in config:
        # AWQ/GPTQ/FP8 layouts are turned into MLX ones only inside mlx-lm's loader.
        raise ValueError(f"{src}: only MLX-quantized models can be dequantized here")
    weights: dict[str, mx.array] = {}
    for file in sorted(glob.glob(str(src / "model*.safetensors"))):
        weights.update(mx.load(file))
    dense = dequantize_weights(weights, config, dtype)

    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dense, metadata={"format": "mlx"})
    for item in src.iterdir():
        # Weights are rewritten above; the index would name the old shards.
        skip = item.name.startswith("model") and (
            item.suffix == ".safetensors" or item.name.endswith(".safetensors.index.json")
        )
        if item.is_file() and not skip and item.name != "config.json":
            shutil.copy2(item, dst / item.name)
    for key in _QUANT_KEYS:
        config.pop(key, None)
    config["torch_dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
