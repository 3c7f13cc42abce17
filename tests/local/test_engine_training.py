"""Training on the tiny model: learning, checkpoint resume, micro-batching, validation."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_testdata import next_token_data
from safetensors.torch import load_file

from tinkex_trio.local._engine_api import AdamStep, DatumArrays, EngineUserError, LoraSpec
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.engine._training import pack_microbatches
from tinkex_trio.local.model_files import SMOLLM2_NAME, TINY_NAME

ADAM = AdamStep(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=5.0)


def _train(engine: TorchEngine, adapter: str, data: list[DatumArrays], steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        result = engine.forward_backward(adapter, data, "cross_entropy", {}, False)
        engine.optim_step(adapter, ADAM)
        losses.append(result.metrics["loss:sum"])
    return losses


def test_loss_falls_on_a_fixed_batch(tiny_engine: TorchEngine) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=8, seed=0))
    losses = _train(tiny_engine, "a", next_token_data(0, [16, 16, 12, 8]), 20)
    assert losses[-1] < 0.6 * losses[0]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses[:6]))


def test_resume_from_checkpoint_matches_uninterrupted_training(
    tiny_engine: TorchEngine, tmp_path: Path
) -> None:
    data = next_token_data(1, [10, 7])
    tiny_engine.create_adapter("straight", TINY_NAME, LoraSpec(rank=4, seed=5))
    straight = _train(tiny_engine, "straight", data, 6)

    tiny_engine.create_adapter("resumed", TINY_NAME, LoraSpec(rank=4, seed=5))
    first = _train(tiny_engine, "resumed", data, 3)
    written = tiny_engine.save_state("resumed", tmp_path, with_optimizer=True)
    assert written > 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "checkpoint_complete",
    }
    tiny_engine.drop_adapter("resumed")
    # A different engine instance, as after a server restart.
    other = TorchEngine(models=[TINY_NAME], threads=1)
    spec = other.load_state("resumed", TINY_NAME, tmp_path, with_optimizer=True)
    assert (spec.rank, spec.alpha, spec.train_unembed) == (4, 32.0, True)
    rest = _train(other, "resumed", data, 3)
    assert first + rest == straight  # bit-identical


def test_load_without_optimizer_restarts_adam(tiny_engine: TorchEngine, tmp_path: Path) -> None:
    data = next_token_data(1, [10])
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=4, seed=5))
    _train(tiny_engine, "a", data, 3)
    tiny_engine.save_state("a", tmp_path, with_optimizer=True)
    continued = _train(tiny_engine, "a", data, 1)
    tiny_engine.load_state("b", TINY_NAME, tmp_path, with_optimizer=False)
    fresh_adam = _train(tiny_engine, "b", data, 2)
    assert fresh_adam[0] == continued[0]  # same weights
    tiny_engine.load_state("c", TINY_NAME, tmp_path, with_optimizer=True)
    assert _train(tiny_engine, "c", data, 2)[1] != fresh_adam[1]  # Adam state matters


def test_peft_layout(tiny_engine: TorchEngine, tmp_path: Path) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=4, train_mlp=False, seed=0))
    tiny_engine.save_state("a", tmp_path, with_optimizer=False)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (
        4,
        64,
    )
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (
        32,
        4,
    )
    assert "base_model.model.lm_head.lora_A.weight" in tensors
    assert not any("mlp" in key for key in tensors)
    assert not (tmp_path / "optimizer.safetensors").exists()
    with pytest.raises(EngineUserError, match=r"optimizer\.safetensors"):
        tiny_engine.load_state("b", TINY_NAME, tmp_path, with_optimizer=True)


def test_microbatching_gives_the_same_gradients(tmp_path: Path) -> None:
    data = next_token_data(2, [20, 5, 13, 9, 17])
    grads = []
    results = []
    for cap in (10_000, 24):
        engine = TorchEngine(models=[TINY_NAME], max_tokens_per_microbatch=cap, threads=1)
        engine.create_adapter("a", TINY_NAME, LoraSpec(rank=4, seed=1))
        for p in engine._adapters["a"].lora.parameters():  # non-zero B: all grads non-zero
            with torch.no_grad():
                p.add_(0.01)
        results.append(engine.forward_backward("a", data, "cross_entropy", {}, False))
        grads.append([p.grad for p in engine._adapters["a"].lora.parameters()])
    assert results[0].metrics["loss:sum"] == pytest.approx(results[1].metrics["loss:sum"], rel=1e-5)
    for one, many in zip(results[0].logprobs, results[1].logprobs, strict=True):
        np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-5)
    for big, small in zip(grads[0], grads[1], strict=True):
        assert big is not None and small is not None
        torch.testing.assert_close(big, small, rtol=1e-4, atol=1e-6)


def test_pack_microbatches_caps_padded_tokens() -> None:
    batches = pack_microbatches([20, 5, 13, 9, 17], 24)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    lengths = [20, 5, 13, 9, 17]
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 24


def test_forward_only_leaves_no_gradient(tiny_engine: TorchEngine) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=2, seed=0))
    result = tiny_engine.forward_backward("a", next_token_data(0, [6]), "cross_entropy", {}, True)
    assert result.logprobs[0].shape == (6,) and result.logprobs[0].dtype == np.float32
    assert all(p.grad is None for p in tiny_engine._adapters["a"].lora.parameters())


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.array([1, 2, 49152]), "token id 49152 outside the vocabulary"),
        (np.array([-1, 2]), "token id -1 outside"),
        (np.zeros(2049, np.int64), "more than the model's context length 2048"),
        (np.zeros(0, np.int64), "is empty"),
        (np.zeros((2, 2), np.int64), "1-D int64"),
    ],
)
def test_bad_tokens(tiny_engine: TorchEngine, tokens: np.ndarray, message: str) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=2, seed=0))
    n = tokens.shape[0] if tokens.ndim == 1 else 2
    datum = DatumArrays(tokens, {"target_tokens": np.zeros(n, np.int64)})
    with pytest.raises(EngineUserError) as info:
        tiny_engine.forward_backward("a", [datum], "cross_entropy", {}, True)
    assert message in str(info.value)


def test_unknown_model_and_adapter(tiny_engine: TorchEngine) -> None:
    with pytest.raises(EngineUserError, match="unknown base_model 'nope'"):
        tiny_engine.create_adapter("a", "nope", LoraSpec())
    with pytest.raises(EngineUserError, match="unknown base_model"):
        tiny_engine.create_adapter("a", SMOLLM2_NAME, LoraSpec())  # not served by this engine
    with pytest.raises(EngineUserError, match="unknown adapter id 'ghost'"):
        tiny_engine.optim_step("ghost", AdamStep())
    with pytest.raises(EngineUserError, match="trains nothing"):
        tiny_engine.create_adapter(
            "a", TINY_NAME, LoraSpec(train_attn=False, train_mlp=False, train_unembed=False)
        )
