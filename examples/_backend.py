"""Where the examples run: a hosted Tinker service if configured, else the local backend.

Shared by every example so that each one prints which it uses and accepts the same flags.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tinkex_trio import ServiceClient, open_service

REAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "tinkex-trio/SmolLM2-tiny-random"


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=REAL_MODEL, help=f"base model (default {REAL_MODEL})")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="local backend data directory (default: a temporary directory)",
    )


def hosted() -> bool:
    return bool(os.environ.get("TINKER_API_KEY") and os.environ.get("TINKER_BASE_URL"))


@asynccontextmanager
async def open_example_service(model: str, data_dir: str | None) -> AsyncIterator[ServiceClient]:
    """A service on the hosted Tinker (TINKER_API_KEY + TINKER_BASE_URL) or a local backend."""
    if hosted():
        print(f"Using the hosted Tinker service at {os.environ['TINKER_BASE_URL']}")
        async with open_service() as service:
            yield service
        return
    from tinkex_trio.local import open_local_backend

    with tempfile.TemporaryDirectory(prefix="tinkex-example-") as scratch:
        directory = data_dir or scratch
        print(f"Using the local backend (model {model}, data in {directory})")
        async with open_local_backend(data_dir=directory, models=[model]) as backend:
            async with open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service:
                yield service
