"""Tiny Hugging Face model directories written by the tests themselves (no download).

`write_model_dir` saves a config.json, a model.safetensors and SmolLM2's tokenizer.json and
tokenizer_config.json (chat template, special tokens), the layout `save_pretrained` produces. Weights come from the tiny random model's generator, so a
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
        files = smollm2_files(weights=False)
        shutil.copy(files.tokenizer_path, directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<|im_start|>",
                    "eos_token": "<|im_end|>",
                    "pad_token": "<|im_end|>",
                    "unk_token": "<|endoftext|>",
                    "chat_template": files.chat_template,
                }
            )
        )
    return directory


# --- the supported families, written without transformers (transformers 4 config layout) ---

FAMILY_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that with head_dim 16 some frequencies are scaled, some blended, some kept.
    "original_max_position_embeddings": 64,
}


def family_config(model_type: str, *, tied: bool, llama3_rope: bool = False) -> dict[str, Any]:
    """A tiny config.json as the Hub's released models of `model_type` spell it."""
    config: dict[str, Any] = {
        "architectures": [FAMILY_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": TINY_CONFIG.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 500000.0 if llama3_rope else 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if model_type == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
        config["rope_scaling"] = dict(LLAMA3_ROPE_SCALING) if llama3_rope else None
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 2}
        config["rope_scaling"] = None
    if model_type == "qwen3":
        config["attention_bias"] = False
    return config


def family_tensors(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for every tensor the config implies: matrices N(0, 0.1), norms around 1,
    biases N(0, 0.1), so a misplaced norm or a dropped bias changes the logits."""
    from tinkex_trio.local.engine._llama import LM_HEAD, LlamaConfig

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    shapes = LlamaConfig.from_hf(config).weight_shapes()
    if not config["tie_word_embeddings"]:
        assert f"{LM_HEAD}.weight" in shapes
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            array = rng.uniform(0.5, 1.5, shape)
        else:
            array = rng.normal(0.0, 0.1, shape)
        out[name] = array.astype(np.float32)
    return out


def write_family_dir(
    directory: Path, model_type: str, *, tied: bool, llama3_rope: bool = False, seed: int = 0
) -> Path:
    config = family_config(model_type, tied=tied, llama3_rope=llama3_rope)
    return write_model_dir(directory, config, family_tensors(config, seed))
