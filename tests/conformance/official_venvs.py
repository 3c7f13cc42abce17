"""Virtual environments holding the official `tinker` SDK, one per pinned version.

The official SDK is a reference client only: it is installed into its own venv under
`<repo>/.conformance-venvs/tinker-<version>` (gitignored, kept between runs so only the first
run pays for the install), never into ours and never as a dependency of our package. Its python
runs the scripts in this directory as subprocesses.

If the venv cannot be built (no route to PyPI), the tests skip and say why; in CI PyPI is
reachable, so they run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".conformance-venvs"
#: Pinned official SDK versions: 0.38.0 speaks protobuf (PROTOCOL.md 6), 0.15.0 JSON only (A).
PROTOBUF_VERSION = "0.38.0"
JSON_VERSION = "0.15.0"
#: An install that takes longer than this is treated as "no usable network".
INSTALL_TIMEOUT = 600
_OK_MARKER = ".tinker-ok"


def _build(version: str) -> Path:
    venv = VENVS / f"tinker-{version}"
    python = venv / "bin" / "python"
    marker = venv / _OK_MARKER
    if marker.is_file() and marker.read_text().strip() == version and python.exists():
        return python
    VENVS.mkdir(exist_ok=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                f"tinker=={version}",
            ],
            check=True,
            capture_output=True,
            timeout=INSTALL_TIMEOUT,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or "")[-800:] if isinstance(exc.stderr, str) else ""
        pytest.skip(f"could not install tinker=={version} into {venv} (no PyPI?): {tail}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing tinker=={version} took over {INSTALL_TIMEOUT} s (no PyPI?)")
    marker.write_text(version + "\n")
    return python


def venv_python(version: str) -> Path:
    """The python of a venv with `tinker==version` installed (built on first use; skips if
    it cannot be built)."""
    return _build(version)
