"""Test-wide settings. tests/ is on sys.path, so helper modules import by name."""

import os

# Before anything imports torch: idle OpenMP threads sleep instead of spinning, so the torch
# worker thread, the server and the client share the 2 cores (see tinkex_trio.local.engine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
