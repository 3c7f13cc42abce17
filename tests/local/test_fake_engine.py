"""`tinkex_trio.local.testing.FakeEngine`: what it computes, its explicit fault injection, and
the documented use (the SDK against a local backend that runs it, over real sockets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from tinkex_trio import Datum, ModelInput, SamplingParams, open_service
from tinkex_trio.errors import RequestFailedError
from tinkex_trio.local import open_local_backend
from tinkex_trio.local._engine_api import AdamStep, DatumArrays, LoraSpec, SampleRequest
from tinkex_trio.local.testing import FAKE_MODEL_NAME, EngineUserError, FakeEngine

LIMIT = 60


def _datum(n: int) -> DatumArrays:
    tokens = np.arange(1, n + 1, dtype=np.int64)
    return DatumArrays(tokens=tokens, loss_fn_inputs={"target_tokens": tokens + 1})


def _request(prompt: list[int], **kw: object) -> SampleRequest:
    return SampleRequest(base_model=FAKE_MODEL_NAME, adapter_dir=None, prompt=prompt, **kw)  # type: ignore[arg-type]


def test_logprobs_follow_the_documented_formula() -> None:
    engine = FakeEngine()
    engine.create_adapter("a", FAKE_MODEL_NAME, LoraSpec(rank=2))
    first = engine.forward_backward("a", [_datum(3)], "cross_entropy", {}, False)
    np.testing.assert_allclose(first.logprobs[0], [-1.0, -1 / 2, -1 / 3])
    assert first.metrics["loss:sum"] == pytest.approx(1 + 1 / 2 + 1 / 3)
    assert engine.optim_step("a", AdamStep(learning_rate=0.5)) == {"learning_rate:mean": 0.5}
    after = engine.forward_backward("a", [_datum(2)], "cross_entropy", {}, True)
    np.testing.assert_allclose(after.logprobs[0], [-1 / 2, -1 / 3])
    assert engine.calls == [
        ("create_adapter", "a"),
        ("forward_backward", "a"),
        ("optim_step", "a"),
        ("forward_backward", "a"),
    ]


def test_samples_continue_the_prompt_and_any_prompt_is_served() -> None:
    engine = FakeEngine()
    (result,) = engine.sample([_request([0], num_samples=2, max_tokens=3, prompt_logprobs=True)])
    assert not isinstance(result, EngineUserError)  # no magic prompt is rejected
    assert [s.tokens for s in result.sequences] == [[1, 2, 3], [2, 3, 4]]
    assert result.sequences[0].logprobs == [-0.5] * 3
    assert result.prompt_logprobs == [None]


def test_fail_next_raises_once_per_injection_in_order() -> None:
    engine = FakeEngine()
    engine.create_adapter("a", FAKE_MODEL_NAME, LoraSpec())
    engine.fail_next("optim_step", EngineUserError("first"))
    engine.fail_next("optim_step", RuntimeError("second"))
    with pytest.raises(EngineUserError, match="first"):
        engine.optim_step("a", AdamStep())
    with pytest.raises(RuntimeError, match="second"):
        engine.optim_step("a", AdamStep())
    assert engine.optim_step("a", AdamStep()) == {"learning_rate:mean": AdamStep().learning_rate}
    engine.fail_next("sample", RuntimeError("whole batch"))
    with pytest.raises(RuntimeError, match="whole batch"):
        engine.sample([_request([4])])
    assert "pending_faults=0" in repr(engine)


def test_reject_next_sample_fails_one_request_of_a_batch() -> None:
    engine = FakeEngine()
    engine.reject_next_sample("too long")
    rejected, served = engine.sample([_request([4]), _request([9], max_tokens=1)])
    assert isinstance(rejected, EngineUserError) and str(rejected) == "too long"
    assert not isinstance(served, EngineUserError) and served.sequences[0].tokens == [10]
    (again,) = engine.sample([_request([4], max_tokens=1)])
    assert not isinstance(again, EngineUserError)


async def test_the_documented_use_over_real_sockets(tmp_path: Path) -> None:
    engine = FakeEngine()
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(data_dir=tmp_path, engine=engine) as backend,
            open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service,
        ):
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            data = [
                Datum(
                    model_input=ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4]},  # type: ignore[dict-item]
                )
            ]
            out = await (await training.forward_backward(data, "cross_entropy"))
            np.testing.assert_allclose(
                out.loss_fn_outputs[0]["logprobs"].to_numpy(), [-1.0, -1 / 2, -1 / 3]
            )
            engine.fail_next("optim_step", EngineUserError("learning rate too high"))
            with pytest.raises(RequestFailedError) as failed:
                await (await training.optim_step())
            assert failed.value.category == "user"
            assert "learning rate too high" in str(failed.value)
            sampler = await service.create_sampling_client(base_model=FAKE_MODEL_NAME)
            sampled = await sampler.sample(
                ModelInput.from_ints([7]), sampling_params=SamplingParams(max_tokens=2)
            )
            assert sampled.sequences[0].tokens == [8, 9]
