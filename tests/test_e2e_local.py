"""The SDK against the real local backend (Hypercorn on 127.0.0.1, TorchEngine, tiny model).

Real sockets and a torch worker thread: no virtual time here; every test runs under
`trio.fail_after` and asserts outcomes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

pytest.importorskip("torch")

from tinkex_trio import (
    AdamParams,
    Datum,
    ModelInput,
    RequestFailedError,
    SamplingParams,
    download,
    open_service,
)
from tinkex_trio.errors import APIStatusError, ConflictError
from tinkex_trio.local import open_local_backend

TINY = "tinkex-trio/SmolLM2-tiny-random"
LIMIT = 240


def make_batch() -> list[Datum]:
    rng = np.random.default_rng(0)
    batch = []
    for n in (12, 9):
        tokens = rng.integers(100, 2000, size=n + 1)
        batch.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(n, np.float32)},
            )
        )
    return batch


async def train_steps(training: object, batch: list[Datum], steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = await training.forward_backward(batch, "cross_entropy")  # type: ignore[attr-defined]
        step = await training.optim_step(AdamParams(learning_rate=1e-2))  # type: ignore[attr-defined]
        losses.append((await fb).metrics["loss:sum"])
        await step
    return losses


async def test_full_job_against_the_local_backend(tmp_path: Path) -> None:
    batch = make_batch()
    with trio.fail_after(LIMIT):
        async with open_local_backend(data_dir=tmp_path / "data", models=[TINY]) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service:
                caps = await service.get_server_capabilities()
                assert any("tiny" in (m.model_name or "") for m in caps.supported_models)

                training = await service.create_lora_training_client(TINY, rank=8, seed=0)
                losses = await train_steps(training, batch, 20)
                assert losses[-1] < 0.8 * losses[0], losses

                saved = await (await training.save_state("mid"))
                assert saved.path == f"tinker://{training.model_id}/weights/mid"
                continued = await train_steps(training, batch, 3)

                resumed = await service.create_training_client_from_state_with_optimizer(saved.path)
                again = await train_steps(resumed, batch, 3)
                np.testing.assert_allclose(again, continued, rtol=1e-5)

                sampler = await training.save_weights_and_get_sampling_client()
                prompt = ModelInput.from_ints([1, 4093, 198, 1780, 314])
                params = SamplingParams(max_tokens=6, seed=123, temperature=1.0, stop=[])
                first = await sampler.sample(prompt, num_samples=3, sampling_params=params)
                second = await sampler.sample(prompt, num_samples=3, sampling_params=params)
                assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
                assert all(len(s.tokens) == 6 for s in first.sequences)
                assert all(s.stop_reason == "length" for s in first.sequences)
                assert len({s.sequence_id for s in first.sequences}) == 3

                # compute_logprobs agrees with the training forward pass on the same weights.
                datum = batch[0]
                full = [
                    *datum.model_input.to_ints(),
                    int(datum.loss_fn_inputs["target_tokens"].data[-1]),
                ]
                scored = await sampler.compute_logprobs(ModelInput.from_ints(full))
                forward = await (await training.forward([datum]))
                np.testing.assert_allclose(
                    scored[1:], forward.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=1e-4
                )

                rest = service.create_rest_client()
                listed = await rest.list_checkpoints(training.model_id)
                assert "weights/mid" in [c.checkpoint_id for c in listed.checkpoints]
                await rest.publish_checkpoint_from_tinker_path(saved.path)
                with pytest.raises(ConflictError):
                    await rest.publish_checkpoint_from_tinker_path(saved.path)
                mine = await rest.list_user_checkpoints()
                assert any(c.public for c in mine.checkpoints if c.tinker_path == saved.path)

                target = await download(rest, saved.path, output_dir=tmp_path / "dl")
                names = sorted(p.name for p in target.iterdir())
                assert "adapter_model.safetensors" in names and "adapter_config.json" in names

                await rest.delete_checkpoint_from_tinker_path(saved.path)
                listed = await rest.list_checkpoints(training.model_id)
                assert "weights/mid" not in [c.checkpoint_id for c in listed.checkpoints]


async def test_bad_requests_fail_with_user_category_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    with trio.fail_after(LIMIT):
        async with open_local_backend(data_dir=tmp_path, models=[TINY]) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service:
                with pytest.raises((RequestFailedError, APIStatusError)) as info:
                    await service.create_lora_training_client("no/such-model")
                assert "no/such-model" in str(info.value)

                training = await service.create_lora_training_client(TINY, rank=4)
                too_long = Datum(
                    model_input=ModelInput.from_ints([5] * 5000),
                    loss_fn_inputs={"target_tokens": [5] * 5000, "weights": [1.0] * 5000},
                )
                out_of_vocab = Datum(
                    model_input=ModelInput.from_ints([10**7]),
                    loss_fn_inputs={"target_tokens": [1], "weights": [1.0]},
                )
                # Rejected on submit (400) or as a failed future: either way category `user`.
                for bad in (too_long, out_of_vocab):
                    with pytest.raises((RequestFailedError, APIStatusError)) as failed:
                        await (await training.forward_backward([bad]))
                    assert _category(failed.value) == "user"
                    if bad is too_long:
                        assert "context" in str(failed.value).lower()

                # The run still trains after its failed requests.
                losses = await train_steps(training, make_batch(), 2)
                assert all(np.isfinite(losses))


def _category(error: BaseException) -> str | None:
    if isinstance(error, RequestFailedError):
        return error.category
    body = getattr(error, "body", None)
    return body.get("category") if isinstance(body, dict) else None


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_local_backend(data_dir=tmp_path, models=[TINY]) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service:
                training = await service.create_lora_training_client(TINY, rank=4, seed=1)
                await train_steps(training, make_batch(), 2)
                path = (await (await training.save_state("before-restart"))).path
                run_id = training.model_id
                before = await train_steps(training, make_batch(), 1)

        async with open_local_backend(data_dir=tmp_path, models=[TINY]) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service:
                rest = service.create_rest_client()
                runs = [r.training_run_id async for r in rest.iter_training_runs()]
                assert run_id in runs
                listed = await rest.list_checkpoints(run_id)
                assert [c.tinker_path for c in listed.checkpoints] == [path]
                resumed = await service.create_training_client_from_state_with_optimizer(path)
                after = await train_steps(resumed, make_batch(), 1)
                np.testing.assert_allclose(after, before, rtol=1e-5)


def _nll_numpy(
    data: list[Datum], logprobs: list[np.ndarray]
) -> tuple[float, list[np.ndarray], dict[str, float]]:
    """Plain negative log-likelihood, numpy contract: its gradient is -1 per token."""
    assert all(type(lp) is np.ndarray for lp in logprobs)
    loss = float(-sum(lp.sum() for lp in logprobs))
    return loss, [-np.ones_like(lp) for lp in logprobs], {"custom/nll:sum": loss}


def _nll_torch(data: list[Datum], logprobs: list[object]) -> tuple[object, dict[str, float]]:
    """The same loss, torch contract: autograd finds the -1s."""
    loss = -sum(lp.sum() for lp in logprobs)  # type: ignore[attr-defined]
    return loss, {"custom/nll:sum": float(loss.detach())}


async def test_custom_losses_against_the_local_backend(tmp_path: Path) -> None:
    """Both custom-loss contracts train a real model (PROTOCOL.md 9.8).

    With NLL as the custom loss the backward weights are exactly 1, so the server's surrogate
    cross-entropy equals the custom loss: the gradient went through the right way round.
    """
    batch = make_batch()
    with trio.fail_after(LIMIT):
        async with open_local_backend(data_dir=tmp_path / "data", models=[TINY]) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service:
                for tensors in ("numpy", "torch"):
                    training = await service.create_lora_training_client(TINY, rank=8, seed=0)
                    fn = _nll_numpy if tensors == "numpy" else _nll_torch
                    first = await (
                        await training.forward_backward_custom(batch, fn, tensors=tensors)  # type: ignore[arg-type]
                    )
                    await (await training.optim_step(AdamParams(learning_rate=1e-2)))
                    loss = first.metrics["loss:sum"]
                    assert first.metrics["custom/nll:sum"] == pytest.approx(loss)
                    assert first.metrics["surrogate_loss:sum"] == pytest.approx(loss, rel=1e-4)
                    assert [o["logprobs"].to_numpy().shape for o in first.loss_fn_outputs] == [
                        (12,),
                        (9,),
                    ]
                    after = await (
                        await training.forward_backward_custom(batch, fn, tensors=tensors)  # type: ignore[arg-type]
                    )
                    # A step on the custom loss's gradient lowered it.
                    assert after.metrics["loss:sum"] < loss, tensors
