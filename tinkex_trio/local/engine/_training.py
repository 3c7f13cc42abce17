"""forward / forward_backward over micro-batches, accumulating gradients.

The `[tokens, vocab]` logits dominate memory (49152 floats per token; `Llama.target_logprobs`
keeps one such buffer, the softmax, for the backward pass), so a call's datums are packed into
micro-batches of at most `max_tokens` padded tokens each, every micro-batch is run forward and backward, and the
gradients add up in the adapter's `.grad`. Since each loss is a plain sum over datums, the
result equals one big batch up to float rounding.

Datums are sorted by length before packing so padding stays small; right padding is safe
because attention is causal and only real positions enter the loss.

The losses (`_losses.datum_loss`) receive, per datum, `lp`: a float32 tensor [N] of the
learner's log-probs of `target_tokens`, differentiable; any function of it may be the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .._engine_api import LossName
from ._llama import LinearHook, Llama
from ._losses import LossInputs, datum_loss


@dataclass
class PreparedDatum:
    tokens: torch.Tensor  # int64 [N]
    inputs: LossInputs


def pack_microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group datum indices so that rows x longest row <= max_tokens (a longer datum goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def run_forward_backward(
    model: Llama,
    hook: LinearHook | None,
    data: Sequence[PreparedDatum],
    loss_fn: LossName,
    config: Mapping[str, float],
    *,
    forward_only: bool,
    max_tokens: int,
) -> tuple[list[npt.NDArray[np.float32]], float]:
    """Return per-datum learner logprobs (input order) and the summed loss."""
    logprobs: list[npt.NDArray[np.float32]] = [np.zeros(0, np.float32)] * len(data)
    total = 0.0
    lengths = [int(d.tokens.numel()) for d in data]
    for batch in pack_microbatches(lengths, max_tokens):
        width = max(lengths[i] for i in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.int64)
        targets = torch.zeros(len(batch), width, dtype=torch.int64)
        valid = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, index in enumerate(batch):
            n = lengths[index]
            tokens[row, :n] = data[index].tokens
            targets[row, :n] = data[index].inputs.target_tokens
            valid[row, :n] = True
        with torch.set_grad_enabled(not forward_only):
            hidden = model.hidden_states(tokens, hook)
            # Only the real positions, and only their targets' log-probs: padding would waste
            # [pad, vocab] logits, and the full log-softmax is never needed.
            lp_flat = model.target_logprobs(hidden[valid], targets[valid], hook)
            lp_numpy = lp_flat.detach().numpy()
            offsets = np.cumsum([0] + [lengths[i] for i in batch])
            loss = lp_flat.new_zeros(())
            for row, index in enumerate(batch):
                lp = lp_flat[offsets[row] : offsets[row + 1]]
                loss = loss + datum_loss(loss_fn, lp, data[index].inputs, config)
                logprobs[index] = lp_numpy[offsets[row] : offsets[row + 1]].copy()
            if not forward_only and loss.requires_grad:
                loss.backward()  # type: ignore[no-untyped-call]
        total += float(loss.detach())
    return logprobs, total
