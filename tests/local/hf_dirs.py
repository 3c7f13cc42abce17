"""Tiny Hugging Face model directories written by the tests themselves (no download).

`write_model_dir` saves a config.json, a model.safetensors and SmolLM2's tokenizer.json, the
layout `save_pretrained` produces. Weights come from the tiny random model's generator, so a
plain Llama directory computes exactly what the built-in tiny model computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from tinkex_trio.local.engine._llama import TINY_CONFIG, tiny_weights
from tinkex_trio.local.model_files import smollm2_files

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": TINY_CONFIG.vocab_size,
    "hidden_size": TINY_CONFIG.hidden_size,
    "intermediate_size": TINY_CONFIG.intermediate_size,
    "num_hidden_layers": TINY_CONFIG.num_layers,
    "num_attention_heads": TINY_CONFIG.num_heads,
    "num_key_value_heads": TINY_CONFIG.num_kv_heads,
    "head_dim": TINY_CONFIG.head_dim,
    "rope_theta": TINY_CONFIG.rope_theta,
    "rms_norm_eps": TINY_CONFIG.rms_norm_eps,
    "max_position_embeddings": TINY_CONFIG.max_context,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": None,
    "torch_dtype": "float32",
    "transformers_version": "4.57.0",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_llama_tensors() -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in tiny_weights().items()}


def write_model_dir(
    directory: Path,
    config: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    tokenizer: bool = True,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or TINY_LLAMA_CONFIG, indent=2))
    save_file(
        tensors if tensors is not None else tiny_llama_tensors(),
        str(directory / "model.safetensors"),
    )
    if tokenizer:
        shutil.copy(smollm2_files(weights=False).tokenizer_path, directory / "tokenizer.json")
    return directory
