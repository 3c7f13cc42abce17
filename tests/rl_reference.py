"""Independent numpy references of the RL losses `gspo` and `stable_reinforce` (a plain module,
shared by the engine tests and the conformance suite).

Written from the formulas in docs/local_backend.md (PROTOCOL.md 8.6, 8.7); each returns the
datum's summed loss and its gradient with respect to every learner log-prob, derived by hand.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def gspo_reference(
    lp: Array, q: Array, adv: Array, mask: Array, low: float, high: float
) -> tuple[float, Array]:
    """Loss and d loss / d lp of PROTOCOL.md 8.6."""
    selected = mask != 0
    s = float(np.mean(lp[selected] - q[selected])) if selected.any() else 0.0
    rho = np.full_like(lp, np.exp(s))  # value: the sequence ratio at every token
    unclipped = rho * adv
    clipped = np.clip(rho, low, high) * adv
    loss = -float(np.sum(np.minimum(unclipped, clipped)))
    # d rho_t / d lp_t = rho_t (the token's own log-prob carries the gradient). The min picks
    # the clipped term only when it is smaller, and that term is flat outside [low, high].
    takes_clipped = clipped < unclipped
    inside = (rho > low) & (rho < high)
    grad = np.where(takes_clipped & ~inside, 0.0, -adv * rho)
    return loss, grad


def stable_reinforce_reference(
    lp: Array, recorded: Array, adv: Array, ratio_clip: float, kl_coeff: float
) -> tuple[float, Array]:
    """Loss and d loss / d lp of the stable_reinforce objective (docs/local_backend.md)."""
    sampled = np.isfinite(recorded)
    q = np.where(sampled, recorded, 0.0)
    r = np.exp(lp - q)
    weight = np.minimum(r, ratio_clip)
    per_token = -weight * adv * lp + kl_coeff * (r - 1.0 - (lp - q))
    loss = float(np.sum(np.where(sampled, per_token, 0.0)))
    grad = np.where(sampled, -weight * adv + kl_coeff * (r - 1.0), 0.0)
    return loss, grad
