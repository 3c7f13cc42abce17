"""Reduction of forward/forward_backward metrics across chunks (PROTOCOL.md 9.2, A.7.5).

Every metric key is `<name>:<reduction>`. Keys come from the first chunk; a key missing from
any chunk is dropped, as is an unknown reduction. Chunk weights are the number of per-datum
outputs each chunk returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

_U64: Final = 2**64


def _weighted_mean(values: Sequence[float], weights: Sequence[int], key: str) -> float:
    total = sum(weights)
    if total == 0:
        raise ValueError(
            f"cannot reduce {key!r}: every chunk returned zero loss_fn_outputs, so a weighted "
            "mean is undefined (the server must return one output per datum)"
        )
    return sum(w * v for w, v in zip(weights, values, strict=True)) / total


def reduce_metrics(chunks: Sequence[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Combine `(metrics, n_outputs)` of each chunk, in order, into one metrics dict.

    Raises:
        ValueError: a key without exactly one `:` (PROTOCOL.md 9.2 makes that an error), or a
            `:mean` whose chunks all returned zero outputs.
    """
    if not chunks:
        return {}
    first, _ = chunks[0]
    weights = [n for _, n in chunks]
    out: dict[str, float] = {}
    for key in first:
        if key.count(":") != 1:
            raise ValueError(f"metric key {key!r} must be '<name>:<reduction>' with one ':'")
        if any(key not in metrics for metrics, _ in chunks):
            continue
        values = [metrics[key] for metrics, _ in chunks]
        reduction = key.split(":", 1)[1]
        if reduction == "sum":
            out[key] = float(sum(values))
        elif reduction == "mean":
            out[key] = _weighted_mean(values, weights, key)
        elif reduction == "min":
            out[key] = float(min(values))
        elif reduction == "max":
            out[key] = float(max(values))
        elif reduction == "slack":
            out[key] = float(max(values)) - _weighted_mean(values, weights, key)
        elif reduction == "hash2":
            out[key] = float(sum(int(v) % _U64 for v in values) % _U64)
        elif reduction == "hash_unordered":
            out[key] = float(hash(tuple(sorted(int(v) for v in values))))
        elif reduction == "unique":
            out[key] = values[0]
            for i, value in enumerate(values[1:], start=1):
                out[f"{key}_{i}"] = value
    return out
