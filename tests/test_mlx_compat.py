"""engine_worker/mlx_compat.py owns every use of mlx-lm's internals: no
other module touches a private name, each seam works against the installed
versions, and a version mismatch fails with a message naming both."""

import ast
from pathlib import Path

import mlx.core as mx
import pytest

from engine_worker import mlx_compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine_worker", "gateway", "media_worker", "vllm_mlx")
# Private names of objects that are not mlx's, mlx-lm's or mlx-vlm's.
NOT_MLX = {"os._exit", "Output._make", "shm._name"}


def private_uses(path: Path) -> list[str]:
    """`x._name` (x not self or cls) and getattr(x, "_name") in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append(ast.unparse(node))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_")):
            found.append(ast.unparse(node))
    return found


def test_only_the_compat_module_touches_private_names():
    offenders = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.parts or path.name == "mlx_compat.py":
                continue
            uses = [u for u in private_uses(path) if u not in NOT_MLX]
            if uses:
                offenders[str(path.relative_to(ROOT))] = uses
    assert offenders == {}
    # The scan sees what it looks for.
    assert "gen._generation_batch" in private_uses(ROOT / "engine_worker" / "mlx_compat.py")


def test_a_version_mismatch_names_both_versions():
    mlx_compat.check_versions()  # the installed ones are the ones it was written for
    with pytest.raises(ImportError) as info:
        mlx_compat.check_versions({"mlx-lm": "0.99.0"})
    message = str(info.value)
    assert "0.99.0" in message and mlx_compat.WRITTEN_FOR["mlx-lm"] in message


def test_each_seam_against_the_installed_mlx_lm(tiny_model):
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
    from mlx_lm.models.cache import BatchKVCache

    model, _ = load(str(tiny_model))
    gen = BatchGenerator(model, prefill_batch_size=2)
    assert isinstance(mlx_compat.decoding_batch(gen), GenerationBatch)
    assert isinstance(mlx_compat.prompt_batch(gen), PromptProcessingBatch)
    before = mlx_compat.prompt_seconds(gen)
    gen.insert([[5, 6, 7, 8, 9], [10, 11, 12]], max_tokens=[3, 3])
    kv = []
    while gen.next_generated():
        if len(mlx_compat.decoding_batch(gen)):  # rows still decoding
            kv = list(mlx_compat.decoding_batch(gen).prompt_cache)
    assert mlx_compat.prompt_seconds(gen) > before
    assert kv
    assert all(type(c) is BatchKVCache for c in kv)
    ends = mlx_compat.kv_end(kv[0])
    assert mx.array(ends).size >= 1
    gen.close()
