"""Build a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json)
from a GGUF file's tokenizer metadata.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`, used by
SmolLM, Llama 3, Qwen and most recent models) are handled. Their GGUF tokens
and merges are already in the byte-to-unicode form the HF BPE model expects,
so they are copied as they are; what GGUF does not store is the pre-tokenizer
regex, which llama.cpp picks by the `tokenizer.ggml.pre` name, so the same
table is kept here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 splits digits one by one instead of in runs of up to three.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


class TokenizerImportError(ValueError):
    """The GGUF's tokenizer cannot be rebuilt as a Hugging Face tokenizer."""


def _gpt2_byte_level() -> pre_tokenizers.PreTokenizer:
    # use_regex=True applies GPT-2's own split pattern before byte mapping.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in (None, "default", "gpt2", "mpt", "olmo", "jais"):
        return _gpt2_byte_level()
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"):
        # Every digit its own pre-token, then GPT-2's split (as llama.cpp does).
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _gpt2_byte_level()]
        )
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return _split_then_bytes(_LLAMA3_SPLIT)
    if pre == "qwen2":
        return _split_then_bytes(_QWEN2_SPLIT)
    # A wrong split only changes which (valid) tokens a text becomes, so go on.
    log.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split rules", pre)
    return _gpt2_byte_level()


def _scalar(metadata: dict[str, Any], key: str) -> Any:
    value = metadata.get(key)
    return value.item() if hasattr(value, "item") else value


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's byte-level BPE vocabulary."""
    kind = _scalar(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerImportError(
            f"GGUF tokenizer model {kind!r} is not supported; only 'gpt2' "
            "(byte-level BPE) vocabularies can be imported"
        )
    tokens: list[str] = _as_list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in _as_list(metadata["tokenizer.ggml.merges"])]
    types = _as_list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_scalar(metadata, "tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must never be split by BPE; they
    # already have ids in the vocabulary, so adding them keeps those ids.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == _CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == _USER_DEFINED
        ]
    )
    tokenizer.post_processor = _post_processor(metadata, tokens)
    return tokenizer


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    bos_id = _scalar(metadata, "tokenizer.ggml.bos_token_id")
    eos_id = _scalar(metadata, "tokenizer.ggml.eos_token_id")
    add_bos = bool(_scalar(metadata, "tokenizer.ggml.add_bos_token")) and bos_id is not None
    add_eos = bool(_scalar(metadata, "tokenizer.ggml.add_eos_token")) and eos_id is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)
    bos = [tokens[bos_id]] if add_bos else []
    eos = [tokens[eos_id]] if add_eos else []

    def sequence(piece: str, type_id: int) -> list[str]:
        return (
            [f"{t}:{type_id}" for t in bos]
            + [f"{piece}:{type_id}"]
            + [f"{t}:{type_id}" for t in eos]
        )

    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=sequence("$A", 0) + sequence("$B", 1),
        special_tokens=[
            (tokens[i], i) for i in dict.fromkeys([bos_id, eos_id]) if tokens[i] in bos + eos
        ],
    )


def eos_token_ids(metadata: dict[str, Any]) -> list[int]:
    """Ids that end a turn: eos, plus end-of-turn/end-of-message where set (Llama 3)."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [_scalar(metadata, f"tokenizer.ggml.{k}") for k in keys]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def write_tokenizer(metadata: dict[str, Any], out_dir: Path, *, max_length: int | None) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) to out_dir."""
    tokenizer = build_tokenizer(metadata)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokens = _as_list(metadata["tokenizer.ggml.tokens"])

    def token(key: str) -> str | None:
        i = _scalar(metadata, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_scalar(metadata, "tokenizer.ggml.add_bos_token")),
        "add_eos_token": bool(_scalar(metadata, "tokenizer.ggml.add_eos_token")),
        "clean_up_tokenization_spaces": False,
    }
    if max_length:
        config["model_max_length"] = int(max_length)
    template = _scalar(metadata, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
