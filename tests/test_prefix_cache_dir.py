"""--prefix-cache-dir: the prefix cache outlives its engine, and a new
engine never takes in a file that is not its own model's, whole."""

import shutil
from pathlib import Path

import pytest

from vllm_mlx.bench import test_models as make_test_models
from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import start_engine, wait_until
from .test_prefix_cache import generate, greedy, ids, make_engine, settled


@pytest.fixture(scope="module")
def plain(tiny_model):
    e = make_engine(tiny_model, prefix_cache=False)
    yield e
    e.stop()


def kv_files(folder):
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def written(tiny_model, tmp_path_factory) -> tuple[Path, list[int], list[int]]:
    """A folder that an engine wrote its cache into once quiet, after
    answering one prompt, before it died without warning (SIGKILL); the
    prompt and the answer."""
    folder = tmp_path_factory.mktemp("kv")
    e = start_engine(tiny_model, folder.parent, "--prefix-cache-dir", str(folder), "--no-warmup")
    try:
        prompt = ids(200, seed=1)
        answer = generate(e.stub, prompt)
        assert wait_until(lambda: kv_files(folder), timeout=10)
    finally:
        e.proc.kill()
        e.stop()
    return folder, prompt, answer


def test_a_cache_written_to_a_dir_is_reused_after_a_crash(written, tiny_model, tmp_path, plain):
    folder, prompt, answer = written
    folder = Path(shutil.copytree(folder, tmp_path / "kv"))
    e = start_engine(tiny_model, tmp_path, "--prefix-cache-dir", str(folder), "--no-warmup")
    try:
        assert settled(e.stub, cache_hits=0).cache_bytes == (len(prompt) + len(answer)) * 512
        follow = prompt + answer + ids(10, seed=2)  # the chat's next turn
        assert generate(e.stub, follow) == greedy(plain, "restart-ref", follow, max_tokens=12)
        s = settled(e.stub, cache_hits=1)
        assert s.cache_tokens_reused == len(prompt) + len(answer)
        e.stub.ClearPrefixCache(pb.ClearPrefixCacheRequest(), timeout=5)
        assert wait_until(lambda: not kv_files(folder), timeout=5)
    finally:
        e.stop()
    assert "restored from" in e.log()


@pytest.mark.parametrize("damage", ["another model", "truncated", "a flipped byte"])
def test_another_models_or_a_damaged_file_is_ignored_with_a_warning(
        damage, written, tiny_model, tmp_path):
    folder, prompt, answer = written
    folder = Path(shutil.copytree(folder, tmp_path / "kv"))
    model = tiny_model
    (path,) = kv_files(folder)
    data = path.read_bytes()
    if damage == "another model":  # the same shapes, other weights
        model = make_test_models.build_text_model(tmp_path / "other-tiny", seed=1)
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    e = start_engine(model, tmp_path, "--prefix-cache-dir", str(folder), "--no-warmup")
    try:
        assert settled(e.stub, cache_bytes=0)
        generate(e.stub, prompt + answer + ids(10, seed=4))
        settled(e.stub, cache_hits=0, cache_misses=1)
    finally:
        e.stop()
    warning = {"another model": "written for another model", "truncated": "unreadable",
               "a flipped byte": "damaged"}[damage]
    assert f"prefix cache: ignoring 1 file(s) in {folder}, {warning}" in e.log()
    assert path.exists()  # not ours to delete


def test_the_folder_holds_what_the_byte_budget_holds(tiny_model, tmp_path):
    """Evicted entries leave the folder too; an engine with a smaller budget
    takes the most recently used that fit and deletes the rest."""
    folder = tmp_path / "kv"
    entry = 512 * 112  # bytes: 100 prompt + 12 new tokens of the tiny model
    e = make_engine(tiny_model, prefix_cache_bytes=2 * entry + 100, prefix_cache_dir=str(folder))
    try:
        prompts = [ids(100, seed=90 + i) for i in range(3)]
        for i, (prompt, files) in enumerate(zip(prompts, (1, 2, 2))):
            greedy(e, f"budget-{i}", prompt, max_tokens=12)
            assert wait_until(lambda n=files: len(kv_files(folder)) == n, timeout=10)
        assert e.stats.cache_evictions == 1
        assert sum(p.stat().st_size for p in kv_files(folder)) < 2 * entry + 4096  # + headers
        greedy(e, "touch", prompts[1], max_tokens=12)  # a hit on the older of the two
    finally:
        e.stop()
    e = make_engine(tiny_model, prefix_cache_bytes=entry, prefix_cache_dir=str(folder))
    try:
        assert wait_until(lambda: e.stats.cache_bytes == entry)
        assert len(kv_files(folder)) == 1
        greedy(e, "restored", prompts[1], max_tokens=1)  # the one used last
        assert wait_until(lambda: e.stats.cache_hits == 1)
    finally:
        e.stop()
