"""The README's tour program runs (with the tiny model, so it takes seconds)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tour_program_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    program = blocks[0]
    assert "open_local_backend" in program and "trio.run(main)" in program
    program = program.replace(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "tinkex-trio/SmolLM2-tiny-random"
    ).replace(
        "open_local_backend(models=", f"open_local_backend(data_dir={str(tmp_path)!r}, models="
    )
    script = tmp_path / "tour.py"
    script.write_text(program)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "OptimStepResponse" in lines[0]
    assert lines[1].startswith("[") and lines[1].count("'") >= 8  # four decoded samples
