"""How much memory the served models' weights need, and refusing what does not fit.

Checked at start-up from the configs alone (shapes x the serving dtype's size), before any
weight is read, so a model that cannot fit stops `tinkex-trio serve` with one line instead of
swapping the machine to a halt or being killed mid-request. The estimate counts the weights
only: activations, the KV cache and LoRA adapters come on top and are bounded per request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .._engine_api import ModelMemoryError
from ._models import ModelSource

_GIB = 1024**3


def available_memory_bytes() -> int | None:
    """Memory the kernel says is available now (`MemAvailable`: free plus reclaimable page
    cache), or None where that is not known (no /proc)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: int) -> str:
    if n < _GIB:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / _GIB:.2f} GiB"


def check_fits(sources: Sequence[ModelSource], limit: int | None) -> None:
    """Raise ModelMemoryError if the weights of all `sources` exceed `limit` bytes.

    `limit=None`: the memory available now. Every model counts, since each loads on first
    use and stays loaded.
    """
    allowed = available_memory_bytes() if limit is None else limit
    if allowed is None or not sources:
        return
    sizes = {source.name: source.weight_bytes() for source in sources}
    total = sum(sizes.values())
    if total <= allowed:
        return
    largest = max(sizes, key=lambda name: sizes[name])
    source = next(s for s in sources if s.name == largest)
    where = "--max-model-memory" if limit is not None else "the memory available now"
    hint = "serve it with --dtype bfloat16 (half the bytes), " if source.dtype == "float32" else ""
    raise ModelMemoryError(
        f"{source.directory or largest}: the weights of {len(sizes)} model(s) need "
        f"{_gib(total)} as {source.dtype} ({largest}: {_gib(sizes[largest])}) but {where} "
        f"allows {_gib(allowed)}; {hint}serve fewer models, or raise --max-model-memory"
    )
