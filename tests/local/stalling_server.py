"""A local backend in its own process whose engine stalls mid-write, for `kill -9` tests.

    python stalling_server.py DATA_DIR METHOD:N

serves the backend (FakeEngine) on a free port, prints its URL on stdout, and makes the N-th
call of engine method METHOD (`save_state` or `forward_backward`) stall for ever after writing
half a file into its directory (for `save_state`), after printing `STALLED` on stdout: the
test then kills the process with SIGKILL in the middle of that call. `-` stalls nothing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from tinkex_trio.local import serve_local_backend
from tinkex_trio.local._engine_api import DatumArrays, ForwardBackwardResult, LossName
from tinkex_trio.local.testing import FakeEngine


class StallingEngine:
    def __init__(self, method: str, nth: int) -> None:
        self._inner = FakeEngine()
        self._method = method
        self._nth = nth
        self._counts: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _maybe_stall(self, method: str, directory: Path | None = None) -> None:
        self._counts[method] = self._counts.get(method, 0) + 1
        if method != self._method or self._counts[method] != self._nth:
            return
        if directory is not None:
            (directory / "adapter_model.safetensors").write_bytes(b"\0" * 100_000)
        print("STALLED", flush=True)
        threading.Event().wait()  # until SIGKILL

    def save_state(self, adapter_id: str, directory: Path, *, with_optimizer: bool) -> int:
        self._maybe_stall("save_state", directory)
        return self._inner.save_state(adapter_id, directory, with_optimizer=with_optimizer)

    def forward_backward(
        self,
        adapter_id: str,
        data: Sequence[DatumArrays],
        loss_fn: LossName,
        loss_fn_config: dict[str, float],
        forward_only: bool,
    ) -> ForwardBackwardResult:
        self._maybe_stall("forward_backward")
        return self._inner.forward_backward(adapter_id, data, loss_fn, loss_fn_config, forward_only)


async def main(data_dir: Path, stall: str) -> None:
    method, _, nth = stall.partition(":")
    engine = StallingEngine(method, int(nth or 0))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_local_backend(
                data_dir=data_dir, api_key="tml-crash", engine=engine, task_status=task_status
            )
        )
        print(url, flush=True)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2])
