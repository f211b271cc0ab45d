"""Build small random-weight test models fully offline: mlx-lm-loadable llama text models,
and (with --vlm, from vllm_mlx.bench.test_vlms) mlx-vlm-loadable vision-language models.

The tokenizer is trained in-process on a built-in corpus and the weights are derived from a
seed, so tests get reproducible models without touching the network or the Hugging Face hub.

Usage: python -m vllm_mlx.bench.test_models --out DIR [--shape tiny|smollm2-135m] [--seed N]
       python -m vllm_mlx.bench.test_models --out DIR --vlm [FAMILY]   (default qwen2_vl)

Importable: ``build_text_model(out_dir, seed=0, shape="tiny", dtype="float32")``; the
vision-language models: ``vllm_mlx.bench.test_vlms.build_vlm_model``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Single tokens in Qwen3's tokenizer; `think_tokens` adds them.
THINK_TOKENS = ["<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
TRAINED_VOCAB_SIZE = 512  # includes the 256 byte symbols and the special tokens

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": TRAINED_VOCAB_SIZE,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Same tensor shapes as HuggingFaceTB/SmolLM2-135M-Instruct, for realistic timings/memory.
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Llama-3.2-1B's tensor shapes (its rope scaling left out: random weights
    # read nothing from it), for timings of a model people run.
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
# mlx-lm's usual quantization: 4 bits in groups of 64.
QUANT_GROUP_SIZE = 64

# ChatML, Qwen2.5-style. Mentioning `<tool_call>` and `tool_call.name` makes mlx-lm infer its
# "json_tools" tool parser, so tool-calling code paths can be exercised with this model too.
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content -%}
    {%- for part in content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages and messages[0].role == 'system' -%}
    {{- render(messages[0].content) + '\\n\\n' -}}
  {%- endif -%}
  {{- 'You may call these tools:\\n' -}}
  {%- for tool in tools -%}{{- tool | tojson + '\\n' -}}{%- endfor -%}
  {{- 'Reply with <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call><|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if not (tools and loop.first and message.role == 'system') -%}
    {{- '<|im_start|>' + message.role + '\\n' + render(message.content) -}}
    {%- for tool_call in message.tool_calls or [] -%}
      {%- if tool_call.function is defined -%}
        {%- set tool_call = tool_call.function -%}
      {%- endif -%}
      {%- set args = tool_call.arguments -%}
      {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' -}}
      {{- (args if args is string else args | tojson) + '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

# Small built-in training corpus. Non-ASCII text makes sure multi-byte merges exist; the
# tokenizer is byte-level, so text outside the corpus still round-trips.
CORPUS = [
    (
        "The quick brown fox jumps over the lazy dog. A small model can still say hello to the "
        "world, answer a question, and tell a short story about a cat who lived in a quiet town."
    ),
    (
        "Once upon a time there was a little robot. Every morning it walked to the market, bought "
        "fresh bread and coffee, and talked with the people it met on the way. It was very happy."
    ),
    (
        "The user asks a question and the assistant gives an answer. The system message sets the "
        "rules. A tool can be called with a name and some arguments, and the tool returns a result."
    ),
    (
        "Numbers like 0, 1, 2, 3, 42, 100, 2024 and 3.14159 appear in text, as do symbols like "
        "(), [], {}, <>, +, -, *, /, =, %, $, #, @, &, !, ?, :, ; and quotes: \"this\" or 'that'."
    ),
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    (
        "We met at a café in Paris. It was a naïve idea, but the crème brûlée was worth it. "
        "Señor Muñoz ordered a piña colada and said: ¡Qué día tan bonito! Straße, Köln, Zürich."
    ),
    (
        "日本語のテキストも少し含めます。東京は大きな都市です。中文也可以。한국어 문장입니다. "
        "Русский текст тоже есть. Ελληνικά γράμματα. שלום עולם. مرحبا بالعالم."
    ),
    "Emoji make people smile 😀 🎉 🚀 ❤️ 👍 🐍 — and dashes, ellipses… and “curly quotes”.",
    (
        "In the beginning of the week the weather was cold and grey, but by Friday the sun came "
        "out and everyone went to the park to read books, play games, and eat ice cream together."
    ),
    (
        "Please write a function that sorts a list of numbers. Sure! Here is a simple example that "
        "uses the built-in sorted function and returns the new list to the caller."
    ),
]


def build_tokenizer_json(vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS) -> str:
    """Train a deterministic byte-level BPE and pad its vocab to exactly ``vocab_size`` ids.
    The special tokens get the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TRAINED_VOCAB_SIZE),
        special_tokens=special_tokens,  # get ids 0, 1, 2, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Deterministic: the trainer breaks pair-count ties by pair order, not by hash order.
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    return _pad_vocab(data, vocab_size, "Ġ")


def build_spm_tokenizer_json(vocab_size: int,
                             special_tokens: list[str] = SPECIAL_TOKENS) -> str:
    """A SentencePiece-style (Llama) tokenizer.json: words start with "▁", bytes
    outside the vocab fall back to <0xNN> tokens, and decoding drops the
    first leading space, as Llama's and Mistral's tokenizers do. mlx-lm reads
    it with its SPM streaming detokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TRAINED_VOCAB_SIZE + 256),
        special_tokens=special_tokens + byte_tokens, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    # The byte tokens are vocabulary, not special tokens that decoding skips.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return _pad_vocab(data, vocab_size, "▁")


def _pad_vocab(data: dict, vocab_size: int, word_start: str) -> str:
    # Pad with merge-free (never produced by encoding) vocab entries, so every id < vocab_size
    # decodes to word-like text. Plain vocab entries rather than added tokens: 48k added tokens
    # make AutoTokenizer.from_pretrained take ~1.3 s instead of ~0.04 s.
    vocab: dict[str, int] = data["model"]["vocab"]
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = (
        word_start + "".join(p)
        for n in itertools.count(2) for p in itertools.product(syllables, repeat=n)
    )
    for word in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    return json.dumps(data, ensure_ascii=False)


def init_weights(args: Any, seed: int, dtype: str) -> dict[str, Any]:
    """Random llama parameters (flat name -> array), deterministic per seed."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    # Only parameter names/shapes are taken from the model; mlx is lazy, so its own random
    # init is never computed.
    shapes = [(k, v.shape) for k, v in tree_flatten(llama.Model(args).parameters())]
    return random_parameters(shapes, seed, args.hidden_size, len(SPECIAL_TOKENS), dtype)


