"""Fixtures for the engine tests: a TorchEngine with only the tiny random model."""

from __future__ import annotations

import pytest

from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import TINY_NAME


@pytest.fixture
def tiny_engine() -> TorchEngine:
    return TorchEngine(models=[TINY_NAME])
