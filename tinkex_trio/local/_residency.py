"""Which training adapters live in the engine's memory, and which are offloaded to disk.

A training adapter (LoRA tensors and AdamW moments) costs tens of MB; a server that keeps
every adapter it ever created grows without bound. `Residency` keeps at most
`max_resident` of them in memory: when another one is needed, the least recently used idle
one is written to `<data_dir>/offload/` with the engine's own `save_state` (adapter and
optimizer state) and dropped, and it is read back with `load_state` on its next use. Its
training continues exactly where it stopped, because a checkpoint restores it exactly.

An adapter holding gradients that its `optim_step` has not consumed yet (a `forward_backward`
ran since its last step) is never offloaded: a checkpoint does not hold gradients. If every
resident adapter holds gradients, the budget is exceeded until one steps.

This class is only the bookkeeping (pure, synchronous); `EngineRunner` (`_scheduler.py`) does
the engine calls under one lock, so no adapter is offloaded while another call uses it.
Offloaded files are only meaningful to the process that wrote them: after a restart every
training run is marked corrupted anyway (`_store.py`), so the directory is emptied at start-up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["OFFLOAD_DIR", "Residency", "ResidencyStatistics"]

OFFLOAD_DIR: Final = "offload"


@dataclass(frozen=True)
class ResidencyStatistics:
    resident: tuple[str, ...]  # least recently used first
    offloaded: tuple[str, ...]
    offloads: int  # adapters written out since start
    reloads: int  # adapters read back since start


class Residency:
    """LRU bookkeeping of live training adapters (see the module docstring)."""

    def __init__(self, offload_dir: Path, max_resident: int | None) -> None:
        self.offload_dir = offload_dir
        self.max_resident = max_resident
        self._resident: OrderedDict[str, str] = OrderedDict()  # adapter id -> base model
        self._offloaded: dict[str, str] = {}  # adapter id -> base model
        self._with_gradients: set[str] = set()
        self.offloads = 0
        self.reloads = 0

    def statistics(self) -> ResidencyStatistics:
        return ResidencyStatistics(
            resident=tuple(self._resident),
            offloaded=tuple(self._offloaded),
            offloads=self.offloads,
            reloads=self.reloads,
        )

    def directory_of(self, adapter_id: str) -> Path:
        return self.offload_dir / adapter_id.replace(":", "_").replace("/", "_")

    def is_offloaded(self, adapter_id: str) -> str | None:
        """The base model of an offloaded adapter, or None if it is not offloaded."""
        return self._offloaded.get(adapter_id)

    def victims(self, keep: str) -> list[str]:
        """Adapters to offload so that `keep` fits in the budget: least recently used first,
        never `keep` nor one holding gradients."""
        if self.max_resident is None:
            return []
        resident_after = len(self._resident) + (keep not in self._resident)
        excess = resident_after - self.max_resident
        candidates = [a for a in self._resident if a != keep and a not in self._with_gradients]
        return candidates[: max(0, excess)]

    def used(self, adapter_id: str, base_model: str) -> None:
        """`adapter_id` is in memory and was just used: most recently used now."""
        self._offloaded.pop(adapter_id, None)
        self._resident[adapter_id] = base_model
        self._resident.move_to_end(adapter_id)

    def touch(self, adapter_id: str) -> None:
        """Mark a resident adapter most recently used (unknown ids are left alone)."""
        if adapter_id in self._resident:
            self._resident.move_to_end(adapter_id)

    def offloaded(self, adapter_id: str) -> None:
        self._offloaded[adapter_id] = self._resident.pop(adapter_id)
        self.offloads += 1

    def reloaded(self, adapter_id: str) -> None:
        self.used(adapter_id, self._offloaded[adapter_id])
        self.reloads += 1

    def gradients(self, adapter_id: str, held: bool) -> None:
        """Record whether the adapter holds gradients an optim_step has not consumed."""
        if held:
            self._with_gradients.add(adapter_id)
        else:
            self._with_gradients.discard(adapter_id)

    def forget(self, adapter_id: str) -> None:
        """The adapter was dropped: it is neither in memory nor on disk."""
        self._resident.pop(adapter_id, None)
        self._offloaded.pop(adapter_id, None)
        self._with_gradients.discard(adapter_id)
