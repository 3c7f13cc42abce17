"""The interpreter of server-side custom losses (PROTOCOL.md 8.8): a checked `CustomLoss`
(`local/_custom_graph.py`) run on one datum's tensors.

Every name a graph may use maps to a function object in the tables below, built once from
explicit names; nothing is looked up by a string from the request, so a graph can call
nothing outside them. At run time each node is also guarded:

* a method is only called on a tensor; `getattr` only reads `shape`/`ndim`/`dtype` of one;
* `operator.*` arithmetic takes tensors and Python numbers only (no sequence repetition or
  string building), integer powers are bounded, and integer results stay within int64;
* no tensor may exceed `MAX_ELEMENTS` elements, checked before a broadcasting call and after
  every node, so a graph cannot exhaust memory by broadcasting [T, 1, 1] * [1, T, 1] * ...;
* any exception a node raises becomes an `EngineUserError` naming the node and its op.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import torch
import torch.nn.functional as F

from .._custom_graph import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_FUNCTIONS,
    ALLOWED_METHODS,
    MATH_FUNCTIONS,
    OPERATOR_FUNCTIONS,
    TORCH_FUNCTIONS,
    CustomLoss,
    GraphNode,
    Ref,
    SliceArg,
    TorchConstant,
)
from .._engine_api import EngineUserError

MAX_ELEMENTS: Final = 1 << 24
"""Largest tensor (elements) a custom loss may create: 64 MiB of float32."""
MAX_TOTAL_ELEMENTS: Final = 1 << 26
"""Most elements all the tensors one run of a graph (one datum) creates may hold together:
autograd keeps intermediates alive until the backward pass, so the per-tensor bound alone
would let 512 nodes hold 512 times as much."""
_MAX_INT_EXPONENT: Final = 64
_INT_BOUND: Final = 2**63


def _table() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    # Names from the server's constant allowlist, never from a request.
    for name in OPERATOR_FUNCTIONS:
        table[f"operator.{name}"] = getattr(operator, name)
    for name in TORCH_FUNCTIONS:
        table[f"torch.{name}"] = getattr(torch, name)
    for name in MATH_FUNCTIONS:
        table[f"math.{name}"] = getattr(math, name)
    table["getattr"] = getattr
    table["torch.nn.functional.log_softmax"] = F.log_softmax
    table["torch.nn.functional.softmax"] = F.softmax
    table["torch.nn.functional.relu"] = F.relu
    table["torch.nn.functional.sigmoid"] = F.sigmoid
    table["torch._C._nn.softplus"] = F.softplus
    table["torch._C._nn.log_sigmoid"] = F.logsigmoid
    return table


FUNCTIONS: Final[Mapping[str, Callable[..., Any]]] = _table()
METHODS: Final[Mapping[str, Callable[..., Any]]] = {
    name: getattr(torch.Tensor, name) for name in sorted(ALLOWED_METHODS)
}
if set(FUNCTIONS) != ALLOWED_FUNCTIONS:  # the server's allowlist and this table must agree
    raise ImportError(
        f"custom-loss function tables disagree: {sorted(set(FUNCTIONS) ^ ALLOWED_FUNCTIONS)}"
    )

_CONSTANTS: Final[Mapping[tuple[str, str], object]] = {
    ("dtype", "float32"): torch.float32,
    ("dtype", "float64"): torch.float64,
    ("dtype", "float16"): torch.float16,
    ("dtype", "bfloat16"): torch.bfloat16,
    ("dtype", "int64"): torch.int64,
    ("dtype", "int32"): torch.int32,
    ("dtype", "bool"): torch.bool,
    ("device", "cpu"): torch.device("cpu"),
    ("layout", "strided"): torch.strided,
    ("memory_format", "contiguous_format"): torch.contiguous_format,
    ("memory_format", "preserve_format"): torch.preserve_format,
}
_NUMBER = (bool, int, float)
_OPERAND = (torch.Tensor, bool, int, float)


class _Run:
    """The values of one graph run, by node name."""

    def __init__(self, loss: CustomLoss) -> None:
        self.loss = loss
        self.env: dict[str, Any] = {}
        self.created = 0  # elements of the tensors the nodes created so far

    def fail(self, node: GraphNode, problem: str) -> EngineUserError:
        return EngineUserError(
            f"custom loss {self.loss.name!r} ({self.loss.loss_id}): node {node.name!r} "
            f"({node.op} {node.target!r}) {problem}"
        )

    def resolve(self, value: Any) -> Any:
        if isinstance(value, Ref):
            return self.env[value.name]
        if isinstance(value, tuple):
            return tuple(self.resolve(v) for v in value)
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, SliceArg):
            return slice(
                self.resolve(value.start), self.resolve(value.stop), self.resolve(value.step)
            )
        if isinstance(value, TorchConstant):
            return _CONSTANTS[(value.kind, value.value)]
        return value

    def guard(self, node: GraphNode, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        target = node.target
        if node.op == "call_method" and not isinstance(args[0], torch.Tensor):
            raise self.fail(node, f"calls a tensor method on a {type(args[0]).__name__}")
        if target == "getattr" and (
            not isinstance(args[0], torch.Tensor)
            or not isinstance(args[1], str)
            or args[1] not in ALLOWED_ATTRIBUTES
        ):
            raise self.fail(node, "may only read shape, ndim or dtype of a tensor")
        if target.startswith("operator.") and target != "operator.getitem":
            bad = next((a for a in args if not isinstance(a, _OPERAND)), None)
            if bad is not None or kwargs:
                raise self.fail(
                    node, f"applies arithmetic to a {type(bad).__name__}; use tensors or numbers"
                )
            if (
                target == "operator.pow"
                and all(isinstance(a, int) for a in args)
                and abs(args[1]) > _MAX_INT_EXPONENT
            ):
                raise self.fail(node, f"raises an integer to a power above {_MAX_INT_EXPONENT}")
        if target.startswith("math.") and not all(isinstance(a, _NUMBER) for a in args):
            raise self.fail(node, "calls a math function on something other than a number")
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if len(tensors) >= 2:
            try:
                shape = torch.broadcast_shapes(*(t.shape for t in tensors))  # type: ignore[no-untyped-call]
            except RuntimeError:
                return  # not a broadcasting call (cat, gather, ...): checked after it runs
            if math.prod(shape) > MAX_ELEMENTS:
                raise self.fail(
                    node, f"would create a tensor of shape {list(shape)} (over {MAX_ELEMENTS})"
                )

    def check_value(self, node: GraphNode, value: Any) -> None:
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                if item.numel() > MAX_ELEMENTS:
                    raise self.fail(
                        node, f"created a tensor of {item.numel()} elements (over {MAX_ELEMENTS})"
                    )
                self.created += item.numel()
                if self.created > MAX_TOTAL_ELEMENTS:
                    raise self.fail(
                        node,
                        f"brings the tensors of one datum over {MAX_TOTAL_ELEMENTS} elements",
                    )
            if isinstance(item, int) and not -_INT_BOUND < item < _INT_BOUND:
                raise self.fail(node, "computed an integer outside int64")

    def call(self, node: GraphNode) -> Any:
        args = self.resolve(node.args)
        kwargs = self.resolve(node.kwargs)
        self.guard(node, args, kwargs)
        fn = METHODS[node.target] if node.op == "call_method" else FUNCTIONS[node.target]
        try:
            value = fn(*args, **kwargs)
        except EngineUserError:
            raise
        except Exception as exc:
            raise self.fail(node, f"failed: {type(exc).__name__}: {exc}") from None
        self.check_value(node, value)
        return value


def run_graph(
    loss: CustomLoss, values: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `loss` on one datum: `values` are logprobs, then the named inputs in order.

    Returns the scalar loss and the metric tensors (one element each).
    """
    if len(values) != len(loss.inputs):
        raise ValueError(f"run_graph needs {len(loss.inputs)} inputs, got {len(values)}")
    run = _Run(loss)
    placeholders = iter(values)
    for node in loss.nodes:
        if node.op == "placeholder":
            run.env[node.name] = next(placeholders)
        elif node.op == "output":
            return _output(run, node)
        else:
            run.env[node.name] = run.call(node)
    raise ValueError("a checked custom loss always ends with its output node")


def _output(run: _Run, node: GraphNode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_value, metrics = run.resolve(node.args[0])
    if not (isinstance(loss_value, torch.Tensor) and loss_value.ndim == 0):
        shape = list(loss_value.shape) if isinstance(loss_value, torch.Tensor) else None
        raise run.fail(
            node, f"must return a scalar loss tensor, got {type(loss_value).__name__} {shape}"
        )
    if not loss_value.is_floating_point():
        raise run.fail(node, f"must return a floating-point loss, got {loss_value.dtype}")
    out: dict[str, torch.Tensor] = {}
    for key, value in metrics.items():
        tensor = value if isinstance(value, torch.Tensor) else None
        if isinstance(value, _NUMBER):
            tensor = torch.tensor(float(value))
        if tensor is None or tensor.numel() != 1:
            raise run.fail(node, f"must return metric {key!r} as a one-element tensor")
        out[key] = tensor.detach().reshape(())
    return loss_value, out
