"""The built-in Tinker losses (PROTOCOL.md section 8), summed over tokens.

Notation per token t: `lp` = learner log-prob of `target_tokens[t]` (with gradient), `q` =
sampler log-prob (input `logprobs`), `A` = `advantages`, `r = exp(lp - q)`, `sg` = stop-gradient.
Every loss returns the sum over the datum's tokens; the engine sums over datums.

`gspo` is PROTOCOL.md 8.6 as written. `stable_reinforce` (8.7) has no public formula; ours is
truncated-importance-sampling REINFORCE with an optional KL penalty, over the positions that
sampled tokens back, with `q` taken from the server's stability recording (never from the
request):

    loss = sum over sampled t of  -sg(min(r_t, ratio_clip)) * A_t * lp_t
                                  + kl_coeff * (r_t - 1 - (lp_t - q_t))

The first term is the REINFORCE gradient `A * grad lp`, corrected for the sampler/learner
mismatch by the importance ratio and truncated at `ratio_clip` (default 2) so that one token
the learner likes far more than the sampler did cannot dominate the step (truncated importance
sampling: bounded variance, bias only where r > ratio_clip). The second is the k3 estimator of
KL(sampler || learner) on the sampler's own tokens: non-negative, zero at r = 1, and its
expected gradient is exactly the gradient of that KL, so `kl_coeff` (default 0) keeps the
learner near the policy that produced the data. docs/local_backend.md has the derivation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

from tinkex_trio.types import LOSS_FN_REQUIRED_INPUTS

from .._engine_api import EngineUserError, LossName

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
"""PPO/CISPO/GSPO ratio bounds when the config omits them: the documented epsilon 0.2."""

DEFAULT_RATIO_CLIP = 2.0
"""stable_reinforce's truncation of the importance ratio when the config omits `ratio_clip`: the
value truncated-importance-sampling RL trainers commonly use (a token's weight is at most twice
its on-policy weight), high enough to leave the usual near-on-policy ratios (0.8-1.25) alone."""

DEFAULT_KL_COEFF = 0.0
"""stable_reinforce's KL penalty weight when the config omits `kl_coeff`: off, like the plain
REINFORCE recipes; the SDK names `kl_coeff` as the knob (PROTOCOL.md 8.7)."""

DEFAULT_DRO_BETA = 0.05
"""DRO's quadratic penalty weight when the config omits `beta`. The Tinker docs give no
default; 0.05 keeps the penalty small next to the advantage term for |lp - q| of order 1,
and is in the range used for the regularisation temperature in the DRO paper's experiments."""

