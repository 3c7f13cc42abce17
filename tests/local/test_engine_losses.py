"""Each Tinker loss (PROTOCOL.md section 8): value and gradient against its formula."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from tinkex_trio.local._engine_api import DatumArrays, EngineUserError, LoraSpec, LossName
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.engine._losses import LossInputs, datum_loss
from tinkex_trio.local.model_files import TINY_NAME

N = 24
Formula = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _clip(r: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return torch.clamp(r, low, high)


# Direct transcriptions of PROTOCOL.md 8.1-8.5, written independently of _losses.py.
FORMULAS: dict[str, tuple[dict[str, float], Formula]] = {
    "cross_entropy": ({}, lambda lp, x: torch.sum(-lp * x["weights"])),
    "importance_sampling": (
        {},
        lambda lp, x: -torch.sum(torch.exp(lp - x["logprobs"]) * x["advantages"]),
    ),
    "ppo": (
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        lambda lp, x: (
            -torch.sum(
                torch.min(
                    torch.exp(lp - x["logprobs"]) * x["advantages"],
                    _clip(torch.exp(lp - x["logprobs"]), 0.9, 1.1) * x["advantages"],
                )
            )
        ),
    ),
    "cispo": (
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        lambda lp, x: (
            -torch.sum(
                _clip(torch.exp(lp - x["logprobs"]), 0.9, 1.1).detach() * lp * x["advantages"]
            )
        ),
    ),
    "dro": (
        {"beta": 0.3},
        lambda lp, x: -torch.sum(lp * x["advantages"] - 0.5 * 0.3 * (lp - x["logprobs"]) ** 2),
    ),
}


def _random_inputs(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(N, generator=gen, dtype=torch.float64) * 3
    # Sampler logprobs near lp so ratios straddle the clip range on both sides.
    q = lp + (torch.rand(N, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    floats = {
        "weights": torch.rand(N, generator=gen, dtype=torch.float64),
        "logprobs": q,
        "advantages": torch.randn(N, generator=gen, dtype=torch.float64),
    }
    return lp, floats


@pytest.mark.parametrize("loss_fn", list(FORMULAS))
def test_loss_value_and_gradient_match_formula(loss_fn: LossName) -> None:
    config, formula = FORMULAS[loss_fn]
    lp, floats = _random_inputs(7)
    ratio = torch.exp(lp - floats["logprobs"])
    assert bool((ratio < 0.9).any()) and bool((ratio > 1.1).any())  # clipping is exercised
    lp_ours = lp.clone().requires_grad_(True)
    lp_ref = lp.clone().requires_grad_(True)
    ours = datum_loss(
        loss_fn, lp_ours, LossInputs(torch.zeros(N, dtype=torch.int64), floats), config
    )
    ref = formula(lp_ref, floats)
    ours.backward()  # type: ignore[no-untyped-call]
    ref.backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(ours, ref)
    assert lp_ours.grad is not None and lp_ref.grad is not None
    torch.testing.assert_close(lp_ours.grad, lp_ref.grad)


def _adapter_grads(engine: TorchEngine) -> list[torch.Tensor]:
    lora = engine._adapters["a"].lora
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in lora.parameters()
    ]


@pytest.mark.parametrize("loss_fn", list(FORMULAS))
def test_engine_loss_and_gradients_match_formula(
    tiny_engine: TorchEngine, loss_fn: LossName
) -> None:
    """Through the engine: loss:sum and the adapter gradients equal the formula's."""
    config, formula = FORMULAS[loss_fn]
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=4, seed=3))
    # Make B non-zero so every LoRA parameter gets a gradient.
    for p in tiny_engine._adapters["a"].lora.parameters():
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    rng = np.random.default_rng(0)
    data, inputs = [], []
    for n in (9, 14):
        seq = rng.integers(0, 49152, size=n + 1)
        floats = {
            "weights": rng.uniform(size=n).astype(np.float32),
            "advantages": rng.normal(size=n).astype(np.float32),
            "logprobs": (rng.uniform(-11.5, -10.0, size=n)).astype(np.float32),
        }
        data.append(DatumArrays(seq[:-1], {"target_tokens": seq[1:], **floats}))
        inputs.append({k: torch.from_numpy(v).double() for k, v in floats.items()})
    result = tiny_engine.forward_backward("a", data, loss_fn, config, False)
    grads = _adapter_grads(tiny_engine)

    # Reference: same forward by hand, formula in float64, autograd.
    lora = tiny_engine._adapters["a"].lora
    for p in lora.parameters():
        p.grad = None
    model = tiny_engine._model(TINY_NAME).model
    total = torch.zeros((), dtype=torch.float64)
    for datum, x in zip(data, inputs, strict=True):
        hidden = model.hidden_states(torch.from_numpy(datum.tokens).unsqueeze(0), lora)[0]
        logp = torch.log_softmax(model.logits(hidden, lora), dim=-1)
        lp = logp.gather(1, torch.from_numpy(datum.loss_fn_inputs["target_tokens"]).unsqueeze(1))
        total = total + formula(lp.squeeze(1).double(), x)
    total.backward()  # type: ignore[no-untyped-call]
    ref_grads = [p.grad for p in lora.parameters()]
    assert result.metrics["loss:sum"] == pytest.approx(float(total.detach()), rel=1e-4, abs=1e-4)
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert ref is not None
        torch.testing.assert_close(ours, ref.float(), rtol=1e-3, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize(
    ("loss_fn", "inputs", "message"),
    [
        ("cross_entropy", {}, "lacks 'target_tokens'"),
        ("ppo", {"target_tokens": np.zeros(5, np.int64)}, "lacks 'logprobs'"),
        ("cross_entropy", {"target_tokens": np.zeros(4, np.int64)}, "must have shape [5]"),
        ("cross_entropy", {"target_tokens": np.zeros(5, np.float32)}, "must be int64"),
        (
            "cross_entropy",
            {"target_tokens": np.zeros(5, np.int64), "weights": np.ones(3, np.float32)},
            "['weights'] must have shape [5]",
        ),
        ("cross_entropy", {"target_tokens": np.full(5, 49152, np.int64)}, "outside the vocabulary"),
    ],
)
def test_loss_input_validation(
    tiny_engine: TorchEngine, loss_fn: LossName, inputs: dict[str, np.ndarray], message: str
) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=2, seed=0))
    datum = DatumArrays(np.arange(5, dtype=np.int64), inputs)
    with pytest.raises(EngineUserError) as info:
        tiny_engine.forward_backward("a", [datum], loss_fn, {}, True)
    assert message in str(info.value)


def test_unknown_loss_config_key_is_rejected(tiny_engine: TorchEngine) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=2, seed=0))
    datum = DatumArrays(np.arange(5, dtype=np.int64), {"target_tokens": np.arange(5)})
    with pytest.raises(EngineUserError, match="clip_low"):
        tiny_engine.forward_backward("a", [datum], "cross_entropy", {"clip_low": 0.5}, True)


def test_the_engine_knows_exactly_the_losses_the_sdk_table_names() -> None:
    from tinkex_trio.local._engine_api import LOSS_NAMES
    from tinkex_trio.types import LOSS_FN_REQUIRED_INPUTS

    assert set(LOSS_NAMES) == set(LOSS_FN_REQUIRED_INPUTS)
