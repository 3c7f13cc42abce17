"""Start-up removal of interrupted writes (`_durable.remove_leftovers`) and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

from tinkex_trio.local._durable import remove_leftovers, write_file_atomically


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def test_removes_staging_and_legacy_tmp_names_and_nothing_else(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints" / "s_train_0" / "weights"
    staged = _file(tmp_path / "staging" / "abc" / "adapter_model.safetensors", 1000)
    legacy_dir = _file(run / ".step-3.tmp-4242" / "adapter_model.safetensors", 300)
    legacy_archive = _file(tmp_path / "archives" / ("0" * 40 + ".tar.gz.tmp-17"), 50)
    trace_tmp = _file(tmp_path / "traces" / ".x.json.tmp", 7)
    key_tmp = _file(tmp_path / ".api_key.tmp-9", 3)
    kept = [
        _file(run / "step-3" / "adapter_model.safetensors", 10),
        # A user may name a checkpoint like a staging file, but never with a leading dot.
        _file(run / "x.tmp-1" / "adapter_model.safetensors", 10),
        _file(tmp_path / "archives" / ("1" * 40 + ".tar.gz"), 10),
        _file(tmp_path / "api_key", 10),
    ]
    removed = remove_leftovers(tmp_path)
    assert sorted((r.path, r.size) for r in removed) == sorted(
        [
            (staged.parent, 1000),
            (legacy_dir.parent, 300),
            (legacy_archive, 50),
            (trace_tmp, 7),
            (key_tmp, 3),
        ]
    )
    for path in (staged.parent, legacy_dir.parent, legacy_archive, trace_tmp, key_tmp):
        assert not path.exists()
    assert all(path.is_file() for path in kept)
    assert remove_leftovers(tmp_path) == []


def test_write_file_atomically_replaces_and_leaves_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "d" / "api_key"
    write_file_atomically(target, b"one", mode=0o600)
    write_file_atomically(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert os.listdir(target.parent) == ["api_key"]
