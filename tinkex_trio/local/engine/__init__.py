"""The local backend's PyTorch engine (imports torch; install the `local` extra)."""

from .engine import TorchEngine as TorchEngine

__all__ = ["TorchEngine"]
