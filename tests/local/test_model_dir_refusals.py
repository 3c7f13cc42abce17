"""A model directory the engine would compute wrongly is refused at start-up, never served.

Each case writes a tiny Hugging Face directory that differs from a plain Llama in one way the
engine does not implement (another architecture, biases or q/k norms under a Llama config,
another RoPE type, unknown fields, missing or mismatched files) and checks the refusal names the file and the field.
A plain Llama directory is accepted and computes exactly what the built-in tiny model does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_dirs import TINY_LLAMA_CONFIG, tiny_llama_tensors, write_model_dir

from tinkex_trio.local._engine_api import ModelDirectoryError
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.engine._llama import TINY_CONFIG, Llama, tiny_weights

H = TINY_CONFIG.hidden_size
KV = TINY_CONFIG.num_kv_heads * TINY_CONFIG.head_dim
Q = TINY_CONFIG.num_heads * TINY_CONFIG.head_dim


def _config(**changes: Any) -> dict[str, Any]:
    config = dict(TINY_LLAMA_CONFIG)
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


_DROP = object()


def _with_tensors(**extra: np.ndarray) -> dict[str, np.ndarray]:
    tensors = tiny_llama_tensors()
    tensors.update({k.replace("__", "."): v for k, v in extra.items()})
    return tensors


def _refusal(
    tmp_path: Path,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray] | None = None,
    **kwargs: Any,
) -> str:
    directory = write_model_dir(tmp_path / "model", config, tensors, **kwargs)
    with pytest.raises(ModelDirectoryError) as info:
        TorchEngine(models=[], extra_models={"user/model": directory}, threads=1)
    message = str(info.value)
    assert "\n" not in message
    assert str(directory) in message
    return message


def test_plain_llama_directory_is_served_like_the_builtin_model(tmp_path: Path) -> None:
    directory = write_model_dir(tmp_path / "llama")
    engine = TorchEngine(models=[], extra_models={"user/llama": directory}, threads=1)
    [info] = engine.models()
    assert (info.name, info.arch, info.vocab_size) == ("user/llama", "llama", 49152)
    loaded = engine._model("user/llama")
    tokens = torch.tensor([[1, 4093, 198, 1780, 314, 216, 34]])
    with torch.inference_mode():
        served = loaded.model.logits(loaded.model.hidden_states(tokens))
        builtin = Llama(TINY_CONFIG, tiny_weights())
        expected = builtin.logits(builtin.hidden_states(tokens))
    assert torch.equal(served, expected)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "model_type 'gemma2'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"architectures": ["Qwen3ForCausalLM"]}, "architectures"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "RoPE type 'yarn' is not implemented",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "RoPE type 'dynamic'",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "attention_factor": 2.0,
                }
            },
            "RoPE field(s) ['attention_factor']",
        ),
        ({"rope_scaling": "llama3"}, "rope_scaling must be an object"),
        ({"layer_types": ["full_attention", "full_attention"]}, "unknown config field"),
        ({"attention_bias": True}, "attention_bias = True"),
        ({"mlp_bias": True}, "mlp_bias = True"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"attention_dropout": 0.1}, "attention_dropout = 0.1"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"rope_interleaved": True}, "rope_interleaved"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": "64"}, "hidden_size"),
    ],
)
def test_config_fields_the_engine_does_not_implement_are_refused(
    tmp_path: Path, changes: dict[str, Any], named: str
) -> None:
    message = _refusal(tmp_path, _config(**changes))
    assert named in message
    assert "config.json" in message


def test_qwen2_biases_in_the_weights_are_refused_even_under_a_llama_config(tmp_path: Path) -> None:
    tensors = _with_tensors(
        model__layers__0__self_attn__q_proj__bias=np.zeros(Q, np.float32),
        model__layers__0__self_attn__k_proj__bias=np.zeros(KV, np.float32),
    )
    message = _refusal(tmp_path, _config(), tensors)
    assert "model.safetensors" in message
    assert "model.layers.0.self_attn.k_proj.bias" in message


def test_qwen3_qk_norms_in_the_weights_are_refused(tmp_path: Path) -> None:
    tensors = _with_tensors(model__layers__1__self_attn__q_norm__weight=np.ones(16, np.float32))
    assert "q_norm" in _refusal(tmp_path, _config(), tensors)


def test_missing_and_mismatched_tensors_are_refused(tmp_path: Path) -> None:
    tensors = tiny_llama_tensors()
    del tensors["model.layers.1.mlp.down_proj.weight"]
    assert "model.layers.1.mlp.down_proj.weight" in _refusal(tmp_path / "a", _config(), tensors)
    tensors = tiny_llama_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((7, H), np.float32)
    message = _refusal(tmp_path / "b", _config(), tensors)
    assert "model.layers.0.mlp.up_proj.weight has shape [7, 64]" in message


def test_untied_model_needs_its_lm_head(tmp_path: Path) -> None:
    message = _refusal(tmp_path, _config(tie_word_embeddings=False))
    assert "lm_head.weight" in message


def test_untied_model_uses_its_own_lm_head(tmp_path: Path) -> None:
    tensors = tiny_llama_tensors()
    head = np.random.default_rng(0).normal(0, 0.02, (49152, H)).astype(np.float32)
    tensors["lm_head.weight"] = head
    directory = write_model_dir(tmp_path / "m", _config(tie_word_embeddings=False), tensors)
    engine = TorchEngine(models=[], extra_models={"user/untied": directory}, threads=1)
    model = engine._model("user/untied").model
    assert torch.equal(model.lm_head, torch.from_numpy(head))


def test_missing_tokenizer_and_weights_are_refused(tmp_path: Path) -> None:
    assert "tokenizer.json" in _refusal(tmp_path / "a", _config(), tokenizer=False)
    directory = write_model_dir(tmp_path / "b")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelDirectoryError, match=r"model\.safetensors: missing"):
        TorchEngine(models=[], extra_models={"user/b": directory}, threads=1)


def test_serve_refuses_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    directory = write_model_dir(
        tmp_path / "mistral", _config(model_type="mistral", architectures=["MistralForCausalLM"])
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinkex_trio.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--model",
            f"user/mistral={directory}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(directory / "config.json") in lines[0]
    assert "model_type 'mistral' is not supported" in lines[0]
    assert "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in lines[0]
    assert "listening" not in result.stdout
