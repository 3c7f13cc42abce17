"""The built-in Tinker losses (PROTOCOL.md section 8), summed over tokens.

Notation per token t: `lp` = learner log-prob of `target_tokens[t]` (with gradient), `q` =
sampler log-prob (input `logprobs`), `A` = `advantages`, `r = exp(lp - q)`. Every loss returns
the sum over the datum's tokens; the engine sums over datums.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .._engine_api import EngineUserError, LossName

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
"""PPO/CISPO ratio bounds when the config omits them: the documented epsilon 0.2."""

DEFAULT_DRO_BETA = 0.05
"""DRO's quadratic penalty weight when the config omits `beta`. The Tinker docs give no
default; 0.05 keeps the penalty small next to the advantage term for |lp - q| of order 1,
and is in the range used for the regularisation temperature in the DRO paper's experiments."""

_INT_KEYS = ("target_tokens",)
_REQUIRED: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
# Optional per-token inputs: cross-entropy weights default to 1; per-token clip thresholds
# (the SDK's key table lists them as float32 loss inputs) override the config for ppo/cispo.
_OPTIONAL: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_low_threshold", "clip_high_threshold"),
    "dro": (),
}
_CONFIG_KEYS: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_low_threshold", "clip_high_threshold"),
    "dro": ("beta",),
}


@dataclass
class LossInputs:
    """Validated per-datum loss inputs as tensors (target_tokens int64, the rest float32)."""

    target_tokens: torch.Tensor
    floats: dict[str, torch.Tensor]


def validate_config(loss_fn: str, config: Mapping[str, float]) -> LossName:
    if loss_fn not in _REQUIRED:
        raise EngineUserError(
            f"unknown loss_fn {loss_fn!r}; the local backend supports {sorted(_REQUIRED)}"
        )
    name: LossName = loss_fn
    unknown = sorted(set(config) - set(_CONFIG_KEYS[name]))
    if unknown:
        raise EngineUserError(
            f"loss_fn_config keys {unknown} are not used by {name!r}; "
            f"accepted: {list(_CONFIG_KEYS[name])}"
        )
    for key, value in config.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise EngineUserError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
    return name


def validate_inputs(
    loss_fn: LossName,
    datum_index: int,
    length: int,
    inputs: Mapping[str, npt.NDArray[np.generic]],
    vocab_size: int,
) -> LossInputs:
    """Check keys, dtypes and lengths of one datum's `loss_fn_inputs`; unknown keys are ignored."""
    where = f"data[{datum_index}].loss_fn_inputs"
    for key in _REQUIRED[loss_fn]:
        if key not in inputs:
            raise EngineUserError(
                f"{where} lacks {key!r}, which {loss_fn!r} needs (length {length}, "
                f"{'int64' if key in _INT_KEYS else 'float32'})"
            )
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for key in _REQUIRED[loss_fn] + _OPTIONAL[loss_fn]:
        if key not in inputs:
            continue
        array = np.asarray(inputs[key])
        want = "int64" if key in _INT_KEYS else "float32"
        kind_ok = array.dtype.kind in ("i", "u") if key in _INT_KEYS else array.dtype.kind in "fiu"
        if not kind_ok:
            raise EngineUserError(f"{where}[{key!r}] must be {want}, got dtype {array.dtype}")
        if array.shape != (length,):
            raise EngineUserError(
                f"{where}[{key!r}] must have shape [{length}] (one value per input token), "
                f"got {list(array.shape)}"
            )
        arrays[key] = array
    targets = arrays.pop("target_tokens").astype(np.int64)
    if length and (targets.min() < 0 or targets.max() >= vocab_size):
        raise EngineUserError(
            f"{where}['target_tokens'] has ids outside the vocabulary [0, {vocab_size})"
        )
    floats = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    if not all(bool(torch.isfinite(t).all()) for t in floats.values()):
        raise EngineUserError(f"{where} contains NaN or infinite values")
    return LossInputs(torch.from_numpy(targets), floats)


def datum_loss(
    loss_fn: LossName, lp: torch.Tensor, inputs: LossInputs, config: Mapping[str, float]
) -> torch.Tensor:
    """The summed loss of one datum given its learner log-probs `lp` [N]."""
    f = inputs.floats
    if loss_fn == "cross_entropy":
        weights = f.get("weights")
        return -(lp * weights).sum() if weights is not None else -lp.sum()
    q, adv = f["logprobs"], f["advantages"]
    if loss_fn == "dro":
        beta = float(config.get("beta", DEFAULT_DRO_BETA))
        return -(lp * adv - 0.5 * beta * (lp - q).pow(2)).sum()
    ratio = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    low = f.get("clip_low_threshold")
    high = f.get("clip_high_threshold")
    low_t = (
        low
        if low is not None
        else torch.full_like(lp, config.get("clip_low_threshold", DEFAULT_CLIP_LOW))
    )
    high_t = (
        high
        if high is not None
        else torch.full_like(lp, config.get("clip_high_threshold", DEFAULT_CLIP_HIGH))
    )
    clipped = torch.minimum(torch.maximum(ratio, low_t), high_t)
    if loss_fn == "ppo":
        return -torch.minimum(ratio * adv, clipped * adv).sum()
    # cispo: the clipped ratio is a constant weight on the policy-gradient term.
    return -(clipped.detach() * lp * adv).sum()
