"""Where each base model's weights, config and tokenizer come from; loaded on first use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from .._engine_api import EngineUserError, ModelInfo
from ..model_files import SMOLLM2_NAME, TINY_NAME, smollm2_files
from ._llama import TINY_CONFIG, Llama, LlamaConfig, tiny_weights


@dataclass
class LoadedModel:
    name: str
    model: Llama
    tokenizer: Tokenizer


class ModelSource:
    """One base model by name: its ModelInfo without loading, and the model when needed.

    `extra` directories are Hugging Face Llama layouts: `config.json`, `model.safetensors`,
    `tokenizer.json` (Q/K rows in HF rotate-half order).
    """

    def __init__(self, name: str, directory: Path | None = None) -> None:
        if directory is None and name not in (SMOLLM2_NAME, TINY_NAME):
            raise ValueError(f"unknown built-in model {name!r}; pass a directory for it")
        self.name = name
        self.directory = directory
        self._config: LlamaConfig | None = None
        self._loaded: LoadedModel | None = None

    def config(self) -> LlamaConfig:
        if self._config is None:
            if self.name == TINY_NAME and self.directory is None:
                self._config = TINY_CONFIG
            else:
                self._config = LlamaConfig.from_hf(json.loads(self._config_path().read_text()))
        return self._config

    def info(self) -> ModelInfo:
        config = self.config()
        # The tiny model reuses SmolLM2's tokenizer, so clients fetch that one.
        tokenizer_id = self.name if self.directory is not None else SMOLLM2_NAME
        return ModelInfo(
            name=self.name,
            arch="llama",
            max_context_length=config.max_context,
            vocab_size=config.vocab_size,
            tokenizer_id=tokenizer_id,
        )

    def load(self) -> LoadedModel:
        if self._loaded is None:
            config = self.config()
            if self.directory is not None:
                weights = load_file(str(self.directory / "model.safetensors"))
                tokenizer_path = self.directory / "tokenizer.json"
            elif self.name == TINY_NAME:
                weights = tiny_weights()
                tokenizer_path = smollm2_files(weights=False).tokenizer_path
            else:
                files = smollm2_files()
                weights = load_file(str(files.weights_path))
                tokenizer_path = files.tokenizer_path
            weights = {k: v.float() for k, v in weights.items()}
            for tensor in weights.values():
                tensor.requires_grad_(False)
            self._loaded = LoadedModel(
                self.name, Llama(config, weights), Tokenizer.from_file(str(tokenizer_path))
            )
        return self._loaded

    def _config_path(self) -> Path:
        if self.directory is not None:
            return self.directory / "config.json"
        return smollm2_files(weights=False).config_path


def check_tokens(tokens: torch.Tensor, config: LlamaConfig, what: str) -> None:
    """Raise EngineUserError if `tokens` is empty, too long, or has ids outside the vocabulary."""
    if tokens.numel() == 0:
        raise EngineUserError(f"{what} is empty; it needs at least one token")
    if tokens.numel() > config.max_context:
        raise EngineUserError(
            f"{what} has {tokens.numel()} tokens, more than the model's context length "
            f"{config.max_context}"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise EngineUserError(
            f"{what} has token id {bad} outside the vocabulary [0, {config.vocab_size})"
        )
