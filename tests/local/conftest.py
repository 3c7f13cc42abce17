"""Fixtures for the engine tests: a TorchEngine with only the tiny random model."""

from __future__ import annotations

import pytest

from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import TINY_NAME

TEST_THREADS = 1
"""One torch thread: the test machine's 2 cores are shared, and torch's thread pool slows down
up to ~7x when oversubscribed (measured: the real-model fit test took 98 s at 2 threads under
load, 14 s at 1)."""


@pytest.fixture
def tiny_engine() -> TorchEngine:
    return TorchEngine(models=[TINY_NAME], threads=TEST_THREADS)
