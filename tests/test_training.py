"""TrainingClient: ordering, chunking, metric reduction, custom losses (virtual time + sockets)."""

from __future__ import annotations

import random
from typing import Any

import httpx
import numpy as np
import pytest
import trio
import trio.lowlevel
import trio.testing
from fake_tinker import FakeTinker
from fault_server import open_fault_server

from tinkex_trio import Config, open_service, types as t
from tinkex_trio._metrics import reduce_metrics
from tinkex_trio.errors import InternalServerError, InvalidInputError, TinkexError
from tinkex_trio.training import chunk_data, estimate_datum_bytes


def config_for(fake: FakeTinker, base_url: str = "http://fake") -> Config:
    return Config(api_key=fake.api_key, base_url=base_url, telemetry=False)


def datum(n: int = 4, offset: int = 0) -> t.Datum:
    tokens = list(range(offset, offset + n + 1))
    return t.Datum(
        model_input=t.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
    )


async def _submit_from_tasks(training: Any, count: int, tasks: int) -> list[Any]:
    futures: list[Any] = []

    async def worker(k: int) -> None:
        for i in range(k, count, tasks):
            if i % 2:
                futures.append(await training.optim_step(t.AdamParams(learning_rate=1e-4)))
            else:
                futures.append(await training.forward_backward([datum()], "cross_entropy"))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for k in range(tasks):
            nursery.start_soon(worker, k)
    return futures


