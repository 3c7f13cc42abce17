"""Client-side custom losses (PROTOCOL.md 9.8): forward pass, the user's loss, backward pass.

`TrainingClient.forward_backward_custom` sends a forward pass of the data reduced to
`target_tokens` and `weights`, runs the user's loss on the per-datum logprobs it returns, and
sends a backward pass whose cross-entropy weights are the negated gradient of that loss with
respect to the logprobs (so the server's sum of -lp * w has the same gradient). This module is
that middle step, and the typed state one call shares between its backward chunks.

The contract does not depend on what is installed: ``tensors="numpy"`` (the default) calls
``loss_fn(data, logprobs)`` with one float32 numpy array per datum and expects ``(loss, grads,
metrics)``, grads being d loss / d logprobs per datum in the same shapes; ``tensors="torch"``
imports torch then (and only then) and calls it with float32 torch tensors that require grad,
expecting ``(loss_tensor, metrics)``, and takes the gradients by autograd. Nothing here imports
torch unless the caller asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import trio

from tinkex_trio import types as t
from tinkex_trio._fwdbwd import FwdBwdChunk, merge_outputs
from tinkex_trio._sender import BodyFn
from tinkex_trio.errors import InvalidInputError
from tinkex_trio.futures import APIFuture

TensorKind = Literal["numpy", "torch"]

CustomLossFn = Callable[[list[t.Datum], list[Any]], Any]
"""``loss_fn(data, logprobs)``: with numpy arrays returning ``(loss, grads, metrics)``, or with
torch tensors (``tensors="torch"``) returning ``(loss_tensor, metrics)``."""


def check_tensors(tensors: object) -> TensorKind:
    """The ``tensors=`` argument, checked before anything is sent."""
    if tensors == "numpy":
        return "numpy"
    if tensors == "torch":
        if importlib.util.find_spec("torch") is None:
            raise InvalidInputError(
                'tensors="torch" needs PyTorch (pip install torch); or use the default '
                'tensors="numpy" and return (loss, grads, metrics)'
            )
        return "torch"
    raise InvalidInputError(f'tensors must be "numpy" or "torch", got {tensors!r}')


def for_forward(datum: t.Datum) -> t.Datum:
    """PROTOCOL.md 9.8: the forward pass sends only target_tokens and weights (zeros if absent)."""
    targets = datum.loss_fn_inputs["target_tokens"]
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        weights = t.TensorData.from_numpy(np.zeros(targets.resolved_shape(), dtype=np.float32))
    return t.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


@dataclass(frozen=True)
class LossResult:
    """What one run of the user's loss gave: its value, backward weights and metrics."""

    loss: float
    weights: list[npt.NDArray[np.float32]]
    """-(d loss / d logprobs), one array per datum: the backward pass's cross-entropy weights."""
    metrics: dict[str, float]


class CustomLossCall:
    """One `forward_backward_custom` call: runs the loss once, feeds every backward chunk.

    The backward chunks' bodies are built by the sender task when their turn comes; the first
    one waits for the forward pass and runs the loss, the others reuse its `LossResult`.
    """

    def __init__(
        self,
        loss_fn: CustomLossFn,
        data: Sequence[t.Datum],
        forward: list[APIFuture[t.ForwardBackwardOutput]],
        tensors: TensorKind,
    ) -> None:
        self._loss_fn = loss_fn
        self._data = list(data)
        self._forward = forward
        self._tensors = tensors
        self._lock = trio.Lock()
        self._result: LossResult | None = None

    async def result(self) -> LossResult:
        """The loss, computed once from the forward pass's logprobs."""
        async with self._lock:
            if self._result is None:
                outputs = [await f for f in self._forward]
                logprobs = [
                    o["logprobs"].to_numpy() for out in outputs for o in out.loss_fn_outputs
                ]
                self._result = run_loss(self._loss_fn, self._data, logprobs, self._tensors)
            return self._result

    def backward_body(self, model_id: str, seq_id: int, chunk: list[t.Datum], start: int) -> BodyFn:
        """The body of the backward chunk holding datums ``start, start + 1, ...``."""

        async def build() -> bytes | FwdBwdChunk:
            weights = (await self.result()).weights
            data = [
                t.Datum(
                    model_input=d.model_input,
                    loss_fn_inputs={
                        "target_tokens": d.loss_fn_inputs["target_tokens"],
                        "weights": t.TensorData.from_numpy(weights[start + j]),
                    },
                )
                for j, d in enumerate(chunk)
            ]
            return FwdBwdChunk(model_id, seq_id, data, "cross_entropy", None, False)

        return build

    async def finish(
        self, backward: list[APIFuture[t.ForwardBackwardOutput]]
    ) -> t.ForwardBackwardOutput:
        """The call's result (9.8 step 5): the forward outputs, the server's loss renamed
        ``surrogate_loss:sum``, ``loss:sum`` the custom loss, the loss's metrics merged in."""
        merged = merge_outputs([await f for f in backward])
        result = await self.result()
        metrics = dict(merged.metrics)
        if "loss:sum" in metrics:
            metrics["surrogate_loss:sum"] = metrics.pop("loss:sum")
        metrics["loss:sum"] = result.loss
        metrics.update(result.metrics)
        return t.ForwardBackwardOutput(
            loss_fn_output_type=merged.loss_fn_output_type,
            loss_fn_outputs=[o for f in self._forward for o in (await f).loss_fn_outputs],
            metrics=metrics,
        )


