"""Where each base model's weights, config and tokenizer come from; loaded on first use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from .._engine_api import EngineUserError, ModelDirectoryError, ModelInfo
from ..model_files import SMOLLM2_NAME, TINY_NAME, smollm2_files
from ._llama import LM_HEAD, TINY_CONFIG, Llama, LlamaConfig, tiny_weights
from ._model_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_config,
    check_tokenizer,
    check_weights,
    read_config,
    read_safetensors_header,
)


@dataclass
class LoadedModel:
    name: str
    model: Llama
    tokenizer: Tokenizer


class ModelSource:
    """One base model by name: its ModelInfo without loading, and the model when needed.

    A `directory` is a Hugging Face Llama layout (`config.json`, `model.safetensors`,
    `tokenizer.json`, Q/K rows in rotate-half order). It is checked when the source is made
    (config fields, tensor names and shapes from the safetensors header, the tokenizer), so
    a model the engine would compute wrongly is refused at start-up (`_model_dir`).
    """

    def __init__(self, name: str, directory: Path | None = None) -> None:
        if directory is None and name not in (SMOLLM2_NAME, TINY_NAME):
            raise ValueError(f"unknown built-in model {name!r}; pass a directory for it")
        self.name = name
        self.directory = directory
        self._config: LlamaConfig | None = None
        self._loaded: LoadedModel | None = None
        if directory is not None:
            self._config = _checked_directory(directory)

    def config(self) -> LlamaConfig:
        if self._config is None:
            if self.name == TINY_NAME and self.directory is None:
                self._config = TINY_CONFIG
            else:
                path = smollm2_files(weights=False).config_path
                raw = json.loads(path.read_text())
                check_config(raw, path)
                self._config = LlamaConfig.from_hf(raw)
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
                weights = load_file(str(self.directory / WEIGHTS_FILE))
                tokenizer_path = self.directory / TOKENIZER_FILE
            elif self.name == TINY_NAME:
                weights = tiny_weights()
                tokenizer_path = smollm2_files(weights=False).tokenizer_path
            else:
                files = smollm2_files()
                weights = load_file(str(files.weights_path))
                tokenizer_path = files.tokenizer_path
            if config.tie_word_embeddings:
                weights.pop(f"{LM_HEAD}.weight", None)  # transformers ties over it too
            weights = {k: v.float() for k, v in weights.items()}
            for tensor in weights.values():
                tensor.requires_grad_(False)
            self._loaded = LoadedModel(
                self.name, Llama(config, weights), Tokenizer.from_file(str(tokenizer_path))
            )
        return self._loaded


def _checked_directory(directory: Path) -> LlamaConfig:
    """The config of a model directory, after every check of `_model_dir` passed."""
    raw = read_config(directory)
    try:
        config = LlamaConfig.from_hf(raw)
    except ValueError as exc:
        raise ModelDirectoryError(f"{directory / CONFIG_FILE}: {exc}") from None
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelDirectoryError(
            f"{weights_path}: missing; the local engine reads the weights from one "
            "model.safetensors file (save with `save_pretrained(dir, safe_serialization=True)`)"
        )
    check_weights(
        weights_path,
        read_safetensors_header(weights_path),
        config.weight_shapes(),
        ignorable=frozenset({f"{LM_HEAD}.weight"}) if config.tie_word_embeddings else frozenset(),
    )
    check_tokenizer(directory)
    return config


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