async def test_200_requests_from_several_tasks_arrive_in_order_despite_5xx(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    rng = random.Random(7)
    fake.faults["/api/v1/forward_backward"] = [
        503 if rng.random() < 0.2 else None for _ in range(300)
    ]
    fake.faults["/api/v1/optim_step"] = [500 if rng.random() < 0.2 else None for _ in range(300)]
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        futures = await _submit_from_tasks(training, 200, 5)
        for fut in futures:
            await fut
    # Retries resend the same seq_id, so the server sees each one once it answers normally.
    seen = fake.submitted_seq_ids["sess-1:train:0"]
    assert seen == list(range(1, 201))


class _NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


async def test_ordering_over_real_sockets_with_5xx() -> None:
    fake = FakeTinker()
    rng = random.Random(3)
    fake.faults["/api/v1/forward_backward"] = [
        503 if rng.random() < 0.1 else None for _ in range(300)
    ]
    with trio.fail_after(60):
        async with open_fault_server(fake.fault_handler) as server:
            config = Config(api_key=fake.api_key, base_url=server.base_url, telemetry=False)
            async with open_service(config) as service:
                training = await service.create_lora_training_client("fake/model")
                # Layer-A back-off on the 503s would take real seconds: make them quick.
                service._ctx.transport.random = _NoJitter()
                futures = await _submit_from_tasks(training, 200, 4)
                results = [await f for f in futures]
    assert fake.submitted_seq_ids["sess-1:train:0"] == list(range(1, 201))
    assert len(results) == 200


async def test_a_failed_submit_does_not_block_later_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        # Layer A (10 tries) then layer B (5 minutes) give up on a server that keeps failing.
        fake.faults["/api/v1/optim_step"] = [500] * 10_000
        failing = await training.optim_step()
        after = await training.forward_backward([datum()])
        with pytest.raises(InternalServerError):
            await failing
        assert (await after).metrics["loss:sum"] == pytest.approx(2.0)
    assert fake.submitted_seq_ids["sess-1:train:0"] == [2]


async def test_pipelined_forward_backward_and_optim_step() -> None:
    fake = FakeTinker()
    fake.poll_try_again = 2
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        fb = await training.forward_backward([datum(), datum(3)], "cross_entropy")
        step = await training.optim_step(t.AdamParams(learning_rate=2e-4))
        out = await fb
        assert len(out.loss_fn_outputs) == 2
        assert out.loss_fn_outputs[1]["logprobs"].to_numpy().shape == (3,)
        assert (await step).metrics == {"lr:mean": 2e-4}
        assert training.statistics().next_seq_id == 3


async def test_chunking_keeps_order_and_reduces_metrics() -> None:
    fake = FakeTinker()
    fake.client_config = {"fwdbwd_max_chunk_len": 2}
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        data = [datum(n) for n in (1, 2, 3, 4, 5)]
        out = await (await training.forward_backward(data))
    assert fake.submitted_seq_ids["sess-1:train:0"] == [1, 2, 3]
    assert [o["logprobs"].to_numpy().shape[0] for o in out.loss_fn_outputs] == [1, 2, 3, 4, 5]
    assert out.metrics["loss:sum"] == pytest.approx(0.5 * 15)
    # n:mean is 2, 2, 1 per chunk, weighted by 2, 2, 1 outputs.
    assert out.metrics["n:mean"] == pytest.approx((2 * 2 + 2 * 2 + 1 * 1) / 5)


def test_chunk_data_by_count_and_bytes() -> None:
    data = [datum(10) for _ in range(5)]
    size = estimate_datum_bytes(data[0])
    assert size == 4 * 10 + 8 * 10 + 4 * 10
    assert [len(c) for c, _ in chunk_data(data, 1024, size * 2)] == [2, 2, 1]
    assert [len(c) for c, _ in chunk_data(data, 3, 10**9)] == [3, 2]
    assert [len(c) for c, _ in chunk_data(data, 1024, 1)] == [1, 1, 1, 1, 1]


def test_reduce_metrics_follows_the_protocol_example() -> None:
    merged = reduce_metrics(
        [
            ({"loss:sum": 1, "m:mean": 1, "s:slack": 1, "x:min": 3, "x:max": 3, "u:unique": 7}, 1),
            ({"loss:sum": 2, "m:mean": 2, "s:slack": 3, "x:min": 1, "x:max": 1, "u:unique": 8}, 3),
        ]
    )
    assert merged == {
        "loss:sum": 3,
        "m:mean": 1.75,
        "s:slack": 0.5,
        "x:min": 1,
        "x:max": 3,
        "u:unique": 7,
        "u:unique_1": 8,
    }
    assert reduce_metrics([({"h:hash2": 2**64 - 1}, 1), ({"h:hash2": 2}, 1)]) == {"h:hash2": 1.0}
    assert reduce_metrics([({"a:sum": 1, "b:sum": 1}, 1), ({"a:sum": 1}, 1)]) == {"a:sum": 2}
    assert reduce_metrics([({"z:weird": 1}, 1)]) == {}
    with pytest.raises(ValueError, match="one ':'"):
        reduce_metrics([({"nocolon": 1}, 1)])
    with pytest.raises(ValueError, match="zero loss_fn_outputs"):
        reduce_metrics([({"m:mean": 1}, 0)])


async def test_invalid_training_input_is_rejected_before_sending() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        sent = len(fake.requests)
        with pytest.raises(InvalidInputError, match="empty"):
            await training.forward_backward([])
        with pytest.raises(InvalidInputError, match="not supported"):
            await training.forward_backward([datum()], "mystery")
        with pytest.raises(InvalidInputError, match="advantages"):
            await training.forward_backward([datum()], "importance_sampling")
        bad = t.Datum(
            model_input=t.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3]},
        )
        with pytest.raises(InvalidInputError, match=r"length 3"):
            await training.forward_backward([bad])
        with pytest.raises(InvalidInputError, match="finite"):
            await training.forward_backward([datum()], "cross_entropy", {"x": float("nan")})
        with pytest.raises(InvalidInputError, match="name"):
            await training.save_state("a/b")
        with pytest.raises(InvalidInputError, match="ttl_seconds"):
            await training.save_state("a", ttl_seconds=-5)
        with pytest.raises(InvalidInputError, match=r"ttl_seconds must be an int in 1\.\."):
            await training.save_state("a", ttl_seconds=2**62)
        assert len(fake.requests) == sent


async def test_save_state_and_sampling_client_from_training() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        saved = await (await training.save_state("step-1", ttl_seconds=3600))
        assert saved.path == "tinker://sess-1:train:0/weights/step-1"
        sampler = await training.save_weights_and_get_sampling_client()
        assert sampler.sampling_session_id == "sess-1:sample:0"
        assert sampler.get_base_model() == "fake/model"
        named = await (await training.save_weights_for_sampler("s1"))
        assert named.path == "tinker://sess-1:train:0/sampler_weights/s1"
    save = next(r for r in fake.requests if r.path.endswith("/save_weights"))
    assert save.body == {
        "model_id": "sess-1:train:0",
        "path": "step-1",
        "seq_id": 1,
        "ttl_seconds": 3600,
        "overwrite": False,
        "type": "save_weights",
    }
    assert save.headers["x-stainless-retry-count"] == "0"


