"""forward / forward_backward with a server-side custom loss (PROTOCOL.md 8.8).

Like `_training.run_forward_backward` (micro-batches of at most `max_tokens` padded tokens,
gradients accumulating in the adapter), but each datum's loss is the stored graph run by
`_graph_loss.run_graph` on the datum's learner log-probs and named inputs, and `target_tokens`
may be [N, K]: the log-probs of K candidate tokens per position, which the built-in losses
never need. Kept apart so the built-in losses' hot path stays as it is.

A user error in a later micro-batch (a node failing, a non-finite loss) must not leave the
earlier micro-batches' gradients behind, so the adapter's gradients are restored to what they
were before the call whenever the call fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .._custom_graph import CustomLoss
from .._engine_api import DatumArrays, EngineUserError
from ._graph_loss import run_graph
from ._llama import LinearHook, Llama, LlamaConfig
from ._models import check_tokens
from ._training import pack_microbatches


@dataclass
class CustomDatum:
    tokens: torch.Tensor  # int64 [N], the model input
    targets: torch.Tensor  # int64 [N] or [N, K]
    inputs: list[torch.Tensor]  # the loss's named inputs, in its order


@dataclass
class CustomResult:
    logprobs: list[npt.NDArray[np.float32]]  # each with its datum's target shape
    metrics: dict[str, float]


def custom_datum(
    datum: DatumArrays, index: int, loss: CustomLoss, config: LlamaConfig
) -> CustomDatum:
    """One datum as tensors, re-checked against the loss's declared ranks (the server checked
    them already; the engine does not trust its caller with shapes)."""
    where = f"data[{index}]"
    tokens = torch.from_numpy(np.asarray(datum.tokens, dtype=np.int64))
    check_tokens(tokens, config, f"{where}.tokens")
    n = int(tokens.numel())
    targets_array = np.asarray(datum.loss_fn_inputs["target_tokens"])
    rank = loss.inputs[0].rank
    if targets_array.dtype.kind not in "iu" or targets_array.ndim != rank:
        raise EngineUserError(
            f"{where}.loss_fn_inputs['target_tokens'] must be int64 of rank {rank}"
        )
    targets = torch.from_numpy(targets_array.astype(np.int64))
    if targets.shape[0] != n or targets.numel() == 0:
        raise EngineUserError(
            f"{where}.loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"it needs {n} rows (one per input token)"
        )
    if int(targets.min()) < 0 or int(targets.max()) >= config.vocab_size:
        raise EngineUserError(
            f"{where}.loss_fn_inputs['target_tokens'] has ids outside the vocabulary "
            f"[0, {config.vocab_size})"
        )
    inputs = []
    for spec in loss.inputs[1:]:
        array = np.asarray(datum.loss_fn_inputs[spec.name])
        if array.ndim != spec.rank:
            raise EngineUserError(
                f"{where}.loss_fn_inputs[{spec.name!r}] has rank {array.ndim}, but the loss "
                f"declares rank {spec.rank}"
            )
        inputs.append(torch.from_numpy(np.array(array, copy=True)))
    return CustomDatum(tokens, targets, inputs)


def reduce_metrics(
    loss: CustomLoss, total: float, sums: dict[str, float], datums: int
) -> dict[str, float]:
    """`loss:sum` plus the loss's metrics: `:sum` keys summed, `:mean` keys divided by the
    number of datums (the SDK's client-side rule)."""
    metrics = {"loss:sum": total}
    for key in loss.metric_keys:
        metrics[key] = sums[key] / datums if key.endswith(":mean") else sums[key]
    return metrics


def _batch_logprobs(logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """log softmax(logits) at every datum's candidates: [rows, K_max], one gather for the
    whole micro-batch (a gather per datum slice would make backward zero-fill a full-size
    [rows, vocab] gradient per datum). Rank-1 targets count as K = 1; padding picks token 0
    and is never read."""
    width = max(1 if t.ndim == 1 else int(t.shape[1]) for t in targets)
    index = torch.zeros(logits.shape[0], width, dtype=torch.int64)
    row = 0
    for t in targets:
        flat = t.reshape(t.shape[0], -1)
        index[row : row + flat.shape[0], : flat.shape[1]] = flat
        row += flat.shape[0]
    return logits.gather(-1, index) - torch.logsumexp(logits, dim=-1, keepdim=True)


def run_custom_forward_backward(
    model: Llama,
    hook: LinearHook | None,
    params: Sequence[torch.Tensor],
    data: Sequence[CustomDatum],
    loss: CustomLoss,
    *,
    forward_only: bool,
    max_tokens: int,
) -> CustomResult:
    """Run `loss` on every datum, summed; backpropagate into `params` unless `forward_only`."""
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    try:
        return _run(model, hook, data, loss, forward_only=forward_only, max_tokens=max_tokens)
    except BaseException:
        if not forward_only:
            for param, grad in zip(params, saved, strict=True):
                param.grad = grad
        raise


def _run(
    model: Llama,
    hook: LinearHook | None,
    data: Sequence[CustomDatum],
    loss: CustomLoss,
    *,
    forward_only: bool,
    max_tokens: int,
) -> CustomResult:
    logprobs: list[npt.NDArray[np.float32]] = [np.zeros(0, np.float32)] * len(data)
    sums = dict.fromkeys(loss.metric_keys, 0.0)
    total = 0.0
    lengths = [int(d.tokens.numel()) for d in data]
    for batch in pack_microbatches(lengths, max_tokens):
        width = max(lengths[i] for i in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.int64)
        valid = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, index in enumerate(batch):
            tokens[row, : lengths[index]] = data[index].tokens
            valid[row, : lengths[index]] = True
        with torch.set_grad_enabled(not forward_only):
            logits = model.logits(model.hidden_states(tokens, hook)[valid], hook)
            all_lp = _batch_logprobs(logits, [data[i].targets for i in batch])
            offsets = np.cumsum([0] + [lengths[i] for i in batch])
            batch_loss = logits.new_zeros(())
            for row, index in enumerate(batch):
                datum = data[index]
                rows = all_lp[offsets[row] : offsets[row + 1]]
                k = 1 if datum.targets.ndim == 1 else int(datum.targets.shape[1])
                lp = rows[:, :k].reshape(datum.targets.shape)
                value, metrics = run_graph(loss, [lp, *datum.inputs])
                if not bool(torch.isfinite(value.detach())):
                    raise EngineUserError(
                        f"custom loss {loss.name!r} is {float(value.detach())} for data[{index}]; "
                        "a loss must be finite to be trained on"
                    )
                batch_loss = batch_loss + value
                for key, metric in metrics.items():
                    sums[key] += float(metric)
                logprobs[index] = lp.detach().numpy().astype(np.float32, copy=True)
            if not forward_only and batch_loss.requires_grad:
                batch_loss.backward()  # type: ignore[no-untyped-call]
        total += float(batch_loss.detach())
    return CustomResult(logprobs, reduce_metrics(loss, total, sums, len(data)))
