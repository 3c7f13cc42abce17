"""The local backend's PyTorch engine (imports torch; install the `local` extra)."""

import os

# Idle OpenMP threads must sleep, not spin: the engine shares 2 cores with the trio thread
# that serves HTTP (and, in tests and examples, with the client). Spinning threads made
# training 4x and sampling up to 40x slower on this machine's 2 cores under load; with
# PASSIVE, 2 threads match 1 thread under load and keep their lead when the machine is idle
# (benchmarks/bench_local.py). Only effective if torch is not imported yet; users can set it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .engine import TorchEngine as TorchEngine

__all__ = ["TorchEngine"]