_INT_KEYS = ("target_tokens",)
# The inputs each loss needs: the SDK's table (PROTOCOL.md 8.1-8.7), so both sides agree. The
# behaviour log-probs of stable_reinforce come from the recording named by the datum's
# provenance spans; a `logprobs` input (recipes send one for every RL loss) is accepted, not read.
_REQUIRED: Mapping[str, tuple[str, ...]] = LOSS_FN_REQUIRED_INPUTS
# Optional per-token inputs: cross-entropy weights default to 1; per-token clip thresholds
# (the SDK's key table lists them as float32 loss inputs) override the config for ppo/cispo.
_OPTIONAL: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_low_threshold", "clip_high_threshold"),
    "dro": (),
    "gspo": ("clip_low_threshold", "clip_high_threshold"),
    "stable_reinforce": (),
}
_CONFIG_KEYS: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_low_threshold", "clip_high_threshold"),
    "dro": ("beta",),
    "gspo": ("clip_low_threshold", "clip_high_threshold"),
    "stable_reinforce": ("ratio_clip", "kl_coeff"),
}
# Bounds of config values where a value outside them has no meaning: (lowest, open at lowest).
_CONFIG_BOUNDS: dict[str, tuple[float, bool]] = {
    "ratio_clip": (0.0, True),
    "kl_coeff": (0.0, False),
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
    name = cast("LossName", loss_fn)  # every key of _REQUIRED is a LossName (a test checks)
    unknown = sorted(set(config) - set(_CONFIG_KEYS[name]))
    if unknown:
        raise EngineUserError(
            f"loss_fn_config keys {unknown} are not used by {name!r}; "
            f"accepted: {list(_CONFIG_KEYS[name])}"
        )
    for key, value in config.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise EngineUserError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
        bound = _CONFIG_BOUNDS.get(key)
        if bound is not None and (value <= bound[0] if bound[1] else value < bound[0]):
            relation = ">" if bound[1] else ">="
            raise EngineUserError(
                f"loss_fn_config[{key!r}] must be {relation} {bound[0]:g}, got {value!r}"
            )
    return name


def validate_inputs(
    loss_fn: LossName,
    datum_index: int,
    length: int,
    inputs: Mapping[str, npt.NDArray[np.generic]],
    vocab_size: int,
    recorded_logprobs: npt.NDArray[np.float32] | None = None,
) -> LossInputs:
    """Check keys, dtypes and lengths of one datum's `loss_fn_inputs`; unknown keys are ignored.

    `recorded_logprobs` (stable_reinforce only, required there) are the sampler's log-probs the
    server recorded, NaN at positions no sampled token backs; they become the float inputs
    `recorded_logprobs` (NaN replaced by 0) and `sampled_mask` (1 where recorded).
    """
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
    if loss_fn == "stable_reinforce":
        floats.update(_recorded_inputs(datum_index, length, floats, recorded_logprobs))
    return LossInputs(torch.from_numpy(targets), floats)


def _recorded_inputs(
    datum_index: int,
    length: int,
    floats: Mapping[str, torch.Tensor],
    recorded: npt.NDArray[np.float32] | None,
) -> dict[str, torch.Tensor]:
    """stable_reinforce's behaviour log-probs and the mask of positions that have one."""
    if recorded is None:
        raise EngineUserError(
            f"data[{datum_index}] has no provenance spans, which stable_reinforce needs: sample "
            "with record_stability_info=True and attach the sequences with "
            "Datum.with_provenance(model_input=..., loss_fn_inputs=...)"
        )
    values = np.asarray(recorded, dtype=np.float32)
    if values.shape != (length,):
        raise EngineUserError(
            f"data[{datum_index}]: the recorded log-probs cover {values.size} positions, "
            f"not the {length} target tokens"
        )
    sampled = np.isfinite(values)
    unbacked = np.flatnonzero(~sampled & (floats["advantages"].numpy() != 0))
    if unbacked.size:
        raise EngineUserError(
            f"data[{datum_index}].loss_fn_inputs['advantages'] is non-zero at target position "
            f"{int(unbacked[0])}, which its loss_fn_input_spans mark as a prompt token: "
            "stable_reinforce weighs only sampled tokens (it needs the sampler's log-prob); "
            "set the advantage there to 0 or name the sampled sequence in the span"
        )
    return {
        "recorded_logprobs": torch.from_numpy(np.where(sampled, values, np.float32(0.0))),
        "sampled_mask": torch.from_numpy(sampled.astype(np.float32)),
    }


def datum_loss(
    loss_fn: LossName, lp: torch.Tensor, inputs: LossInputs, config: Mapping[str, float]
) -> torch.Tensor:
    """The summed loss of one datum given its learner log-probs `lp` [N]."""
    f = inputs.floats
    if loss_fn == "cross_entropy":
        weights = f.get("weights")
        return -(lp * weights).sum() if weights is not None else -lp.sum()
    if loss_fn == "stable_reinforce":
        return _stable_reinforce(lp, f, config)
    q, adv = f["logprobs"], f["advantages"]
    if loss_fn == "dro":
        beta = float(config.get("beta", DEFAULT_DRO_BETA))
        return -(lp * adv - 0.5 * beta * (lp - q).pow(2)).sum()
    if loss_fn == "gspo":
        ratio = _gspo_ratio(lp, q, f["sequence_ratio_mask"])
    else:
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
    if loss_fn in ("ppo", "gspo"):
        return -torch.minimum(ratio * adv, clipped * adv).sum()
    # cispo: the clipped ratio is a constant weight on the policy-gradient term.
    return -(clipped.detach() * lp * adv).sum()


def _gspo_ratio(lp: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PROTOCOL.md 8.6: every token carries the value of the sequence ratio
    `exp(mean over masked t of (sg(lp_t) - q_t))` and the gradient of its own log-prob.

    A datum whose mask is all zero has no sequence ratio to speak of: its log-ratio is 0, so
    each token's ratio is 1 in value (its advantage then acts on-policy).
    """
    selected = mask != 0
    count = int(selected.sum())
    frozen = lp.detach()
    log_ratio = (frozen - q)[selected].sum() / count if count else frozen.new_zeros(())
    return torch.exp(log_ratio + lp - frozen)


def _stable_reinforce(
    lp: torch.Tensor, f: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    """See the module docstring: truncated-IS REINFORCE plus a k3 KL penalty, sampled tokens only."""
    q, adv, sampled = f["recorded_logprobs"], f["advantages"], f["sampled_mask"]
    cap = float(config.get("ratio_clip", DEFAULT_RATIO_CLIP))
    kl_coeff = float(config.get("kl_coeff", DEFAULT_KL_COEFF))
    log_ratio = (lp - q) * sampled
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio.detach(), max=cap) * sampled
    loss = -(weight * adv * lp).sum()
    if kl_coeff:
        loss = loss + kl_coeff * ((ratio - 1.0 - log_ratio) * sampled).sum()
    return loss
