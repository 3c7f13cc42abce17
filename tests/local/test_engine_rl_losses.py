"""`gspo` and `stable_reinforce` (PROTOCOL.md 8.6, 8.7): values and gradients against numpy.

The references (`tests/rl_reference.py`) are written from the formulas in docs/local_backend.md,
in numpy, with the gradient with respect to each learner log-prob derived by hand (no
autograd), so they share nothing with `_losses.py` but the formula.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from rl_reference import gspo_reference, stable_reinforce_reference

from tinkex_trio.local._engine_api import DatumArrays, EngineUserError, LoraSpec
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.engine._losses import datum_loss, validate_inputs
from tinkex_trio.local.model_files import TINY_NAME

Array = npt.NDArray[np.float64]
VOCAB = 49152


def _ours(
    loss_fn: str,
    lp: Array,
    inputs: dict[str, npt.NDArray[np.generic]],
    config: dict[str, float],
    recorded: npt.NDArray[np.float32] | None = None,
) -> tuple[float, Array]:
    n = lp.size
    prepared = validate_inputs(
        loss_fn,  # type: ignore[arg-type]
        0,
        n,
        {"target_tokens": np.zeros(n, np.int64), **inputs},
        VOCAB,
        recorded,
    )
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    loss = datum_loss(loss_fn, lp_t, prepared, config)  # type: ignore[arg-type]
    loss.backward()  # type: ignore[no-untyped-call]
    assert lp_t.grad is not None
    return float(loss.detach()), lp_t.grad.numpy()


@pytest.mark.parametrize(
    ("shift", "regime"),
    [(-0.4, "below the clip range"), (0.3, "above the clip range"), (0.02, "inside it")],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_matches_numpy(shift: float, regime: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 20
    lp = -rng.uniform(0.1, 3.0, size=n)
    mask = (rng.uniform(size=n) < 0.6).astype(np.float32)
    mask[0] = 1.0
    # q such that the masked mean of lp - q is `shift` (token by token it varies a lot).
    q = lp - shift + rng.normal(0.0, 0.5, size=n)
    q += np.mean((lp - q)[mask != 0]) - shift
    adv = rng.normal(size=n)
    config = {"clip_low_threshold": 0.85, "clip_high_threshold": 1.15}
    inputs = {
        "logprobs": q.astype(np.float32),
        "advantages": adv.astype(np.float32),
        "sequence_ratio_mask": mask,
    }
    q32, adv32 = q.astype(np.float32).astype(np.float64), adv.astype(np.float32).astype(np.float64)
    ref_loss, ref_grad = gspo_reference(lp, q32, adv32, mask.astype(np.float64), 0.85, 1.15)
    loss, grad = _ours("gspo", lp, inputs, config)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9), regime
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-9)
    rho = float(np.exp(np.mean((lp - q32)[mask != 0])))
    if regime == "inside it":
        assert 0.85 < rho < 1.15 and np.all(grad != 0)
    else:
        assert not 0.85 <= rho <= 1.15
        # Clipping zeroes the gradient of exactly the tokens whose advantage pushes further out.
        assert np.any(grad == 0) and np.any(grad != 0)


def test_gspo_unmasked_tokens_take_the_sequence_ratio_and_empty_mask_is_on_policy() -> None:
    lp = np.array([-1.0, -2.0, -0.5])
    q = np.array([-1.1, -5.0, -0.5])
    adv = np.array([1.0, 1.0, 1.0])
    mask = np.array([1.0, 0.0, 0.0], np.float32)
    inputs = {"logprobs": q.astype(np.float32), "advantages": adv.astype(np.float32)}
    _, grad = _ours("gspo", lp, {**inputs, "sequence_ratio_mask": mask}, {})
    ratio = np.exp(lp[0] - np.float32(q[0]))
    # Token 1's own ratio would be exp(3) (clipped, no gradient); it carries the sequence's.
    np.testing.assert_allclose(grad, -adv * ratio, rtol=1e-6)
    loss, grad = _ours("gspo", lp, {**inputs, "sequence_ratio_mask": np.zeros(3, np.float32)}, {})
    assert loss == pytest.approx(-3.0)
    np.testing.assert_allclose(grad, -adv)


@pytest.mark.parametrize(
    ("ratio_clip", "kl_coeff"), [(2.0, 0.0), (1.3, 0.0), (2.0, 0.25), (1.1, 1.5)]
)
def test_stable_reinforce_matches_numpy(ratio_clip: float, kl_coeff: float) -> None:
    rng = np.random.default_rng(11)
    n = 30
    lp = -rng.uniform(0.05, 4.0, size=n)
    recorded = (lp + rng.normal(0.0, 0.8, size=n)).astype(np.float32)
    recorded[:6] = np.nan  # a prompt span: no sampler log-prob there
    adv = rng.normal(size=n).astype(np.float32)
    adv[:6] = 0.0
    config = {"ratio_clip": ratio_clip, "kl_coeff": kl_coeff}
    ref_loss, ref_grad = stable_reinforce_reference(
        lp, recorded.astype(np.float64), adv.astype(np.float64), ratio_clip, kl_coeff
    )
    loss, grad = _ours("stable_reinforce", lp, {"advantages": adv}, config, recorded)
    r = np.exp(lp - recorded)[6:]
    assert np.any(r > ratio_clip) and np.any(r < ratio_clip)  # truncation is exercised
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-9)
    assert np.all(grad[:6] == 0)


def test_stable_reinforce_ignores_request_logprobs() -> None:
    """The behaviour log-probs come from the recording; a `logprobs` input changes nothing."""
    lp = np.array([-1.0, -0.5, -2.0])
    recorded = np.array([np.nan, -0.7, -1.5], np.float32)
    adv = np.array([0.0, 1.0, -0.5], np.float32)
    base = _ours("stable_reinforce", lp, {"advantages": adv}, {"kl_coeff": 0.1}, recorded)
    lying = {"advantages": adv, "logprobs": np.array([-9.0, -9.0, -9.0], np.float32)}
    other = _ours("stable_reinforce", lp, lying, {"kl_coeff": 0.1}, recorded)
    assert base[0] == other[0]
    np.testing.assert_array_equal(base[1], other[1])


# ------------------------------------------------------------------- through the engine


def _perturb(engine: TorchEngine) -> None:
    for p in engine._adapters["a"].lora.parameters():
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)


def _reference_grads(
    engine: TorchEngine, data: list[DatumArrays], upstream: list[Array]
) -> list[torch.Tensor]:
    """Adapter gradients of sum_t upstream_t * lp_t: the chain rule with numpy's d loss / d lp."""
    lora = engine._adapters["a"].lora
    for p in lora.parameters():
        p.grad = None
    model = engine._model(TINY_NAME).model
    total = torch.zeros((), dtype=torch.float64)
    for datum, g in zip(data, upstream, strict=True):
        hidden = model.hidden_states(torch.from_numpy(datum.tokens).unsqueeze(0), lora)[0]
        logp = torch.log_softmax(model.logits(hidden, lora), dim=-1)
        targets = torch.from_numpy(datum.loss_fn_inputs["target_tokens"]).unsqueeze(1)
        lp = logp.gather(1, targets).squeeze(1).double()
        total = total + (torch.from_numpy(g) * lp).sum()
    total.backward()  # type: ignore[no-untyped-call]
    return [p.grad.clone() for p in lora.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_fn", ["gspo", "stable_reinforce"])
def test_engine_loss_and_gradients_match_numpy(tiny_engine: TorchEngine, loss_fn: str) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=4, seed=3))
    _perturb(tiny_engine)
    rng = np.random.default_rng(5)
    data: list[DatumArrays] = []
    for n in (9, 14):
        seq = rng.integers(0, VOCAB, size=n + 1)
        adv = rng.normal(size=n).astype(np.float32)
        datum = DatumArrays(seq[:-1], {"target_tokens": seq[1:], "advantages": adv})
        if loss_fn == "gspo":
            datum.loss_fn_inputs["logprobs"] = rng.uniform(-11.2, -10.6, size=n).astype(np.float32)
            datum.loss_fn_inputs["sequence_ratio_mask"] = (rng.uniform(size=n) < 0.7).astype(
                np.float32
            )
        else:
            recorded = rng.uniform(-11.5, -10.0, size=n).astype(np.float32)
            recorded[:3] = np.nan
            adv[:3] = 0.0
            datum.recorded_logprobs = recorded
        data.append(datum)
    config = (
        {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}
        if loss_fn == "gspo"
        else {"ratio_clip": 1.5, "kl_coeff": 0.3}
    )
    result = tiny_engine.forward_backward("a", data, loss_fn, config, False)  # type: ignore[arg-type]
    ours = [
        p.grad.clone() for p in tiny_engine._adapters["a"].lora.parameters() if p.grad is not None
    ]
    ref_total, upstream = 0.0, []
    for datum, lp32 in zip(data, result.logprobs, strict=True):
        lp = lp32.astype(np.float64)
        x = datum.loss_fn_inputs
        if loss_fn == "gspo":
            value, grad = gspo_reference(
                lp,
                x["logprobs"].astype(np.float64),
                x["advantages"].astype(np.float64),
                x["sequence_ratio_mask"].astype(np.float64),
                0.95,
                1.05,
            )
        else:
            assert datum.recorded_logprobs is not None
            value, grad = stable_reinforce_reference(
                lp,
                datum.recorded_logprobs.astype(np.float64),
                x["advantages"].astype(np.float64),
                1.5,
                0.3,
            )
        ref_total += value
        upstream.append(grad)
    assert result.metrics["loss:sum"] == pytest.approx(ref_total, rel=1e-4, abs=1e-4)
    reference = _reference_grads(tiny_engine, data, upstream)
    assert len(ours) == len(reference) > 0
    for mine, ref in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, ref.float(), rtol=1e-3, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in ours)


