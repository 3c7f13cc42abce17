"""Custom losses as the official SDK 0.38 uploads them (PROTOCOL.md 3.2 `create_custom_loss`).

`upload_body` traces a per-datum loss with torch.fx and encodes it in the wire form, so the
tests exercise the same graphs a real client sends; the sample losses are the ones the tests
check by hand-written torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name


def encode_arg(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return {"ref": arg.name}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {"float": str(arg)}
    if arg is None or isinstance(arg, bool | int | float | str):
        return arg
    if isinstance(arg, list):
        return [encode_arg(a) for a in arg]
    if isinstance(arg, tuple):
        return {"tuple": [encode_arg(a) for a in arg]}
    if isinstance(arg, dict):
        return {"dict": {k: encode_arg(v) for k, v in arg.items()}}
    if isinstance(arg, slice):
        return {"slice": [encode_arg(arg.start), encode_arg(arg.stop), encode_arg(arg.step)]}
    if arg is Ellipsis:
        return {"ellipsis": True}
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    raise TypeError(f"cannot encode {arg!r}")


def graph_nodes(fn: Callable[..., Any]) -> list[dict[str, Any]]:
    traced = torch.fx.symbolic_trace(fn)
    nodes = []
    for node in traced.graph.nodes:
        if node.op == "call_function":
            target = _get_qualified_name(node.target)
            if target.startswith("_operator."):
                target = "operator." + target.removeprefix("_operator.")
        else:
            target = str(node.target)
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": target,
                "args": [encode_arg(a) for a in node.args],
                "kwargs": {k: encode_arg(v) for k, v in node.kwargs.items()},
            }
        )
    return nodes


def upload_body(
    session_id: str, fn: Callable[..., Any], ranks: Mapping[str, int], seq_id: int = 0
) -> dict[str, Any]:
    """The `create_custom_loss` body of `fn` (its parameters, logprobs first, in order)."""
    names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    return {
        "session_id": session_id,
        "custom_loss_seq_id": seq_id,
        "name": fn.__name__,
        "inputs": [{"name": n, "rank": ranks[n]} for n in names],
        "graph": {"format": 1, "nodes": graph_nodes(fn)},
        "type": "create_custom_loss",
    }


# ----------------------------------------------------------------------------- sample losses


def neg_ll(logprobs: Any, weights: Any) -> Any:
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss, "custom/tokens:mean": weights.sum()}


def ppo_clipped(logprobs: Any, sampler_logprobs: Any, advantages: Any) -> Any:
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    n = logprobs.shape[0]
    clip_fraction = ((ratio - clipped).abs() > 0).float().sum() / n
    return loss, {"custom/ppo:sum": loss.detach(), "custom/clip_fraction:mean": clip_fraction}


def topk_distill(logprobs: Any, teacher: Any) -> Any:
    """logprobs [T, K] of K candidate tokens; teacher probabilities [T, K]."""
    log_norm = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    loss = -(teacher * (logprobs - log_norm)).sum() + F.softplus(logprobs[:, 0]).mean()
    return loss, {"custom/distill:sum": loss}


def scaled(logprobs: Any, scale: Any) -> Any:
    """A rank-0 input."""
    loss = -(logprobs * scale).sum()
    return loss, {"custom/scale:mean": scale}
