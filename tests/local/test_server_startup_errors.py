"""Start-up with an unusable data directory (issue 11, item 6): one line naming the path, the
cause and the fix, and exit status 2; never a traceback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from server_testing import open_harness

from tinkex_trio.local import open_local_backend
from tinkex_trio.local._durable import DataDirectoryError
from tinkex_trio.local.server import main
from tinkex_trio.local.testing import FakeEngine


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make `directory` refuse new files, for root too (chattr +i), else by its mode."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a directory read-only as root here: {done.stderr!r}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)


def _serve(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--data-dir", str(data_dir), "--port", "0"])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


async def test_read_only_data_dir_with_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], autojump_clock: object
) -> None:
    data = tmp_path / "data"
    async with open_harness(data) as h:
        await h.session()
    assert (data / "state.sqlite3").is_file()
    with read_only(data):
        code, err = _serve(data, capsys)
        line = _one_line(err)
        with pytest.raises(DataDirectoryError, match="is not writable"):
            async with open_local_backend(data_dir=data, engine=FakeEngine(), api_key="tml-x"):
                pass
    assert code == 2
    assert line.startswith(f"tinkex-trio serve: data directory {data} is not writable (")
    assert "--data-dir" in line


def test_data_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    code, err = _serve(data, capsys)
    assert code == 2
    line = _one_line(err)
    assert f"data directory {data} is not a directory" in line and "--data-dir" in line


def test_data_dir_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    data = tmp_path / "file" / "data"
    code, err = _serve(data, capsys)
    assert code == 2
    line = _one_line(err)
    assert f"cannot create data directory {data} (Not a directory)" in line


def test_unusable_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state.sqlite3").mkdir()
    code, err = _serve(tmp_path, capsys)
    assert code == 2
    line = _one_line(err)
    assert f"cannot use the database {tmp_path / 'state.sqlite3'} (" in line
    assert "--data-dir" in line