@pytest.mark.parametrize(
    ("loss_fn", "config", "recorded", "adv", "message"),
    [
        ("stable_reinforce", {}, None, [0.0, 1.0], "has no provenance spans"),
        ("stable_reinforce", {}, [np.nan, -1.0], [1.0, 1.0], "non-zero at target position 0"),
        ("stable_reinforce", {"ratio_clip": 0.0}, [-1.0, -1.0], [1.0, 1.0], "must be > 0"),
        ("stable_reinforce", {"kl_coeff": -0.1}, [-1.0, -1.0], [1.0, 1.0], "must be >= 0"),
        ("stable_reinforce", {"beta": 0.1}, [-1.0, -1.0], [1.0, 1.0], "['beta'] are not used"),
        ("gspo", {"kl_coeff": 0.1}, None, [1.0, 1.0], "['kl_coeff'] are not used"),
        ("gspo", {}, None, [1.0, 1.0], "lacks 'sequence_ratio_mask'"),
    ],
)
def test_rl_loss_refusals(
    tiny_engine: TorchEngine,
    loss_fn: str,
    config: dict[str, float],
    recorded: list[float] | None,
    adv: list[float],
    message: str,
) -> None:
    tiny_engine.create_adapter("a", TINY_NAME, LoraSpec(rank=2, seed=0))
    inputs: dict[str, npt.NDArray[np.generic]] = {
        "target_tokens": np.array([5, 6], np.int64),
        "advantages": np.array(adv, np.float32),
        "logprobs": np.array([-1.0, -1.0], np.float32),
    }
    datum = DatumArrays(np.array([4, 5], np.int64), inputs)
    if recorded is not None:
        datum.recorded_logprobs = np.array(recorded, np.float32)
    with pytest.raises(EngineUserError) as info:
        tiny_engine.forward_backward("a", [datum], loss_fn, config, False)  # type: ignore[arg-type]
    assert message in str(info.value)
