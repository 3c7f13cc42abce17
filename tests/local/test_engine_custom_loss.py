"""TorchEngine.forward_backward_custom on the tiny model: the custom neg-ll equals the built-in
cross_entropy in value and gradient, micro-batching changes nothing, and a failure in a later
micro-batch leaves the adapter's gradients as they were."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import torch
from custom_loss_graphs import neg_ll, upload_body
from engine_testdata import next_token_data

from tinkex_trio.local._custom_graph import compile_custom_loss
from tinkex_trio.local._engine_api import EngineUserError, LoraSpec
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import TINY_NAME
from tinkex_trio.types._custom_loss import CreateCustomLossRequest

NEG_LL = compile_custom_loss(
    msgspec.convert(
        upload_body("s", neg_ll, {"logprobs": 1, "weights": 1}), CreateCustomLossRequest
    ),
    "s:loss:0",
)


def engine_with_adapter(cap: int = 10_000) -> TorchEngine:
    engine = TorchEngine(models=[TINY_NAME], max_tokens_per_microbatch=cap, threads=1)
    engine.create_adapter("a", TINY_NAME, LoraSpec(rank=4, seed=1))
    for p in engine._adapters["a"].lora.parameters():  # non-zero B: all grads non-zero
        with torch.no_grad():
            p.add_(0.01)
    return engine


def grads(engine: TorchEngine) -> list[torch.Tensor | None]:
    return [p.grad for p in engine._adapters["a"].lora.parameters()]


def test_custom_neg_ll_matches_cross_entropy_across_micro_batches() -> None:
    data = next_token_data(2, [20, 5, 13, 9, 17])
    builtin_engine = engine_with_adapter()
    builtin = builtin_engine.forward_backward("a", data, "cross_entropy", {}, False)
    for cap in (10_000, 24):
        engine = engine_with_adapter(cap)
        custom = engine.forward_backward_custom("a", data, NEG_LL, False)
        loss = builtin.metrics["loss:sum"]
        assert custom.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
        assert custom.metrics["custom/neg_ll:sum"] == pytest.approx(loss, rel=1e-5)
        weight_sums = [float(d.loss_fn_inputs["weights"].sum()) for d in data]
        assert custom.metrics["custom/tokens:mean"] == pytest.approx(np.mean(weight_sums))
        for a, b in zip(builtin.logprobs, custom.logprobs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads(builtin_engine), grads(engine), strict=True):
            assert a is not None and b is not None
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_failure_in_a_later_micro_batch_restores_the_gradients() -> None:
    engine = engine_with_adapter(cap=24)
    data = next_token_data(3, [20, 5, 13])
    engine.forward_backward("a", data, "cross_entropy", {}, False)
    before = [g.clone() for g in grads(engine) if g is not None]
    bad = next_token_data(4, [20, 6])
    bad[1].loss_fn_inputs["weights"][0] = math.inf  # the short datum runs in the 2nd batch
    with pytest.raises(EngineUserError, match=r"is -?inf for data\[1\]|nan for data\[1\]"):
        engine.forward_backward_custom("a", bad, NEG_LL, False)
    after = grads(engine)
    assert len(after) == len(before)
    for a, b in zip(before, after, strict=True):
        assert b is not None
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rank_mismatch_is_refused_by_the_engine_too() -> None:
    engine = engine_with_adapter()
    data = next_token_data(0, [4])
    data[0].loss_fn_inputs["weights"] = np.ones((4, 2), np.float32)
    with pytest.raises(EngineUserError, match="declares rank 1"):
        engine.forward_backward_custom("a", data, NEG_LL, False)


def test_the_stored_loss_is_plain_data() -> None:
    """Functions are looked up by name when the loss runs; the stored graph holds only names."""
    calls = [n for n in NEG_LL.nodes if n.op in ("call_function", "call_method")]
    assert calls and all(type(n.target) is str for n in calls)
    assert all(not callable(arg) for node in NEG_LL.nodes for arg in node.args)
    assert NEG_LL.nodes[-1].op == "output"
