"""Run clients side by side against one stub server: pinned cores, interleaved rounds, medians.

The stub (`_stub_server.py`) runs in its own process pinned to core 0; every client run is a
fresh process pinned to core 1 (`os.sched_setaffinity`), so the client's CPU time is its own.
Rounds interleave the clients (A B C, B C A, ...) so that load from other processes on the
machine spreads over all of them; each figure is the median over the rounds, and the spread
(max/min of the rounds) says how noisy the run was.

The official SDK runs with the python of its own venv (tests/conformance/official_venvs.py
builds it: `.conformance-venvs/tinker-0.38.0`); without it, its rows are skipped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OFFICIAL_PYTHON = ROOT / ".conformance-venvs" / "tinker-0.38.0" / "bin" / "python"
SERVER_CPU = 0
CLIENT_CPU = 1


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


@dataclass
class Stub:
    pyqwest_url: str
    httpx_url: str


@contextmanager
def stub_server() -> Iterator[Stub]:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_stub_server.py"), "--cpu", str(SERVER_CPU)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        pyqwest_port, httpx_port = process.stdout.readline().split()
        yield Stub(f"http://127.0.0.1:{pyqwest_port}", f"http://127.0.0.1:{httpx_port}")
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Client:
    """One client configuration: a label and the command that runs one measurement."""

    label: str
    command: list[str]
    results: list[dict[str, float]] = field(default_factory=list)

    def run(self, timeout: float = 600) -> None:
        done = subprocess.run(
            self.command,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=lambda: _pin(CLIENT_CPU),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.label} failed:\n{done.stderr[-3000:]}")
        self.results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.results)

    def spread(self, key: str) -> float:
        values = [r[key] for r in self.results]
        return max(values) / min(values) if min(values) > 0 else float("inf")


def ours(*args: str) -> list[str]:
    return [sys.executable, str(HERE / "_clients.py"), *args]


def official(*args: str) -> list[str] | None:
    if not OFFICIAL_PYTHON.exists():
        return None
    return [str(OFFICIAL_PYTHON), str(HERE / "_official_client.py"), *args]


def interleave(clients: Sequence[Client], rounds: int) -> None:
    for r in range(rounds):
        for k in range(len(clients)):
            clients[(r + k) % len(clients)].run()
