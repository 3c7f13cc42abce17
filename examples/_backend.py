"""Where the examples run: a hosted Tinker service if configured, else the local backend.

Shared by every example so that each one prints which it uses and accepts the same flags.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tinkex_trio import ServiceClient, open_service

REAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "tinkex-trio/SmolLM2-tiny-random"


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` and `--data-dir`, the same in every example."""
    parser.add_argument("--model", default=REAL_MODEL, help=f"base model (default {REAL_MODEL})")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("tinkex-data"),
        help="local backend data directory (default ./tinkex-data)",
    )


def hosted() -> bool:
    """True when TINKER_API_KEY and TINKER_BASE_URL both name a hosted service."""
    return bool(os.environ.get("TINKER_API_KEY") and os.environ.get("TINKER_BASE_URL"))


@asynccontextmanager
async def open_example_service(model: str, data_dir: Path) -> AsyncIterator[ServiceClient]:
    """A service on the hosted Tinker (TINKER_API_KEY + TINKER_BASE_URL) or a local backend."""
    if hosted():
        print(f"backend: hosted Tinker service at {os.environ['TINKER_BASE_URL']}")
        async with open_service() as service:
            yield service
        return
    from tinkex_trio.local import open_local_backend

    async with open_local_backend(data_dir=data_dir, models=[model]) as backend:
        print(f"backend: local tinkex_trio backend at {backend.base_url} (data: {data_dir})")
        async with open_service(
            base_url=backend.base_url, api_key=backend.api_key, telemetry=False
        ) as service:
            yield service
