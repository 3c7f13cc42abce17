"""Fixtures of the conformance suite; the venv logic lives in `official_venvs.py`."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from official_venvs import JSON_VERSION, PROTOBUF_VERSION, venv_python


@pytest.fixture(scope="session")
def official_python() -> Callable[[str], Path]:
    """`official_python("0.38.0")` → the python of a venv with that `tinker` installed.

    Both pinned venvs are built at once on first use (a cold install is mostly waiting on the
    network), so a fresh CI machine pays for one install's time, not two.
    """
    builds: dict[str, Future[Path]] = {}
    pool = ThreadPoolExecutor(max_workers=2)

    def get(version: str) -> Path:
        if not builds:
            for pinned in (PROTOBUF_VERSION, JSON_VERSION):
                builds[pinned] = pool.submit(venv_python, pinned)
        if version not in builds:
            builds[version] = pool.submit(venv_python, version)
        return builds[version].result()

    return get
