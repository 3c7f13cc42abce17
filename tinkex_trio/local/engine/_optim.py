"""AdamW for one adapter, with its state as named tensors (for `optimizer.safetensors`).

Written out instead of `torch.optim.AdamW` so the saved state is a flat, documented set of
tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`, `step`) and a resumed run repeats exactly
the same floating-point operations as an uninterrupted one. Hyper-parameters come with every
step (Tinker's `AdamParams`), so none are stored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._engine_api import AdamStep, EngineUserError

OPTIMIZER_FILE = "optimizer.safetensors"
_STEP_KEY = "step"


class AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter), bias-corrected, optional clipping."""

    def __init__(self, named_params: list[tuple[str, torch.Tensor]]) -> None:
        self.params = named_params
        self.step_count = 0
        self.exp_avg = {name: torch.zeros_like(p) for name, p in named_params}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in named_params}

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, hp: AdamStep) -> dict[str, float]:
        """Apply one update from the accumulated gradients, then clear them."""
        if hp.learning_rate < 0 or not 0 <= hp.beta1 < 1 or not 0 <= hp.beta2 < 1:
            raise EngineUserError(
                f"adam params out of range: learning_rate {hp.learning_rate} must be >= 0, "
                f"beta1 {hp.beta1} and beta2 {hp.beta2} in [0, 1)"
            )
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        norm = (
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if grads
            else 0.0
        )
        clip = 1.0
        if hp.grad_clip_norm > 0 and norm > hp.grad_clip_norm:
            clip = hp.grad_clip_norm / (norm + 1e-6)
        self.step_count += 1
        bias1 = 1 - hp.beta1**self.step_count
        bias2 = 1 - hp.beta2**self.step_count
        for (name, p), grad in zip(self.params, grads, strict=True):
            g = grad * clip if clip != 1.0 else grad
            m = self.exp_avg[name].mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)
            v = self.exp_avg_sq[name].mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
            if hp.weight_decay:
                p.mul_(1 - hp.learning_rate * hp.weight_decay)
            denom = (v / bias2).sqrt_().add_(hp.eps)
            p.addcdiv_(m, denom, value=-hp.learning_rate / bias1)
        self.zero_grad()
        return {
            "grad_norm:mean": norm,
            "learning_rate:mean": hp.learning_rate,
        }

    def save(self, directory: Path) -> int:
        tensors = {_STEP_KEY: torch.tensor([self.step_count], dtype=torch.int64)}
        for name, _ in self.params:
            tensors[f"{name}.exp_avg"] = self.exp_avg[name].contiguous()
            tensors[f"{name}.exp_avg_sq"] = self.exp_avg_sq[name].contiguous()
        path = directory / OPTIMIZER_FILE
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path.stat().st_size

    def load(self, directory: Path) -> None:
        path = directory / OPTIMIZER_FILE
        if not path.is_file():
            raise EngineUserError(f"{directory} has no {OPTIMIZER_FILE}: not a training checkpoint")
        raw = load_file(str(path))
        for name, p in self.params:
            for store, suffix in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
                tensor = raw.get(f"{name}.{suffix}")
                if tensor is None or tensor.shape != p.shape:
                    raise EngineUserError(f"{path}: missing or misshapen {name}.{suffix}")
                store[name] = tensor.float().clone()
        self.step_count = int(raw[_STEP_KEY][0]) if _STEP_KEY in raw else 0
