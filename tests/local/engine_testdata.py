"""Test data helpers for the engine tests (a plain module: conftest is not importable)."""

from __future__ import annotations

import numpy as np

from tinkex_trio.local._engine_api import DatumArrays


def next_token_data(seed: int, lengths: list[int], *, vocab: int = 49152) -> list[DatumArrays]:
    """Random next-token-prediction datums with random positive weights."""
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        seq = rng.integers(0, vocab, size=n + 1)
        data.append(
            DatumArrays(
                tokens=seq[:-1].astype(np.int64),
                loss_fn_inputs={
                    "target_tokens": seq[1:].astype(np.int64),
                    "weights": rng.uniform(0.0, 1.0, size=n).astype(np.float32),
                },
            )
        )
    return data
