"""Loading a text model and the facts about it the engine serves."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm import load
from mlx_lm.tokenizer_utils import TokenizerWrapper

# Used when a config names no context length at all.
FALLBACK_CONTEXT_LENGTH = 4096


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    name: str
    path: str
    context_length: int
    vocab_size: int

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self.tokenizer.eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None


def context_length_of(config: dict[str, Any]) -> int:
    text_config = config.get("text_config", config)
    for key in ("max_position_embeddings", "max_seq_len", "seq_length", "n_ctx"):
        if isinstance(text_config.get(key), int):
            return text_config[key]
    return FALLBACK_CONTEXT_LENGTH


def load_model(path: str, served_name: str | None = None,
               max_model_len: int | None = None) -> LoadedModel:
    model, tokenizer, config = load(path, return_config=True)
    context = context_length_of(config)
    if max_model_len:
        context = min(context, max_model_len)
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=served_name or Path(path.rstrip("/")).name,
        path=path,
        context_length=context,
        vocab_size=int(vocab or len(tokenizer)),
    )
