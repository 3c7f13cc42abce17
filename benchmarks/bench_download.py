"""Peak memory of `tinkex_trio.download` on a large archive over real HTTP on 127.0.0.1.

    python benchmarks/bench_download.py [--size-mb 200] [--keep]

Builds an uncompressed tar holding one all-zero "adapter_model.safetensors" of `--size-mb`,
serves it from a separate process (the standard library's HTTP server, so the server's memory
is not counted), downloads and extracts it with the SDK, and prints the client's peak RSS
before and after. The download streams to disk with a 1 MiB buffer, so the peak should not
grow with the archive size. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = "bench-1:train:0"
TINKER_PATH = f"tinker://{RUN}/weights/big"
ARCHIVE_ROUTE = f"/api/v1/training_runs/{RUN}/checkpoints/weights/big/archive"


class _Zeros:
    """A file-like object of `size` zero bytes, so building the archive needs no memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def build_archive(path: Path, size: int) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = size
        tar.addfile(info, _Zeros(size))
        marker = tarfile.TarInfo("checkpoint_complete")
        tar.addfile(marker, _Zeros(0))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def serve(archive: Path) -> None:
    """Server process: print the base URL, then serve until killed."""
    sys.path.insert(0, str(ROOT / "tests"))
    import httpx
    from _router_server import FileBody, serve as serve_router

    def handler(request: httpx.Request) -> httpx.Response | FileBody:
        if request.url.path == ARCHIVE_ROUTE:
            location = f"http://{request.headers['host']}/files/archive.tar"
            return httpx.Response(302, headers={"Location": location})
        if request.url.path == "/files/archive.tar":
            return FileBody(archive)
        return httpx.Response(404)

    with serve_router(handler) as base:
        print(base, flush=True)
        while True:
            time.sleep(3600)


async def client(base: str, output_dir: Path) -> tuple[Path, int, float]:
    from tinkex_trio._transport import Transport
    from tinkex_trio.config import Config
    from tinkex_trio.download import download
    from tinkex_trio.rest import RestClient

    transport = Transport(Config(api_key="tml-bench", base_url=base))
    calls = 0
    started = time.perf_counter()

    def progress(done: int, total: int | None) -> None:
        nonlocal calls
        calls += 1

    try:
        target = await download(
            RestClient(transport), TINKER_PATH, output_dir=output_dir, progress=progress
        )
    finally:
        await transport.aclose()
    return target, calls, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    import trio

    import tinkex_trio.download  # noqa: F401  (imports counted in the baseline)

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        work = Path(tmp)
        archive = work / "archive.tar"
        size = args.size_mb * 1024 * 1024
        build_archive(archive, size)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(archive)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            base = server.stdout.readline().strip()
            baseline = peak_rss_mib()
            target, calls, elapsed = trio.run(client, base, work / "out")
            peak = peak_rss_mib()
        finally:
            server.kill()
            server.wait()
        extracted = (target / "adapter_model.safetensors").stat().st_size
        archive_mib = archive.stat().st_size / 2**20
        print(
            f"archive:            {archive_mib:.1f} MiB (extracted payload {extracted / 2**20:.1f} MiB)"
        )
        print(
            f"time:               {elapsed:.2f} s ({archive_mib / elapsed:.0f} MiB/s), {calls} progress calls"
        )
        print(f"peak RSS before:    {baseline:.1f} MiB (interpreter + imports)")
        print(f"peak RSS after:     {peak:.1f} MiB")
        print(f"growth during run:  {peak - baseline:.1f} MiB")


if __name__ == "__main__":
    main()
