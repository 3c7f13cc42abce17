"""Where each base model's weights, config and tokenizer come from; loaded on first use.

Weights are memory-mapped from safetensors (`safetensors.torch.load_file` maps the file and
hands out tensors over the mapping), so a float32 file served as float32, or a bfloat16 file
served as bfloat16, costs no copy: the pages are the file's. Only a dtype change (a bfloat16
checkpoint served as float32, or the reverse) makes one converted copy, tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from .._engine_api import EngineUserError, ModelDirectoryError, ModelInfo
from ..model_files import SMOLLM2_NAME, TINY_NAME, smollm2_files
from ._llama import LM_HEAD, TINY_CONFIG, Llama, LlamaConfig, tiny_weights
from ._model_dir import (
    CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    check_config,
    check_tokenizer,
    check_weights,
    generation_eos_ids,
    read_config,
    read_weight_entries,
)

WeightDtype = Literal["float32", "bfloat16"]
WEIGHT_DTYPES: Final[tuple[WeightDtype, ...]] = ("float32", "bfloat16")
_TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    name: str
    model: Llama
    tokenizer: Tokenizer


class ModelSource:
    """One base model by name: its ModelInfo without loading, and the model when needed.

    A `directory` is a Hugging Face layout (`config.json`, `model.safetensors` or shards with
    `model.safetensors.index.json`, `tokenizer.json`, Q/K rows in rotate-half order) of a
    supported family. It is checked when the source is made (config fields, tensor names,
    shapes and dtypes from the safetensors headers, the tokenizer), so a model the engine would
    compute wrongly is refused at start-up (`_model_dir`). `dtype` is how the weights are kept
    in memory; computation is float32 either way (`_llama`).
    """

    def __init__(
        self, name: str, directory: Path | None = None, *, dtype: WeightDtype = "float32"
    ) -> None:
        if directory is None and name not in (SMOLLM2_NAME, TINY_NAME):
            raise ValueError(f"unknown built-in model {name!r}; pass a directory for it")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
        self.name = name
        self.directory = directory
        self.dtype: WeightDtype = dtype
        self._config: LlamaConfig | None = None
        self._weight_files: list[Path] = []
        self._loaded: LoadedModel | None = None
        if directory is not None:
            self._config, self._weight_files = _checked_directory(directory)

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

    def weight_bytes(self) -> int:
        """Bytes the weights take in memory at `dtype` (from the config; nothing is read)."""
        itemsize = _TORCH_DTYPES[self.dtype].itemsize
        total = 0
        for shape in self.config().weight_shapes().values():
            count = 1
            for size in shape:
                count *= size
            total += count * itemsize
        return total

    def info(self) -> ModelInfo:
        config = self.config()
        # The tiny model reuses SmolLM2's tokenizer, so clients fetch that one.
        tokenizer_id = self.name if self.directory is not None else SMOLLM2_NAME
        return ModelInfo(
            name=self.name,
            arch=config.model_type,
            max_context_length=config.max_context,
            vocab_size=config.vocab_size,
            tokenizer_id=tokenizer_id,
        )

    def load(self) -> LoadedModel:
        if self._loaded is None:
            config = self.config()
            weights: dict[str, torch.Tensor] = {}
            if self.directory is not None:
                for path in self._weight_files:
                    weights.update(load_file(str(path)))
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
            target = _TORCH_DTYPES[self.dtype]
            # `.to` returns the tensor itself when the dtype already matches: no copy.
            weights = {k: v.to(target) for k, v in weights.items()}
            for tensor in weights.values():
                tensor.requires_grad_(False)
            self._loaded = LoadedModel(
                self.name, Llama(config, weights), Tokenizer.from_file(str(tokenizer_path))
            )
        return self._loaded


def _checked_directory(directory: Path) -> tuple[LlamaConfig, list[Path]]:
    """The config and weight files of a model directory, after every check of `_model_dir`."""
    raw = read_config(directory)
    try:
        config = LlamaConfig.from_hf(raw)
    except ValueError as exc:
        raise ModelDirectoryError(f"{directory / CONFIG_FILE}: {exc}") from None
    named, entries = read_weight_entries(directory)
    check_weights(
        named,
        entries,
        config.weight_shapes(),
        ignorable=frozenset({f"{LM_HEAD}.weight"}) if config.tie_word_embeddings else frozenset(),
    )
    tokenizer_path = check_tokenizer(directory)
    eos = tuple(dict.fromkeys(config.eos_token_ids + generation_eos_ids(directory)))
    if not eos:
        eos = _tokenizer_config_eos(directory, tokenizer_path)
    files = sorted({entry.file for entry in entries.values()})
    return dataclasses.replace(config, eos_token_ids=eos), files


def _tokenizer_config_eos(directory: Path, tokenizer_path: Path) -> tuple[int, ...]:
    """The id of `tokenizer_config.json`'s eos_token, for configs whose eos_token_id is null."""
    from ...tokenizer import Tokenizer as SdkTokenizer

    tokenizer = SdkTokenizer.from_file(tokenizer_path)
    if (directory / TOKENIZER_CONFIG_FILE).is_file() and tokenizer.eos_token_id is not None:
        return (tokenizer.eos_token_id,)
    return ()


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
