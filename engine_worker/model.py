"""Loading a model (text through mlx-lm, vision-language through mlx-vlm), and
the facts about it the engine serves.

The gRPC front end needs only the tokenizer and the facts; the weights are
loaded by the engine core alone.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model as load_weights
from mlx_lm.utils import load_tokenizer as _load_tokenizer

from engine_worker.vision import is_vision_config, load_vision_model
from vllm_mlx.vision_families import FAMILIES

# Used when a config names no context length at all.
FALLBACK_CONTEXT_LENGTH = 4096


@dataclass
class ModelFacts:
    name: str
    path: str
    context_length: int
    vocab_size: int
    eos_config: Any  # config.json's eos_token_id (int, list or None)
    vision: bool = False  # a vision-language model, loaded through mlx-vlm
    model_type: str = ""

    @property
    def modalities(self) -> list[str]:
        if not self.vision:
            return ["text"]
        family = FAMILIES.get(self.model_type)
        return ["text", "image"] if family and family.video_token is None else [
            "text", "image", "video"]


def context_length_of(config: dict[str, Any]) -> int:
    text_config = config.get("text_config", config)
    for key in ("max_position_embeddings", "max_seq_len", "seq_length", "n_ctx"):
        if isinstance(text_config.get(key), int):
            return text_config[key]
    return FALLBACK_CONTEXT_LENGTH


def read_facts(path: str, served_name: str | None = None,
               max_model_len: int | None = None, mllm: bool = False) -> ModelFacts:
    """`mllm` forces loading through mlx-vlm; otherwise a config with a
    vision_config of a model type mlx-vlm knows is a vision model."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    config = json.loads(config_path.read_text())
    context = context_length_of(config)
    if max_model_len:
        context = min(context, max_model_len)
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return ModelFacts(name=served_name or Path(path.rstrip("/")).name, path=path,
                      context_length=context, vocab_size=int(vocab),
                      eos_config=config.get("eos_token_id"),
                      vision=mllm or is_vision_config(config),
                      model_type=str(config.get("model_type", "")))


def load_tokenizer(facts: ModelFacts) -> TokenizerWrapper:
    return _load_tokenizer(Path(facts.path), eos_token_ids=facts.eos_config)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    facts: ModelFacts


def load_model(facts: ModelFacts) -> LoadedModel:
    if facts.vision:
        model, _ = load_vision_model(facts.path)
        return LoadedModel(model, load_tokenizer(facts), facts)
    model, _ = load_weights(Path(facts.path))
    return LoadedModel(model, load_tokenizer(facts), facts)