async def test_save_weights_external() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        with pytest.raises(InvalidInputError, match="name"):
            await training.save_weights_external("a/b")
        with pytest.raises(InvalidInputError, match="ttl_seconds"):
            await training.save_weights_external("a", ttl_seconds=0)
        exported = await (await training.save_weights_external("dl", ttl_seconds=3600))
        assert isinstance(exported, t.SaveWeightsExternalResponse)
        assert exported.path == "tinker://sess-1:train:0/external_weights/dl"
        assert exported.size_bytes == 1234
    save = next(r for r in fake.requests if r.path.endswith("/save_weights_external"))
    assert save.body == {
        "model_id": "sess-1:train:0",
        "path": "dl",
        "seq_id": 1,
        "ttl_seconds": 3600,
        "type": "save_weights_external",
    }
    # Layer-A retries are off for saves (PROTOCOL.md 3.2).
    assert save.headers["x-stainless-retry-count"] == "0"


async def test_forward_backward_custom_with_torch() -> None:
    torch = pytest.importorskip("torch")
    fake = FakeTinker()
    data = [datum(3), datum(2)]
    seen: list[tuple[type, bool, Any]] = []

    def loss_fn(batch: list[t.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        seen.extend((type(lp), lp.requires_grad, lp.dtype) for lp in logprobs)
        loss = sum((lp * lp).sum() for lp in logprobs)
        return loss, {"custom/sq:sum": float(loss.detach())}

    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        out = await (await training.forward_backward_custom(data, loss_fn, tensors="torch"))
        after = await (await training.optim_step())
    # The loss got one float32 tensor per datum, each requiring grad (autograd is the contract).
    assert seen == [(torch.Tensor, True, torch.float32)] * 2
    calls = [r for r in fake.requests if r.path.endswith(("/forward", "/forward_backward"))]
    assert [r.path.rsplit("/", 1)[1] for r in calls] == ["forward", "forward_backward"]
    # Backward weights are -d(sum lp^2)/d lp = -2 * lp = 1.0 for the fake's lp = -0.5.
    weights = calls[1].body["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"][
        "data"
    ]
    assert weights == [1.0, 1.0, 1.0]
    assert out.metrics["loss:sum"] == pytest.approx(5 * 0.25)
    assert out.metrics["custom/sq:sum"] == pytest.approx(1.25)
    # The server's cross-entropy of the backward pass: sum of -lp * w = 0.5 per token, 5 tokens.
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(2.5)
    assert [o["logprobs"].to_numpy().tolist() for o in out.loss_fn_outputs] == [
        [-0.5] * 3,
        [-0.5] * 2,
    ]
    assert after.metrics == {"lr:mean": t.AdamParams().learning_rate}
    assert fake.submitted_seq_ids["sess-1:train:0"] == [1, 2, 3]


async def test_forward_backward_custom_with_numpy_gets_numpy_even_with_torch_installed() -> None:
    fake = FakeTinker()
    fake.client_config = {"fwdbwd_max_chunk_len": 1}  # two chunks each way: 4 requests
    data = [datum(3), datum(2)]
    seen: list[Any] = []

    def loss_fn(
        batch: list[t.Datum], logprobs: list[Any]
    ) -> tuple[float, list[Any], dict[str, float]]:
        seen.extend(logprobs)
        assert batch == data  # the caller's datums, with all their inputs
        loss = float(sum((lp * lp).sum() for lp in logprobs))
        return loss, [2 * lp for lp in logprobs], {"custom/sq:sum": loss}

    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        out = await (await training.forward_backward_custom(data, loss_fn))
    # numpy in, whatever else is installed (the suite's venv has torch).
    assert [type(lp) for lp in seen] == [np.ndarray, np.ndarray]
    assert [(lp.dtype, lp.shape) for lp in seen] == [(np.float32, (3,)), (np.float32, (2,))]
    calls = [r for r in fake.requests if r.path.endswith(("/forward", "/forward_backward"))]
    assert [r.path.rsplit("/", 1)[1] for r in calls] == [
        "forward",
        "forward",
        "forward_backward",
        "forward_backward",
    ]
    backward = [c.body["forward_backward_input"]["data"][0]["loss_fn_inputs"] for c in calls[2:]]
    assert [b["weights"]["data"] for b in backward] == [[1.0] * 3, [1.0] * 2]
    assert out.metrics["loss:sum"] == pytest.approx(1.25)
    assert out.metrics["custom/sq:sum"] == pytest.approx(1.25)
    assert fake.submitted_seq_ids["sess-1:train:0"] == [1, 2, 3, 4]


async def test_custom_loss_contract_is_checked() -> None:
    fake = FakeTinker()

    def torch_style(batch: list[t.Datum], logprobs: list[Any]) -> Any:
        return sum(lp.sum() for lp in logprobs), {}

    def wrong_shape(batch: list[t.Datum], logprobs: list[Any]) -> Any:
        return 0.0, [np.zeros(1) for _ in logprobs], {}

    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        sent = len(fake.requests)
        with pytest.raises(InvalidInputError, match="tensors"):
            await training.forward_backward_custom([datum()], wrong_shape, tensors="jax")  # type: ignore[arg-type]
        assert len(fake.requests) == sent
        # A numpy loss returning the torch-style pair breaks the contract: it says so.
        with pytest.raises(TinkexError, match=r"\(loss, grads, metrics\)"):
            await (await training.forward_backward_custom([datum()], torch_style))
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        with pytest.raises(TinkexError, match=r"grads\[0\] has shape \(1,\)"):
            await (await training.forward_backward_custom([datum()], wrong_shape))


async def test_torch_tensors_without_torch_are_refused_before_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def no_torch(name: str, *args: Any) -> Any:
        return None if name == "torch" else real_find_spec(name, *args)

    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        sent = len(fake.requests)
        monkeypatch.setattr(importlib.util, "find_spec", no_torch)
        with pytest.raises(InvalidInputError, match="needs PyTorch"):
            await training.forward_backward_custom([datum()], lambda b, lp: None, tensors="torch")
        assert len(fake.requests) == sent
        assert training.statistics().next_seq_id == 1


async def test_failing_custom_loss_poisons_the_client() -> None:
    fake = FakeTinker()

    def bad_loss(batch: list[t.Datum], logprobs: list[Any]) -> Any:
        raise ZeroDivisionError("user bug")

    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model")
        fut = await training.forward_backward_custom([datum()], bad_loss)
        queued = await training.optim_step()
        with pytest.raises(TinkexError, match="loss failed"):
            await fut
        with pytest.raises(TinkexError, match="poisoned"):
            await queued
        with pytest.raises(TinkexError, match="poisoned"):
            await training.optim_step()


def test_numpy_tensor_inputs_convert_without_loops() -> None:
    rng = np.random.default_rng(5)
    n = 1_000_003
    tokens = rng.integers(0, 150_000, size=n + 1).astype(np.int64)
    weights = rng.normal(size=n).astype(np.float32)
    d = t.Datum(
        model_input=t.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    targets = d.loss_fn_inputs["target_tokens"]
    converted = d.loss_fn_inputs["weights"]
    # Values round-trip exactly, in their wire dtypes and shapes.
    assert (targets.dtype, targets.resolved_shape()) == ("int64", [n])
    assert (converted.dtype, converted.resolved_shape()) == ("float32", [n])
    assert np.array_equal(targets.to_numpy(), tokens[1:])
    assert np.array_equal(converted.to_numpy(), weights)
    assert d.model_input.length == n
    # No per-element Python work: the TensorData keeps the caller's own buffer for the
    # protobuf encoder (a float32 input is not even copied).
    assert np.shares_memory(converted._array, weights)  # type: ignore[attr-defined]
    # float64 is narrowed to float32 by numpy, exactly as numpy's astype does it.
    wide = rng.normal(size=1000)
    narrowed = t.TensorData.from_numpy(wide)
    assert narrowed.dtype == "float32"
    assert np.array_equal(narrowed.to_numpy(), wide.astype(np.float32))


async def test_futures_never_submitted_fail_with_client_closed_when_the_service_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A future queued behind a slow submit must not wait forever once the block is left."""
    from tinkex_trio.errors import ClientClosedError

    fake = FakeTinker()
    inner = fake.mock_transport()

    async def slow_submits(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/optim_step"):
            await trio.sleep(100)
        return await inner.handle_async_request(request)

    with trio.move_on_after(10):
        async with open_service(
            config_for(fake), transport=httpx.MockTransport(slow_submits)
        ) as service:
            training = await service.create_lora_training_client("fake/model")
            in_flight = await training.optim_step()
            queued = [await training.optim_step() for _ in range(3)]
            await trio.sleep_forever()
    for fut in [in_flight, *queued]:
        with pytest.raises(ClientClosedError, match="open_service"):
            await fut
