"""Download a checkpoint archive and extract it safely (PROTOCOL.md A.4, 9.10).

`download(rest, "tinker://run/weights/step-100", output_dir="ckpts")` asks the server for a
signed archive URL, streams the archive to a temporary file inside `output_dir` (memory use
stays constant: a 1 MiB write buffer, whatever the archive's size), checks every member, and
extracts into `ckpts/run_weights_step-100`.

Safety, stricter than the official CLI (A.4.4), because an archive comes from a server we
may not control:

* All members are checked **before** anything is written. Refused: absolute names, `..`
  components, names that would resolve outside the target, symlinks, hard links, and any
  member that is neither a regular file nor a directory (devices, FIFOs).
* Extraction goes into a fresh temporary directory inside `output_dir`, which is renamed to
  the target only when everything succeeded. A failed or cancelled download leaves no partial
  target and no temporary file behind, and nothing is ever written outside `output_dir`.
* `tarfile`'s `data` filter is applied as well (it also drops setuid bits and other
  permissions a checkpoint never needs).

File and tar work is blocking, so it runs in worker threads (`trio.to_thread.run_sync`); the
network side stays on trio.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Final

import httpx
import trio

from tinkex_trio.errors import (
    APIConnectionError,
    APITimeoutError,
    InvalidInputError,
    TinkexError,
    status_error_for,
)
from tinkex_trio.types import ParsedTinkerPath

if TYPE_CHECKING:
    from tinkex_trio.rest import RestClient

__all__ = ["ArchiveError", "ProgressCallback", "UnsafeArchiveError", "download", "target_dirname"]

ProgressCallback = Callable[[int, "int | None"], object]
"""`progress(downloaded_bytes, total_bytes_or_None)`; the return value is ignored."""

# Bytes gathered before one write to disk. Writing each network chunk (often 4-64 KiB) from a
# worker thread would cost a thread hop per chunk; 1 MiB keeps hops rare and memory flat.
_WRITE_BUFFER_BYTES: Final = 1 << 20

_TEMP_PREFIX: Final = ".tinkex-download-"


class ArchiveError(TinkexError, ValueError):
    """The downloaded file is not a readable tar archive, or it is incomplete."""


class UnsafeArchiveError(ArchiveError):
    """The archive holds a member that could write outside the target or is not a plain file.

    Nothing was extracted: every member is checked before the first one is written.
    """


def target_dirname(tinker_path: str) -> str:
    """The directory name a checkpoint is extracted into: the path without `tinker://`, with
    every `/` replaced by `_` (the official CLI's rule), e.g. `run:train:0_weights_step-100`."""
    parsed = _parse(tinker_path)
    return str(parsed)[len("tinker://") :].replace("/", "_")


async def download(
    rest: RestClient,
    tinker_path: str,
    *,
    output_dir: str | os.PathLike[str] = ".",
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Download and extract the checkpoint `tinker_path`; return the extracted directory.

    `progress(downloaded, total)` is called after every received chunk, with `total` from the
    response's Content-Length (None if the server sent none); the last call is always
    `progress(n, n)` with the final byte count. An existing target directory is an error
    unless `force=True`, which replaces it only once the new archive has been extracted.

    Raises:
        InvalidInputError: `tinker_path` is malformed (nothing is sent).
        FileExistsError: the target exists and `force` is False (nothing is sent).
        UnsafeArchiveError: an archive member is unsafe (nothing is extracted).
        ArchiveError: the download is not a tar archive, or is shorter than announced.
        APIStatusError and subclasses: the archive URL or the download failed.
        APIConnectionError / APITimeoutError: the connection failed, also mid-body (a
            partial body is not resumed; call again).

    Resource handling: the temporary archive is deleted on success, on error and on
    cancellation.
    """
    name = target_dirname(tinker_path)
    out = Path(output_dir)
    target = out / name
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} already exists; pass force=True to replace it, or choose another output_dir="
        )
    await trio.to_thread.run_sync(lambda: out.mkdir(parents=True, exist_ok=True))

    archive_url = await rest.get_checkpoint_archive_url_by_tinker_path(tinker_path)

    fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".tar", dir=out)
    archive = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            await _stream_to_file(rest, archive_url.url, file, progress)
        await trio.to_thread.run_sync(_extract_into_place, archive, out, name, force)
    finally:
        # Synchronous on purpose: it must run even while this task is being cancelled, and
        # unlinking one file is quick.
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()  # noqa: ASYNC240
    return target


async def _stream_to_file(
    rest: RestClient, url: str, file: IO[bytes], progress: ProgressCallback | None
) -> None:
    buffer = bytearray()
    downloaded = 0
    async with rest.transport.stream("GET", url) as response:
        if not response.is_success:
            await response.aread()
            raise status_error_for(response)
        total = _content_length(response.headers.get("content-length"))
        # Raw bytes: a gzip-compressed tar is stored as sent and tarfile detects the
        # compression itself, so Content-Length and the progress counts agree.
        try:
            async for chunk in _raw_chunks(response):
                buffer += chunk
                downloaded += len(chunk)
                if len(buffer) >= _WRITE_BUFFER_BYTES:
                    data = bytes(buffer)
                    buffer.clear()
                    await trio.to_thread.run_sync(file.write, data)
                if progress is not None:
                    progress(downloaded, total)
        except httpx.TransportError as exc:
            # The transport maps errors up to the response head; a body cut short surfaces
            # here, as the same error type a failed request would raise.
            error = (
                APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
            )
            raise error(
                f"checkpoint archive download interrupted after {downloaded} bytes: {exc!r}",
                request=response.request,
            ) from exc
    if buffer:
        await trio.to_thread.run_sync(file.write, bytes(buffer))
    await trio.to_thread.run_sync(file.flush)
    if total is not None and downloaded != total:
        raise ArchiveError(
            f"checkpoint archive download from {url} ended after {downloaded} of {total} bytes"
        )
    if progress is not None:
        progress(downloaded, downloaded)


async def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The undecoded body, chunk by chunk.

    A custom httpx transport (e.g. `MockTransport` given `content=bytes`) may hand back a
    response that is already read; its body is then sliced instead of streamed.
    """
    if response.is_stream_consumed:
        body = response.content
        for start in range(0, len(body), _WRITE_BUFFER_BYTES):
            yield body[start : start + _WRITE_BUFFER_BYTES]
        return
    async for chunk in response.aiter_raw():
        yield chunk


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _parse(tinker_path: str) -> ParsedTinkerPath:
    try:
        return ParsedTinkerPath.parse(tinker_path)
    except ValueError as exc:
        raise InvalidInputError(f"tinker_path: {exc}") from None


# --- extraction (runs in a worker thread) ----------------------------------------------------


def _check_members(tar: tarfile.TarFile, extract_dir: Path) -> list[tarfile.TarInfo]:
    """Every member of `tar`, after checking that each one is safe to extract.

    Raises UnsafeArchiveError naming the first offending member.
    """
    root = os.path.realpath(extract_dir)
    members = tar.getmembers()
    for member in members:
        name = member.name
        if member.issym() or member.islnk():
            raise UnsafeArchiveError(
                f"unsafe checkpoint archive: member {name!r} is a "
                f"{'symlink' if member.issym() else 'hard link'} (to {member.linkname!r}); "
                "links are refused because they can point outside the target directory"
            )
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"unsafe checkpoint archive: member {name!r} is not a regular file or "
                "directory (device, FIFO or other special file)"
            )
        pure = PurePosixPath(name)
        if pure.is_absolute() or os.path.isabs(name) or name.startswith("\\"):
            raise UnsafeArchiveError(f"unsafe checkpoint archive: member {name!r} is absolute")
        if ".." in pure.parts or ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise UnsafeArchiveError(f"unsafe checkpoint archive: member {name!r} contains '..'")
        resolved = os.path.realpath(os.path.join(root, name))
        if resolved != root and not resolved.startswith(root + os.sep):
            raise UnsafeArchiveError(
                f"unsafe checkpoint archive: member {name!r} resolves outside the target"
            )
    return members


def _extract_into_place(archive: Path, out: Path, name: str, force: bool) -> None:
    """Extract `archive` into `out/name` via a temporary sibling directory, then rename."""
    staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=out))
    try:
        try:
            tar = tarfile.open(archive, mode="r:*")
        except tarfile.TarError as exc:
            raise ArchiveError(f"the downloaded checkpoint is not a tar archive: {exc}") from exc
        with tar:
            members = _check_members(tar, staging)
            try:
                tar.extractall(staging, members=members, filter="data")
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"unsafe checkpoint archive: {exc}") from exc
            except tarfile.TarError as exc:
                raise ArchiveError(f"the checkpoint archive is corrupt: {exc}") from exc
        _move_into_place(staging, out / name, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, target: Path, force: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return
    if not force:
        # Created by someone else while we were downloading.
        raise FileExistsError(f"{target} already exists; pass force=True to replace it")
    # Move the old one aside first so the target is never half old, half new, and restore it
    # if the swap fails.
    aside = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX + "old-", dir=target.parent))
    old = aside / "old"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    finally:
        # Holds the old target after a successful swap, nothing after a restored one.
        shutil.rmtree(aside, ignore_errors=True)
