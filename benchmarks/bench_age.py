"""Age encryption of an external-weights export: the server's `encrypt_directory` and the
SDK's decryption, on a file the size of a LoRA adapter.

Each row is one pass over a fresh copy of the export (one `adapter_model.safetensors` of
`--megabytes` random bytes plus a small `adapter_config.json`), timed in the calling thread:

* encrypt (x25519)   `tinkex_trio.local._age_export.encrypt_directory`, one X25519 recipient
* encrypt (3 keys)   the same for X25519 + ssh-ed25519 + ssh-rsa recipients
* decrypt            `tinkex_trio._age.decrypt_file` with the X25519 identity

Prints the median time, MB/s, and the growth of the process's peak RSS during the run (pyrage
streams, so it stays far below the file size).

    .venv/bin/python benchmarks/bench_age.py [--megabytes 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyrage

from tinkex_trio._age import decrypt_file
from tinkex_trio.local._age_export import encrypt_directory, parse_recipients


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ssh_public_key(directory: Path, kind: str) -> str:
    key = directory / f"id_{kind}"
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    return key.with_name(key.name + ".pub").read_text().strip()


def _time(repeat: int, setup: Callable[[], Path], run: Callable[[Path], object]) -> float:
    times = []
    for _ in range(repeat):
        directory = setup()
        start = time.perf_counter()
        run(directory)
        times.append(time.perf_counter() - start)
        shutil.rmtree(directory)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.megabytes << 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "source"
        source.mkdir()
        with (source / "adapter_model.safetensors").open("wb") as file:
            for _ in range(size >> 20):  # 1 MiB at a time: keep the peak RSS honest
                file.write(os.urandom(1 << 20))
        (source / "adapter_config.json").write_text('{"r": 32}')
        identity = pyrage.x25519.Identity.generate()
        one = parse_recipients([str(identity.to_public())])
        three = parse_recipients(
            [
                str(identity.to_public()),
                _ssh_public_key(root, "ed25519"),
                _ssh_public_key(root, "rsa"),
            ]
        )
        counter = iter(range(10**6))

        def fresh() -> Path:
            copy = root / f"copy-{next(counter)}"
            shutil.copytree(source, copy)
            return copy

        encrypted = fresh()
        encrypt_directory(encrypted, one)

        def fresh_encrypted() -> Path:
            copy = root / f"enc-{next(counter)}"
            shutil.copytree(encrypted, copy)
            return copy

        def decrypt(directory: Path) -> None:
            for file in directory.iterdir():
                decrypt_file(file, file.with_suffix(""), [identity])

        rss_before = _peak_rss_mb()
        rows = [
            ("encrypt (x25519)", _time(args.repeat, fresh, lambda d: encrypt_directory(d, one))),
            ("encrypt (3 keys)", _time(args.repeat, fresh, lambda d: encrypt_directory(d, three))),
            ("decrypt", _time(args.repeat, fresh_encrypted, decrypt)),
        ]
        rss_growth = _peak_rss_mb() - rss_before
    print(f"{args.megabytes} MiB adapter, median of {args.repeat}")
    for name, seconds in rows:
        print(f"  {name:18s} {seconds * 1000:8.1f} ms  {args.megabytes / seconds:8.1f} MiB/s")
    print(f"  peak RSS growth    {rss_growth:8.1f} MiB")


if __name__ == "__main__":
    main()
