"""Refusals specific to the Qwen families and to sharded or non-float weights.

(The Llama-config refusals are in test_model_dir_refusals.py; what is accepted is checked
against transformers in test_parity_transformers.py.) Each refusal is one line naming the
file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hf_dirs import family_config, family_tensors, write_model_dir
from safetensors.numpy import save_file

from tinkex_trio.local._engine_api import ModelDirectoryError
from tinkex_trio.local.engine import TorchEngine


def _refusal(directory: Path) -> str:
    with pytest.raises(ModelDirectoryError) as info:
        TorchEngine(models=[], extra_models={"user/m": directory}, threads=1)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("model_type", "changes", "named"),
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("qwen2", {"attention_bias": True}, "unknown config field(s) ['attention_bias']"),
        ("qwen2", {"use_mrope": False}, "unknown config field(s) ['use_mrope']"),
        ("qwen3", {"attention_bias": True}, "attention_bias = True"),
        ("qwen3", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ("qwen3", {"mlp_bias": False}, "unknown config field(s) ['mlp_bias']"),
        ("qwen3", {"architectures": ["Qwen2ForCausalLM"]}, "['Qwen3ForCausalLM']"),
        (
            "qwen3",
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "RoPE type 'yarn'",
        ),
    ],
)
def test_qwen_config_fields_the_engine_does_not_implement(
    tmp_path: Path, model_type: str, changes: dict[str, Any], named: str
) -> None:
    config = family_config(model_type, tied=True) | changes
    base = family_config(model_type, tied=True)
    directory = write_model_dir(tmp_path / "m", config, family_tensors(base))
    message = _refusal(directory)
    assert named in message and str(directory / "config.json") in message


def test_qwen2_without_its_biases_is_refused(tmp_path: Path) -> None:
    config = family_config("qwen2", tied=True)
    tensors = family_tensors(config)
    del tensors["model.layers.1.self_attn.v_proj.bias"]
    message = _refusal(write_model_dir(tmp_path / "m", config, tensors))
    assert "lacks tensor(s) ['model.layers.1.self_attn.v_proj.bias']" in message


def test_qwen3_norm_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    config = family_config("qwen3", tied=True)
    tensors = family_tensors(config)
    tensors["model.layers.0.self_attn.k_norm.weight"] = np.ones(8, np.float32)
    message = _refusal(write_model_dir(tmp_path / "m", config, tensors))
    assert "k_norm.weight has shape [8] but config.json implies [16]" in message


def test_quantized_weights_are_refused(tmp_path: Path) -> None:
    config = family_config("llama", tied=True)
    tensors = family_tensors(config)
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.int8)
    message = _refusal(write_model_dir(tmp_path / "m", config, tensors))
    assert "dtype I8" in message and "model.safetensors" in message


def _sharded(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A directory whose weights are two shards and an index, like a large published model."""
    config = family_config("qwen3", tied=False)
    tensors = family_tensors(config)
    directory = write_model_dir(tmp_path / "m", config, tensors)
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map: dict[str, str] = {}
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        save_file({name: tensors[name] for name in part}, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    _write_index(directory, weight_map)
    return directory, weight_map


def _write_index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def test_sharded_weights_are_served(tmp_path: Path) -> None:
    directory, _ = _sharded(tmp_path)
    engine = TorchEngine(models=[], extra_models={"user/m": directory}, threads=1)
    assert engine._model("user/m").model.config.qk_norm


def test_sharded_weights_that_do_not_match_their_index_are_refused(tmp_path: Path) -> None:
    directory, weight_map = _sharded(tmp_path)
    name = next(iter(weight_map))
    _write_index(
        directory,
        {
            **weight_map,
            name: "b.safetensors" if weight_map[name] == "a.safetensors" else "a.safetensors",
        },
    )
    message = _refusal(directory)
    assert f"says tensor {name} is in" in message and "model.safetensors.index.json" in message
    _write_index(directory, {**weight_map, "extra.weight": "c.safetensors"})
    message = _refusal(directory)
    assert str(directory / "c.safetensors") in message and "missing" in message