def random_parameters(shapes: list[tuple[str, tuple[int, ...]]], seed: int, hidden_size: int,
                      n_special: int, dtype: str) -> dict[str, Any]:
    """Random values for named parameter shapes, deterministic per seed: norms at one,
    norm biases at zero, token embeddings scaled to the hidden size with the first
    `n_special` (special-token) rows zeroed."""
    import mlx.core as mx

    keys = mx.random.split(mx.random.key(seed), len(shapes))

    def rand(shape: tuple[int, ...], std: float, key: mx.array) -> mx.array:
        # Uniform with the given std: ~4x faster than mx.random.normal on CPU (135M values:
        # ~1 s vs ~4 s), and the distribution shape does not matter for a test model.
        a = std * 3**0.5
        return mx.random.uniform(-a, a, shape, key=key)

    params = {}
    for (name, shape), key in zip(shapes, keys):
        module = name.rsplit(".", 2)[-2] if "." in name else ""
        is_norm = "norm" in module or module.startswith("ln_")
        if is_norm and name.endswith(".weight"):
            w = mx.ones(shape)
        elif is_norm and name.endswith(".bias"):
            w = mx.zeros(shape)
        elif name.endswith("embed_tokens.weight"):
            # std 1/sqrt(hidden) gives tied-head logits with std ~1: a real spread for sampling.
            w = rand(shape, hidden_size**-0.5, key)
            # Zero special-token rows: their logit is then always 0, below the max of the
            # others, so greedy decoding never stops on EOS and `max_tokens` sets the length.
            w[:n_special] = 0.0
        else:
            # Not HF's N(0, 0.02): with tied embeddings the residual stream would be dominated
            # by the input token's own embedding and greedy decoding would repeat the last
            # prompt token forever. A gain of 2/sqrt(fan_in) lets the layers dominate instead.
            w = rand(shape, 2.0 * shape[-1] ** -0.5, key)
        params[name] = w.astype(getattr(mx, dtype))
    mx.eval(params)
    return params


def build_text_model(
    out_dir: Path, *, seed: int = 0, shape: str = "tiny", dtype: str = "float32",
    tokenizer: str = "bpe", bits: int | None = None, think_tokens: bool = False,
) -> Path:
    """Write a random-weight llama model folder loadable with ``mlx_lm.load(out_dir)``;
    `tokenizer`: "bpe" (byte-level, as GPT-2, Qwen and SmolLM2) or "spm"
    (SentencePiece-style, as Llama 2 and Mistral); `bits`: quantized as
    mlx-lm quantizes (4 or 8 bits, groups of 64); `think_tokens`: <think> and
    </think> as tokens of their own (bpe only)."""
    import mlx.core as mx
    from mlx_lm.models import llama

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]

    special = SPECIAL_TOKENS + (THINK_TOKENS if think_tokens else [])
    if tokenizer == "bpe":
        tokenizer_json = build_tokenizer_json(dims["vocab_size"], special)
    else:
        tokenizer_json = build_spm_tokenizer_json(dims["vocab_size"])
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    eos_id, pad_id = vocab[EOS_TOKEN], vocab[PAD_TOKEN]
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **dims,
        "head_dim": dims["hidden_size"] // dims["num_attention_heads"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
    }
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json", {"eos_token_id": eos_id, "pad_token_id": pad_id}
    )
    _write_tokenizer_config(out_dir, special, CHAT_TEMPLATE, dims["max_position_embeddings"])

    model_args = llama.ModelArgs.from_dict(config)
    weights = init_weights(model_args, seed, dtype)
    if bits is not None:
        weights = _quantized(model_args, weights, bits)
        config["quantization"] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
        _write_json(out_dir / "config.json", config)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out_dir


def _quantized(args: Any, weights: dict[str, Any], bits: int) -> dict[str, Any]:
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(args)
    model.load_weights(list(weights.items()))
    nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=bits)
    return dict(tree_flatten(model.parameters()))


def _write_tokenizer_config(out_dir: Path, special_tokens: list[str], chat_template: str,
                            model_max_length: int, **overrides: Any) -> None:
    """tokenizer_config.json and special_tokens_map.json; `overrides` replace or add
    tokenizer_config.json entries (a family's bos_token, its named special tokens)."""
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": chat_template,
            **overrides,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": special_tokens[1:],
        },
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from vllm_mlx.bench.test_vlms import VLM_FAMILIES, build_vlm_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to (over)write")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="quantize the weights")
    parser.add_argument("--vlm", nargs="?", const="qwen2_vl", choices=VLM_FAMILIES,
                        help="build a vision-language model of this family instead "
                             "(default family: qwen2_vl); --shape does not apply")
    ns = parser.parse_args(argv)
    if ns.vlm:
        print(build_vlm_model(ns.out, family=ns.vlm, seed=ns.seed, dtype=ns.dtype))
    else:
        print(build_text_model(ns.out, seed=ns.seed, shape=ns.shape, dtype=ns.dtype,
                               bits=ns.bits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