def run_loss(
    loss_fn: CustomLossFn,
    data: list[t.Datum],
    logprobs: list[npt.NDArray[Any]],
    tensors: TensorKind,
) -> LossResult:
    """Run the user's loss under the ``tensors`` contract (module docstring).

    Raises:
        TypeError / ValueError: the loss returned something the contract does not allow
            (the message says what was expected); the caller poisons the client with it.
    """
    if tensors == "torch":
        loss, grads, metrics = _run_torch(loss_fn, data, logprobs)
    else:
        loss, grads, metrics = _run_numpy(loss_fn, data, logprobs)
    return LossResult(
        loss=loss,
        weights=[-g.astype(np.float32, copy=False) for g in grads],
        metrics=_metrics(metrics),
    )


def _run_numpy(
    loss_fn: CustomLossFn, data: list[t.Datum], logprobs: list[npt.NDArray[Any]]
) -> tuple[float, list[npt.NDArray[Any]], object]:
    result = loss_fn(data, logprobs)
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(
            "a numpy custom loss must return (loss, grads, metrics), grads being d loss / d "
            f'logprobs per datum; got {type(result).__name__} (for torch tensors pass tensors="torch")'
        )
    loss, grads, metrics = result
    if not isinstance(grads, list | tuple | np.ndarray) or len(grads) != len(logprobs):
        raise ValueError(
            f"the custom loss returned {_count(grads)} gradients for {len(logprobs)} datums"
        )
    arrays = []
    for i, (grad, lp) in enumerate(zip(grads, logprobs, strict=True)):
        array = np.asarray(grad, dtype=np.float32)
        if array.shape != lp.shape:
            raise ValueError(
                f"the custom loss's grads[{i}] has shape {array.shape}, but logprobs[{i}] has "
                f"shape {lp.shape}"
            )
        arrays.append(array)
    return _number("loss", loss), arrays, metrics


def _run_torch(
    loss_fn: CustomLossFn, data: list[t.Datum], logprobs: list[npt.NDArray[Any]]
) -> tuple[float, list[npt.NDArray[Any]], object]:
    torch: Any = importlib.import_module("torch")  # asked for: tensors="torch"
    inputs = [torch.tensor(lp, dtype=torch.float32, requires_grad=True) for lp in logprobs]
    result = loss_fn(data, inputs)
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], torch.Tensor)
        or result[0].numel() != 1
    ):
        raise TypeError(
            'a custom loss with tensors="torch" must return (loss_tensor, metrics), the loss '
            f"a one-element tensor; got {type(result).__name__}"
        )
    loss, metrics = result
    loss.backward()
    grads = [
        (x.grad if x.grad is not None else torch.zeros_like(x)).detach().numpy() for x in inputs
    ]
    return _number("loss", loss.detach().item()), grads, metrics


def _number(name: str, value: object) -> float:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(f"the custom loss's {name} must be a number, got {type(value).__name__}")
    return float(value)


def _metrics(metrics: object) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"the custom loss's metrics must be a dict of numbers, got {type(metrics).__name__}"
        )
    return {str(key): _number(f"metrics[{key!r}]", value) for key, value in metrics.items()}


def _count(grads: object) -> str:
    if isinstance(grads, list | tuple | np.ndarray):
        return str(len(grads))
    return f"a {type(grads).__name__} instead of"
