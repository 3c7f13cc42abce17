"""Server-side custom losses: the uploaded torch.fx graph, checked and rebuilt as plain data.

The official SDK 0.38 uploads a traced per-datum loss with `POST /create_custom_loss`
(PROTOCOL.md 3.2, 8.8): nodes `placeholder`, `call_function`, `call_method` and `output`, with
arguments in a small JSON encoding. Nothing in it is executable. `compile_custom_loss` checks
every node against the explicit allowlists below and turns the graph into a `CustomLoss`: frozen
dataclasses, no torch, no callables. The engine (`engine/_graph_loss.py`) maps each allowed name
to its own function object; there is no attribute walking, import or eval anywhere, so a target
such as `builtins.eval`, `os.system` or `torch.Tensor.__class__` is simply not a key.

Refused at upload, as a 4xx `user` error naming the node and the op: `get_attr` (a captured
tensor) and `call_module` nodes, any function or method outside the allowlist, `getattr` of an
attribute other than `shape`/`ndim`/`dtype`, an `out=` keyword, references to unknown or later
nodes, more than `MAX_NODES` nodes, too deep or too many literal arguments, and metric keys
that are not `custom/<lowercase name>:(sum|mean)`.

This module is torch-free, like the rest of the server; the engine's interpreter asserts at
import time that it implements exactly these names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from tinkex_trio.types._custom_loss import CreateCustomLossRequest, CustomLossNode

from ._engine_api import EngineUserError

#: Most nodes in one graph (placeholders and output included). A PPO-style loss is ~30 nodes.
MAX_NODES: Final = 512
#: Most inputs, `logprobs` included (the SDK's own limit).
MAX_INPUTS: Final = 16
#: Most metrics one loss returns.
MAX_METRICS: Final = 64
#: Deepest nesting of tuples/lists/dicts/slices in one argument.
MAX_ARG_DEPTH: Final = 8
#: Most literal values (numbers, strings, constants) in all arguments of one graph together.
MAX_LITERALS: Final = 4096
#: Longest string literal (dim names, einsum-free kwargs such as `reduction`).
MAX_STRING: Final = 256
_INT_BOUND: Final = 2**63

CUSTOM_LOSS_FN: Final = "custom"
"""The `loss_fn` of a forward_backward that runs a stored loss (PROTOCOL.md 8.8)."""

_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_KWARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
METRIC_KEY: Final = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
"""Metric keys a custom loss may return (the SDK's rule: the suffix says how they combine)."""

OPERATOR_FUNCTIONS: Final = tuple(
    (
        "add sub mul truediv floordiv mod pow neg pos abs getitem eq ne lt le gt ge and_ or_ xor "
        "invert"
    ).split()
)
TORCH_FUNCTIONS: Final = tuple(
    (
        "exp log log1p expm1 log2 exp2 sqrt rsqrt square abs neg sign sigmoid tanh relu reciprocal "
        "clamp clip clamp_min clamp_max where minimum maximum min max sum mean prod amax amin "
        "logsumexp logaddexp softmax log_softmax detach zeros_like ones_like full_like stack cat "
        "gather nan_to_num isfinite isnan lt le gt ge eq ne logical_and logical_or logical_not mul "
        "add sub div pow cumsum masked_fill"
    ).split()
)
MATH_FUNCTIONS: Final = tuple("log log1p exp expm1 sqrt tanh fabs floor ceil".split())
ALLOWED_FUNCTIONS: Final[frozenset[str]] = frozenset(
    [f"operator.{n}" for n in OPERATOR_FUNCTIONS]
    + [f"torch.{n}" for n in TORCH_FUNCTIONS]
    + [f"math.{n}" for n in MATH_FUNCTIONS]
    + [
        "getattr",  # only for the attributes below (fx records `x.shape` this way)
        "torch.nn.functional.log_softmax",
        "torch.nn.functional.softmax",
        "torch.nn.functional.relu",
        "torch.nn.functional.sigmoid",
        "torch._C._nn.softplus",  # torch.nn.functional.softplus, as fx names it
        "torch._C._nn.log_sigmoid",  # torch.nn.functional.logsigmoid
    ]
)
"""Functions a graph may call, by the qualified name the SDK sends (`torch.exp`)."""

ALLOWED_METHODS: Final[frozenset[str]] = frozenset(
    (
        "sum mean prod exp log log1p expm1 sqrt rsqrt square abs neg sign sigmoid tanh relu "
        "reciprocal clamp clip clamp_min clamp_max detach float double long int bool to type_as "
        "unsqueeze squeeze view reshape flatten transpose t permute contiguous size dim numel "
        "__getitem__ pow mul add sub div minimum maximum min max amax amin logsumexp softmax "
        "log_softmax gather masked_fill where cumsum lt le gt ge eq ne logical_not logical_and "
        "logical_or isfinite isnan nan_to_num"
    ).split()
)
"""`torch.Tensor` methods a graph may call (none in-place, none leaving torch)."""

ALLOWED_ATTRIBUTES: Final[frozenset[str]] = frozenset({"shape", "ndim", "dtype"})
"""Attributes `getattr` may read, and only of a tensor."""

TORCH_CONSTANTS: Final[dict[str, frozenset[str]]] = {
    "dtype": frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"}),
    "device": frozenset({"cpu"}),
    "layout": frozenset({"strided"}),
    "memory_format": frozenset({"contiguous_format", "preserve_format"}),
}
"""The `{"dtype": ...}`-style constants an argument may name (PROTOCOL.md 3.2)."""

ConstantKind = Literal["dtype", "device", "layout", "memory_format"]


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of an earlier node."""

    name: str


@dataclass(frozen=True)
class TorchConstant:
    """A torch dtype/device/layout/memory format, by its allowlisted name."""

    kind: ConstantKind
    value: str


@dataclass(frozen=True)
class SliceArg:
    """`start:stop:step`; each part a literal, None or a `Ref`."""

    start: Any
    stop: Any
    step: Any


@dataclass(frozen=True)
class GraphNode:
    """A checked node; `args`/`kwargs` hold literals, tuples, lists, dicts, `Ref`, `SliceArg`,
    `TorchConstant` and `Ellipsis`."""

    op: Literal["placeholder", "call_function", "call_method", "output"]
    name: str
    target: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class LossInput:
    name: str
    rank: int


@dataclass(frozen=True)
class CustomLoss:
    """A stored, checked loss: what the engine interprets for `loss_fn: "custom"`."""

    loss_id: str
    name: str
    inputs: tuple[LossInput, ...]  # logprobs first
    nodes: tuple[GraphNode, ...]  # execution order; the last is the output
    metric_keys: tuple[str, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        """The `loss_fn_inputs` keys the loss reads, in order (logprobs excluded)."""
        return tuple(i.name for i in self.inputs[1:])


class _Decoder:
    """Decodes one graph's arguments, counting literals and checking references."""

    def __init__(self, loss_name: str) -> None:
        self.loss_name = loss_name
        self.known: set[str] = set()
        self.literals = 0

    def fail(self, node: CustomLossNode, problem: str) -> EngineUserError:
        return EngineUserError(
            f"create_custom_loss {self.loss_name!r}: node {node.name!r} "
            f"({node.op} {node.target!r}) {problem}"
        )

    def literal(self, node: CustomLossNode) -> None:
        self.literals += 1
        if self.literals > MAX_LITERALS:
            raise self.fail(node, f"brings the graph over {MAX_LITERALS} literal arguments")

    def arg(self, node: CustomLossNode, value: Any, depth: int = 0) -> Any:
        if depth > MAX_ARG_DEPTH:
            raise self.fail(node, f"nests arguments deeper than {MAX_ARG_DEPTH} levels")
        if value is None or isinstance(value, bool | float):
            self.literal(node)
            return value
        if isinstance(value, int):
            self.literal(node)
            if not -_INT_BOUND < value < _INT_BOUND:
                raise self.fail(node, f"has an integer argument outside int64: {value}")
            return value
        if isinstance(value, str):
            self.literal(node)
            if len(value) > MAX_STRING:
                raise self.fail(node, f"has a string argument longer than {MAX_STRING}")
            return value
        if isinstance(value, list):
            return [self.arg(node, v, depth + 1) for v in value]
        if not (isinstance(value, dict) and len(value) == 1):
            raise self.fail(node, f"has an argument that is not a valid encoding: {value!r:.80}")
        ((kind, inner),) = value.items()
        if kind == "ref":
            if not isinstance(inner, str) or inner not in self.known:
                raise self.fail(node, f"refers to {inner!r}, which is not an earlier node")
            return Ref(inner)
        if kind == "tuple" and isinstance(inner, list):
            return tuple(self.arg(node, v, depth + 1) for v in inner)
        if kind == "dict" and isinstance(inner, dict):
            return {str(k): self.arg(node, v, depth + 1) for k, v in inner.items()}
        if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
            start, stop, step = (self.arg(node, v, depth + 1) for v in inner)
            return SliceArg(start, stop, step)
        if kind == "ellipsis" and inner is True:
            return Ellipsis
        if kind == "float" and inner in ("inf", "-inf", "nan"):
            self.literal(node)
            return float(inner)
        if kind in TORCH_CONSTANTS:
            if not isinstance(inner, str) or inner not in TORCH_CONSTANTS[kind]:
                raise self.fail(
                    node,
                    f"names {kind} {inner!r:.80}; allowed: {sorted(TORCH_CONSTANTS[kind])}",
                )
            self.literal(node)
            constant_kind: ConstantKind = kind
            return TorchConstant(constant_kind, inner)
        raise self.fail(node, f"has an argument that is not a valid encoding: {value!r:.80}")


def _check_inputs(body: CreateCustomLossRequest) -> tuple[LossInput, ...]:
    name = body.name
    if not 1 <= len(body.inputs) <= MAX_INPUTS:
        raise EngineUserError(
            f"create_custom_loss {name!r}: inputs must list 1 to {MAX_INPUTS} inputs "
            f"(logprobs first), got {len(body.inputs)}"
        )
    first = body.inputs[0]
    if first.name != "logprobs" or first.rank not in (1, 2):
        raise EngineUserError(
            f"create_custom_loss {name!r}: the first input must be logprobs with rank 1 ([T]) "
            f"or 2 ([T, K]), got {first.name!r} with rank {first.rank}"
        )
    seen: set[str] = set()
    for item in body.inputs:
        if not _INPUT_NAME.fullmatch(item.name) or item.name in seen:
            raise EngineUserError(
                f"create_custom_loss {name!r}: input {item.name!r} must be a unique lowercase "
                "name of letters, digits and underscores"
            )
        seen.add(item.name)
    return tuple(LossInput(i.name, i.rank) for i in body.inputs)


def _check_target(decoder: _Decoder, node: CustomLossNode) -> None:
    if node.op == "get_attr":
        raise decoder.fail(
            node,
            "captures a tensor; a custom loss may only read logprobs and the loss_fn_inputs "
            "it names",
        )
    if node.op == "call_module":
        raise decoder.fail(node, "calls a torch.nn module; custom losses may only call functions")
    if node.op == "call_function" and node.target not in ALLOWED_FUNCTIONS:
        raise decoder.fail(
            node,
            "calls a function outside the local backend's allowlist (torch elementwise and "
            "reduction math, operator.*, math.*; see docs/local_backend.md)",
        )
    if node.op == "call_method" and node.target not in ALLOWED_METHODS:
        raise decoder.fail(
            node,
            "calls a tensor method outside the local backend's allowlist (see "
            "docs/local_backend.md)",
        )
    if "out" in node.kwargs:
        raise decoder.fail(node, "passes out=; custom losses cannot write into tensors")
    bad_kwarg = next((k for k in node.kwargs if not _KWARG_NAME.fullmatch(k)), None)
    if bad_kwarg is not None:
        raise decoder.fail(node, f"has an invalid keyword argument name {bad_kwarg!r:.80}")


def _check_getattr(decoder: _Decoder, node: CustomLossNode, args: Sequence[Any]) -> None:
    if (
        len(args) != 2
        or node.kwargs
        or not isinstance(args[0], Ref)
        or not isinstance(args[1], str)
        or args[1] not in ALLOWED_ATTRIBUTES
    ):
        raise decoder.fail(
            node,
            f"may only read the attributes {sorted(ALLOWED_ATTRIBUTES)} of a node, as "
            "getattr(node, name)",
        )


def _metric_keys(decoder: _Decoder, node: CustomLossNode, output: Any) -> tuple[str, ...]:
    if not (isinstance(output, tuple | list) and len(output) == 2):
        raise decoder.fail(node, "must return (loss, metrics)")
    loss, metrics = output
    if not isinstance(loss, Ref):
        raise decoder.fail(node, "must return its loss as a tensor computed by the graph")
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise decoder.fail(node, f"must return its metrics as a dict of at most {MAX_METRICS}")
    for key, value in metrics.items():
        if not METRIC_KEY.fullmatch(key):
            raise decoder.fail(
                node,
                f"returns metric {key!r:.80}; metric keys must be custom/<name>:sum or "
                "custom/<name>:mean in lowercase",
            )
        if not isinstance(value, Ref):
            raise decoder.fail(node, f"returns metric {key!r} that is not computed by the graph")
    return tuple(metrics)


def compile_custom_loss(body: CreateCustomLossRequest, loss_id: str) -> CustomLoss:
    """Check an uploaded graph and rebuild it as a `CustomLoss`; `EngineUserError` if refused."""
    name = body.name
    if not 1 <= len(name) <= 128 or not name.isprintable():
        raise EngineUserError("create_custom_loss: name must be 1 to 128 printable characters")
    inputs = _check_inputs(body)
    raw_nodes = body.graph.nodes
    if len(raw_nodes) > MAX_NODES:
        raise EngineUserError(
            f"create_custom_loss {name!r}: the graph has {len(raw_nodes)} nodes; the local "
            f"backend accepts at most {MAX_NODES}"
        )
    decoder = _Decoder(name)
    nodes: list[GraphNode] = []
    placeholders: list[str] = []
    metric_keys: tuple[str, ...] | None = None
    for raw in raw_nodes:
        if metric_keys is not None:
            raise decoder.fail(raw, "comes after the output node")
        if not _NODE_NAME.fullmatch(raw.name) or raw.name in decoder.known:
            raise EngineUserError(
                f"create_custom_loss {name!r}: node name {raw.name!r:.80} is not a unique "
                "identifier"
            )
        _check_target(decoder, raw)
        args = tuple(decoder.arg(raw, a) for a in raw.args)
        kwargs = {k: decoder.arg(raw, v) for k, v in raw.kwargs.items()}
        if raw.op == "placeholder":
            index = len(placeholders)
            if nodes and nodes[-1].op != "placeholder":
                raise decoder.fail(raw, "comes after a computation; inputs come first")
            if args or kwargs:
                raise decoder.fail(raw, "has a default value; every input is required")
            if index >= len(inputs) or raw.target != inputs[index].name:
                expected = inputs[index].name if index < len(inputs) else "no more inputs"
                raise decoder.fail(raw, f"does not match the declared inputs (expected {expected})")
            placeholders.append(raw.target)
        elif raw.op == "output":
            if len(args) != 1 or kwargs:
                raise decoder.fail(raw, "must have exactly one argument")
            metric_keys = _metric_keys(decoder, raw, args[0])
        elif raw.op == "call_method" and not args:
            raise decoder.fail(raw, "calls a method without the tensor it is called on")
        elif raw.op == "call_function" and raw.target == "getattr":
            _check_getattr(decoder, raw, args)
        assert raw.op != "get_attr" and raw.op != "call_module"  # refused by _check_target
        nodes.append(GraphNode(raw.op, raw.name, raw.target, args, kwargs))
        decoder.known.add(raw.name)
    if len(placeholders) != len(inputs):
        raise EngineUserError(
            f"create_custom_loss {name!r}: the graph reads {len(placeholders)} inputs but "
            f"{len(inputs)} are declared"
        )
    if metric_keys is None:
        raise EngineUserError(f"create_custom_loss {name!r}: the graph has no output node")
    return CustomLoss(
        loss_id=loss_id, name=name, inputs=inputs, nodes=tuple(nodes), metric_keys=metric_keys
    )


MAX_LOSSES_PER_SESSION: Final = 64
"""Most custom losses one session may store (each at most `MAX_NODES` nodes)."""


@dataclass(frozen=True)
class StoredLoss:
    session_id: str
    seq_id: int
    payload_hash: str  # what makes a resubmission of the seq_id the same upload
    request_id: str  # the future that answered it
    loss: CustomLoss


class CustomLossStore:
    """The checked losses, in memory, per session (bounded by `MAX_LOSSES_PER_SESSION`).

    Losses are not persisted: like a model's in-memory adapter, they do not survive a
    restart, after which `forward_backward` names the unknown `loss_id` in a 4xx.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, StoredLoss] = {}
        self._per_session: dict[str, int] = {}

    @staticmethod
    def loss_id(session_id: str, seq_id: int) -> str:
        return f"{session_id}:loss:{seq_id}"

    def get(self, loss_id: str) -> StoredLoss | None:
        return self._by_id.get(loss_id)

    def count(self, session_id: str) -> int:
        return self._per_session.get(session_id, 0)

    def add(self, stored: StoredLoss) -> None:
        self._by_id[stored.loss.loss_id] = stored
        self._per_session[stored.session_id] = self.count(stored.session_id) + 1
