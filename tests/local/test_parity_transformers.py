"""The engine computes what transformers computes, for every supported architecture.

Each case makes a tiny random model of one family with transformers itself (a fixed seed, a few
layers, SmolLM2's tokenizer and vocabulary), saves it with `save_pretrained` (transformers 5
layout: `rope_parameters`, `layer_types`), loads the directory through our engine and checks:

- logits on a batch of real token ids: max abs difference <= 1e-4 (float32);
- the sampler (KV cache, batched decoding): prompt and sampled-token log-probs equal
  transformers' log-softmax of the same sequence;
- LoRA: with the same A/B values on the same modules (lm_head included) as a `peft` model, the
  A/B gradients of one cross-entropy step agree within 1e-4;
- `dtype=bfloat16`: equal to transformers on the bf16-rounded weights computed in float32.

Random norms and biases are drawn on top of transformers' initialisation (which sets norms to
1 and biases to 0), so a misplaced q/k norm or a dropped bias would show. Directories written
by our own test helper (transformers 4 layout: `rope_theta` + `rope_scaling`) are loaded by
transformers too, so both layouts are read the same way by both.

Needs the `parity` extra (transformers, peft; installed by scripts/setup.sh).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import peft
import transformers
from hf_dirs import LLAMA3_ROPE_SCALING, write_family_dir

from tinkex_trio.local._engine_api import DatumArrays, LoraSpec, SampleRequest
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import smollm2_files

TOLERANCE = 1e-4
TOKENS = [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 19556, 28, 905, 17, 504, 713]
RANK = 4
ALPHA = 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]

# name -> (model_type, tied, llama3 rope)
CASES: dict[str, tuple[str, bool, bool]] = {
    "llama-tied": ("llama", True, False),
    "llama3-rope-untied": ("llama", False, True),
    "qwen2-tied": ("qwen2", True, False),
    "qwen2-untied": ("qwen2", False, False),
    "qwen3-tied": ("qwen3", True, False),
    "qwen3-untied": ("qwen3", False, False),
}


def _hf_config(model_type: str, tied: bool, llama3: bool) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    if model_type == "llama":
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
        if llama3:
            rope = {**LLAMA3_ROPE_SCALING, "rope_theta": 500000.0}
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters={"rope_theta": 1e6})
    return transformers.Qwen3Config(**common, rope_parameters={"rope_theta": 1e6})


def _randomize(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _save(model: Any, directory: Path, **kwargs: Any) -> Path:
    model.save_pretrained(directory, **kwargs)
    shutil.copy(smollm2_files(weights=False).tokenizer_path, directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """Every case: (the transformers model, its saved directory)."""
    root = tmp_path_factory.mktemp("parity")
    out: dict[str, tuple[Any, Path]] = {}
    for index, (name, (model_type, tied, llama3)) in enumerate(CASES.items()):
        torch.manual_seed(index)
        model = transformers.AutoModelForCausalLM.from_config(
            _hf_config(model_type, tied, llama3), dtype=torch.float32
        )
        _randomize(model, index)
        model.eval()
        # One case as shards with an index, the way large models are published.
        kwargs = {"max_shard_size": "4MB"} if name == "qwen3-untied" else {}
        out[name] = (model, _save(model, root / name, **kwargs))
    return out


def _engine(directory: Path, **kwargs: Any) -> TorchEngine:
    return TorchEngine(models=[], extra_models={"user/model": directory}, threads=1, **kwargs)


def _ours_logits(engine: TorchEngine, tokens: torch.Tensor) -> torch.Tensor:
    model = engine._model("user/model").model
    with torch.inference_mode():
        return model.logits(model.hidden_states(tokens))


def _hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=tokens).logits.float()


def _batch() -> torch.Tensor:
    return torch.tensor([TOKENS, TOKENS[::-1]])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, models: dict[str, tuple[Any, Path]]) -> None:
    model, directory = models[case]
    if case == "qwen3-untied":
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    engine = _engine(directory)
    [info] = engine.models()
    assert info.arch == CASES[case][0]
    ours = _ours_logits(engine, _batch())
    theirs = _hf_logits(model, _batch())
    assert theirs.abs().max() > 1.0  # the model is not degenerate: logits vary
    diff = float((ours - theirs).abs().max())
    print(f"{case}: max abs logit difference {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("case", ["llama3-rope-untied", "qwen2-untied", "qwen3-tied"])
def test_sampler_logprobs_match_transformers(
    case: str, models: dict[str, tuple[Any, Path]]
) -> None:
    model, directory = models[case]
    engine = _engine(directory)
    prompt = TOKENS[:9]
    [result] = engine.sample(
        [
            SampleRequest(
                base_model="user/model",
                adapter_dir=None,
                prompt=prompt,
                num_samples=2,
                max_tokens=6,
                seed=7,
                stop=[],
                prompt_logprobs=True,
            )
        ]
    )
    assert not isinstance(result, Exception)
    prompt_logprobs = result.prompt_logprobs
    assert prompt_logprobs is not None and len(result.sequences) == 2
    for sequence in result.sequences:
        full = torch.tensor([prompt + sequence.tokens])
        logp = torch.log_softmax(_hf_logits(model, full)[0, :-1], dim=-1)
        expected = logp.gather(1, full[0, 1:].unsqueeze(1)).squeeze(1)
        got = torch.tensor(prompt_logprobs[1:] + sequence.logprobs)
        assert float((got - expected).abs().max()) <= TOLERANCE


def _peft_model(model: Any) -> Any:
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none"
    )
    return peft.get_peft_model(model, config)


def _peft_key(key: str) -> str:
    """Our PEFT file key -> the parameter name inside a live peft model (adapter "default")."""
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight"
    )


@pytest.mark.parametrize("case", ["llama3-rope-untied", "qwen2-tied", "qwen3-untied"])
def test_lora_gradients_match_peft(
    case: str, models: dict[str, tuple[Any, Path]], tmp_path: Path
) -> None:
    _, directory = models[case]
    # A fresh copy: get_peft_model modifies the model it wraps.
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf.eval()
    peft_model = _peft_model(hf)
    engine = _engine(directory)
    engine.create_adapter("a", "user/model", LoraSpec(rank=RANK, alpha=ALPHA, seed=3))
    lora = engine._adapters["a"].lora
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, b in lora.pairs.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)  # B != 0: A gets gradients too
    ours = dict(lora.named_parameters())
    theirs = dict(peft_model.named_parameters())
    assert len(ours) == 2 * (7 * 2 + 1)
    with torch.no_grad():
        for key, tensor in ours.items():
            theirs[_peft_key(key)].copy_(tensor)

    tokens = np.array(TOKENS[:-1], dtype=np.int64)
    targets = np.array(TOKENS[1:], dtype=np.int64)
    weights = np.linspace(0.2, 1.0, len(tokens)).astype(np.float32)
    datum = DatumArrays(tokens, {"target_tokens": targets, "weights": weights})
    result = engine.forward_backward("a", [datum], "cross_entropy", {}, forward_only=False)

    logits = peft_model(input_ids=torch.from_numpy(tokens).unsqueeze(0)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.from_numpy(targets)[:, None])
    loss = -(logp.squeeze(1) * torch.from_numpy(weights)).sum()
    loss.backward()
    assert math.isclose(result.metrics["loss:sum"], loss.item(), rel_tol=1e-5)
    worst = 0.0
    for key, tensor in ours.items():
        grad, reference = tensor.grad, theirs[_peft_key(key)].grad
        assert grad is not None and reference is not None, key
        assert float(reference.abs().max()) > 0, key
        worst = max(worst, float((grad - reference).abs().max()))
    print(f"{case}: max abs LoRA gradient difference {worst:.2e}")
    assert worst <= TOLERANCE


@pytest.mark.parametrize("case", ["llama-tied", "qwen3-untied"])
def test_bfloat16_weights_compute_in_float32(
    case: str, models: dict[str, tuple[Any, Path]]
) -> None:
    model, directory = models[case]
    engine = _engine(directory, dtype="bfloat16")
    loaded = engine._model("user/model").model
    assert loaded.embed.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for w in loaded.weights.values())
    rounded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.bfloat16().float())
    rounded.eval()
    ours = _ours_logits(engine, _batch())
    assert ours.dtype == torch.float32
    diff = float((ours - _hf_logits(rounded, _batch())).abs().max())
    print(f"{case} bfloat16: max abs logit difference {diff:.2e}")
    assert diff <= TOLERANCE
    # ... and it is not the float32 model: the rounding is real.
    assert float((ours - _hf_logits(model, _batch())).abs().max()) > TOLERANCE


@pytest.mark.parametrize(
    ("model_type", "tied", "llama3"),
    [("llama", False, True), ("qwen2", True, False), ("qwen3", False, False)],
)
def test_transformers4_layout_written_by_hand_loads_the_same(
    tmp_path: Path, model_type: str, tied: bool, llama3: bool
) -> None:
    directory = write_family_dir(tmp_path / "m", model_type, tied=tied, llama3_rope=llama3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf.eval()
    diff = float(
        (_ours_logits(_engine(directory), _batch()) - _hf_logits(hf, _batch())).abs().max()
    )
    assert diff <= TOLERANCE
