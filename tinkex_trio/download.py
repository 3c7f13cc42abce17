"""Download a checkpoint and extract it safely (PROTOCOL.md A.4, 9.10).

`download(rest, "tinker://run/weights/step-100", output_dir="ckpts")` asks the server for a
signed archive URL, streams the archive to a temporary file inside `output_dir` (memory use
stays constant: a 1 MiB write buffer, whatever the archive's size), checks every member, and
extracts into `ckpts/run_weights_step-100`.

External weights (`tinker://run/external_weights/name`, from `save_weights_external`) come file
by file, as the official CLI fetches them (PROTOCOL.md 9.10): `external_weights_urls` gives one
signed URL per file (asked again when within 5 minutes of their expiry), each is streamed into
a temporary directory inside `output_dir`, and the directory becomes the target once every file
is there. Files the server encrypted for age recipients arrive as `<file>.age`; with
`identity=` (an age identity file or an unencrypted OpenSSH private key) they are decrypted to
`<file>` (pyrage, `pip install 'tinkex-trio[age]'`); without one the download is refused before
any file is fetched (`IdentityRequiredError`). The same guarantees hold as for archives: file
names are checked before anything is written, the byte and file caps apply (age plaintext is
never longer than its ciphertext, so the caps bound the decrypted files too), and a failure
leaves nothing behind.

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
* Bounded: at most `max_members` members and `max_extracted_bytes` bytes, and no more than
  `max_compression_ratio` times the archive's own size beyond a `RATIO_ALLOWANCE_BYTES`
  allowance (a 1 MB gzip of zeros can expand to gigabytes; checkpoint weights compress
  barely). The limits are checked while the headers stream past, so an archive over a limit
  is refused before its first byte is written, and without decompressing what follows.
* Every failure to read the archive (not a tar, truncated, corrupt, a member inside a file)
  is an `ArchiveError`; nothing of the archive stays behind.

File and tar work is blocking, so it runs in worker threads (`trio.to_thread.run_sync`); the
network side stays on trio.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Final

import httpx
import trio

from tinkex_trio._age import AGE_SUFFIX, DecryptFailed, Identity, decrypt_file, load_identities
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

__all__ = [
    "DEFAULT_MAX_COMPRESSION_RATIO",
    "DEFAULT_MAX_EXTRACTED_BYTES",
    "DEFAULT_MAX_MEMBERS",
    "RATIO_ALLOWANCE_BYTES",
    "RESIGN_MARGIN",
    "ArchiveError",
    "ArchiveLimitError",
    "DecryptionError",
    "IdentityRequiredError",
    "ProgressCallback",
    "UnsafeArchiveError",
    "download",
    "target_dirname",
]

ProgressCallback = Callable[[int, "int | None"], object]
"""`progress(downloaded_bytes, total_bytes_or_None)`; the return value is ignored."""

# Bytes gathered before one write to disk. Writing each network chunk (often 4-64 KiB) from a
# worker thread would cost a thread hop per chunk; 1 MiB keeps hops rare and memory flat.
_WRITE_BUFFER_BYTES: Final = 1 << 20

_TEMP_PREFIX: Final = ".tinkex-download-"

DEFAULT_MAX_EXTRACTED_BYTES: Final = 64 << 30
"""64 GiB: above any LoRA checkpoint with its optimizer state (a rank-64 adapter of a 70B model
with Adam moments is a few GB); lower it per call for untrusted servers."""
DEFAULT_MAX_MEMBERS: Final = 10_000
"""A checkpoint holds a handful of files (adapter, config, optimizer, marker)."""
DEFAULT_MAX_COMPRESSION_RATIO: Final = 200.0
"""Extracted bytes per archive byte allowed beyond `RATIO_ALLOWANCE_BYTES`. Trained weights
compress about 1.1x; a fresh adapter (zero B matrices) a few times; a gzip bomb 1000x."""
RATIO_ALLOWANCE_BYTES: Final = 64 << 20
"""64 MiB any archive may expand to whatever its compression ratio."""

# What the compression and tar layers raise on a truncated or corrupt archive. gzip and bz2
# also report corrupt data as an OSError without an errno (`_is_corrupt_data`).
_READ_ERRORS: Final = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


def _is_corrupt_data(exc: BaseException) -> bool:
    """A read error of the archive itself, not of the disk (which sets an errno)."""
    if isinstance(exc, _READ_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno is None


class ArchiveError(TinkexError, ValueError):
    """The downloaded file is not a readable tar archive, or it is incomplete."""


class ArchiveLimitError(ArchiveError):
    """The archive is larger than the extraction limits allow (bytes, members or ratio).

    Nothing was extracted. If the checkpoint really is that large, raise the limit
    (`max_extracted_bytes=`, `max_members=`, `max_compression_ratio=`; CLI `--max-bytes`,
    `--max-members`).
    """


class UnsafeArchiveError(ArchiveError):
    """The archive holds a member that could write outside the target or is not a plain file.

    Nothing was extracted: every member is checked before the first one is written.
    """


class DecryptionError(ArchiveError):
    """An age-encrypted file of the checkpoint could not be decrypted with the identity given
    (no key in it matches a recipient, or the file is corrupt). Nothing was written to the
    target."""


class IdentityRequiredError(DecryptionError):
    """The checkpoint's files are age-encrypted (`<file>.age`) and no identity was given.

    Nothing was downloaded. Pass `identity=` (CLI `--identity FILE`): the age identity file or
    OpenSSH private key whose public key was among `age_encryption_recipients`.
    """


#: Signed external-weights URLs are asked for again this close to their expiry (PROTOCOL.md
#: 9.10, the official CLI's margin).
RESIGN_MARGIN: Final = timedelta(minutes=5)


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
    max_extracted_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_compression_ratio: float | None = DEFAULT_MAX_COMPRESSION_RATIO,
    identity: str | os.PathLike[str] | None = None,
) -> Path:
    """Download and extract the checkpoint `tinker_path`; return the extracted directory.

    An `external_weights` path is fetched file by file through its signed URLs; its
    age-encrypted files (`<file>.age`) are decrypted with `identity`, the path of an age
    identity file or an unencrypted OpenSSH private key (module docstring).

    The extraction limits (see the module docstring) bound what an archive may write:
    `max_extracted_bytes` in all, `max_members` members, and `max_compression_ratio` times
    the archive's size beyond 64 MiB (None: no ratio limit).

    `progress(downloaded, total)` is called after every received chunk, with `total` from the
    response's Content-Length (None if the server sent none); the last call is always
    `progress(n, n)` with the final byte count. An existing target directory is an error
    unless `force=True`, which replaces it only once the new archive has been extracted.

    Raises:
        InvalidInputError: `tinker_path` is malformed, or `identity` is given for a path that
            is not `external_weights`, is not a usable identity file, or pyrage is missing
            (nothing is sent).
        IdentityRequiredError: the files are encrypted and `identity` is None (no file is
            fetched).
        DecryptionError: an encrypted file does not open with `identity` (nothing is kept).
        FileExistsError: the target exists and `force` is False (nothing is sent).
        UnsafeArchiveError: an archive member is unsafe (nothing is extracted).
        ArchiveLimitError: the archive exceeds an extraction limit (nothing is extracted).
        ArchiveError: the download is not a tar archive, is truncated or corrupt, or is
            shorter than announced; or an external-weights checkpoint has no files.
        APIStatusError and subclasses: the archive URL or the download failed.
        APIConnectionError / APITimeoutError: the connection failed, also mid-body (a
            partial body is not resumed; call again).

    Resource handling: the temporary archive (or directory of files) is deleted on success,
    on error and on cancellation.
    """
    parsed = _parse(tinker_path)
    name = target_dirname(tinker_path)
    limits = _Limits.checked(max_extracted_bytes, max_members, max_compression_ratio)
    identities: list[Identity] | None = None
    if identity is not None:
        if parsed.kind != "external":
            raise InvalidInputError(
                f"identity= decrypts external_weights checkpoints "
                f"(tinker://<run>/external_weights/<name>); {tinker_path!r} is not one, and "
                "its files are not encrypted"
            )
        identities = await trio.to_thread.run_sync(load_identities, identity)
    out = Path(output_dir)
    target = out / name
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} already exists; pass force=True to replace it, or choose another output_dir="
        )
    await trio.to_thread.run_sync(lambda: out.mkdir(parents=True, exist_ok=True))
    if parsed.kind == "external":
        await _download_external(rest, tinker_path, out, name, force, limits, progress, identities)
        return target

    archive_url = await rest.get_checkpoint_archive_url_by_tinker_path(tinker_path)

    fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".tar", dir=out)
    archive = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            size = await _stream_to_file(rest, archive_url.url, file, progress)
        if progress is not None:
            progress(size, size)
        await trio.to_thread.run_sync(_extract_into_place, archive, out, name, force, limits)
    finally:
        # Synchronous on purpose: it must run even while this task is being cancelled, and
        # unlinking one file is quick.
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()  # noqa: ASYNC240
    return target


async def _stream_to_file(
    rest: RestClient,
    url: str,
    file: IO[bytes],
    progress: ProgressCallback | None,
    *,
    what: str = "checkpoint archive",
    offset: int = 0,
    limit: int | None = None,
    whole: bool = True,
) -> int:
    """Stream the body at `url` into `file`; return its length.

    `offset` bytes were downloaded before (other files of the same checkpoint): progress
    counts from there. `whole`: this body is the whole download, so its Content-Length is the
    total progress reports (else it reports None). With `limit`, a body that would take the
    running count past it is refused (`ArchiveLimitError`) as soon as that is known: from its
    Content-Length, before a byte is written, else at the chunk that passes it. The caller
    makes the final `progress(n, n)` call.
    """
    buffer = bytearray()
    downloaded = 0
    async with rest.transport.stream("GET", url) as response:
        if not response.is_success:
            await response.aread()
            raise status_error_for(response)
        total = _content_length(response.headers.get("content-length"))
        if limit is not None and offset + (total or 0) > limit:
            raise ArchiveLimitError(
                f"the {what} is {total} bytes, more than the {limit - offset} left of "
                f"max_extracted_bytes={limit}; nothing was kept"
            )
        shown_total = total if whole else None
        # Raw bytes: a gzip-compressed tar is stored as sent and tarfile detects the
        # compression itself, so Content-Length and the progress counts agree.
        try:
            async for chunk in _raw_chunks(response):
                buffer += chunk
                downloaded += len(chunk)
                if limit is not None and offset + downloaded > limit:
                    raise ArchiveLimitError(
                        f"the {what} is longer than the {limit - offset} bytes left of "
                        f"max_extracted_bytes={limit}; nothing was kept"
                    )
                if len(buffer) >= _WRITE_BUFFER_BYTES:
                    data = bytes(buffer)
                    buffer.clear()
                    await trio.to_thread.run_sync(file.write, data)
                if progress is not None:
                    progress(offset + downloaded, shown_total)
        except httpx.TransportError as exc:
            # The transport maps errors up to the response head; a body cut short surfaces
            # here, as the same error type a failed request would raise.
            error = (
                APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
            )
            raise error(
                f"{what} download interrupted after {downloaded} bytes: {exc!r}",
                request=response.request,
            ) from exc
    if buffer:
        await trio.to_thread.run_sync(file.write, bytes(buffer))
    await trio.to_thread.run_sync(file.flush)
    if total is not None and downloaded != total:
        raise ArchiveError(f"{what} download from {url} ended after {downloaded} of {total} bytes")
    return downloaded


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


# --- external weights: one signed URL per file (PROTOCOL.md 9.10) -----------------------------


async def _download_external(
    rest: RestClient,
    tinker_path: str,
    out: Path,
    name: str,
    force: bool,
    limits: _Limits,
    progress: ProgressCallback | None,
    identities: list[Identity] | None,
) -> None:
    """Fetch every file of an external-weights checkpoint into `out/name` (module docstring)."""
    signed = await rest.get_external_weights_urls(tinker_path)
    files = _checked_file_names(tinker_path, list(signed.urls), limits)
    encrypted = [file for file in files if file.endswith(AGE_SUFFIX)]
    if encrypted and identities is None:
        raise IdentityRequiredError(
            f"the files of {tinker_path} are age-encrypted ({', '.join(encrypted[:3])}"
            f"{', ...' if len(encrypted) > 3 else ''}); pass identity= (CLI: --identity FILE), "
            "the age identity file or OpenSSH private key of one of its recipients. Nothing "
            "was downloaded."
        )
    staging = Path(await trio.to_thread.run_sync(_make_staging, out))
    try:
        downloaded = 0
        for file in files:
            if datetime.now(UTC) >= _aware(signed.expires) - RESIGN_MARGIN:
                signed = await rest.get_external_weights_urls(tinker_path)
            url = signed.urls.get(file)
            if url is None:
                raise ArchiveError(f"{file!r} of {tinker_path} vanished while downloading")
            destination = staging / file
            handle = await trio.to_thread.run_sync(_open_for_writing, destination)
            with handle:
                downloaded += await _stream_to_file(
                    rest,
                    url,
                    handle,
                    progress,
                    what=f"file {file!r} of {tinker_path}",
                    offset=downloaded,
                    limit=limits.max_bytes,
                    whole=False,
                )
        if progress is not None:
            progress(downloaded, downloaded)
        if encrypted:
            assert identities is not None
            await trio.to_thread.run_sync(_decrypt_all, staging, encrypted, identities)
        await trio.to_thread.run_sync(_move_into_place, staging, out / name, force)
    finally:
        # Synchronous on purpose: it must run even while this task is being cancelled.
        shutil.rmtree(staging, ignore_errors=True)


def _open_for_writing(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def _make_staging(out: Path) -> str:
    return tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=out)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _checked_file_names(tinker_path: str, names: list[str], limits: _Limits) -> list[str]:
    """The file names of an external-weights checkpoint, sorted, once each is known to be a
    safe relative path (the same rules as archive members) and the count is within limits."""
    if not names:
        raise ArchiveError(f"the external weights checkpoint {tinker_path} has no files")
    if len(names) > limits.max_members:
        raise ArchiveLimitError(
            f"{tinker_path} has {len(names)} files, more than max_members={limits.max_members}; "
            "nothing was downloaded"
        )
    files = set(names)
    for name in names:
        pure = PurePosixPath(name)
        parts = name.split("/")
        if (
            not name
            or pure.is_absolute()
            or "\\" in name
            or "\0" in name
            or any(part in ("", ".", "..") for part in parts)
        ):
            raise UnsafeArchiveError(
                f"unsafe file name {name!r} in {tinker_path}: it must be a relative path "
                "without '.', '..', empty or backslash components; nothing was downloaded"
            )
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in files:
                raise UnsafeArchiveError(
                    f"file {name!r} of {tinker_path} lies inside another file; nothing was "
                    "downloaded"
                )
        if name.endswith(AGE_SUFFIX) and name[: -len(AGE_SUFFIX)] in files:
            raise ArchiveError(
                f"{tinker_path} has both {name!r} and {name[: -len(AGE_SUFFIX)]!r}; decrypting "
                "one would overwrite the other"
            )
    return sorted(names)


def _decrypt_all(staging: Path, encrypted: list[str], identities: list[Identity]) -> None:
    """Replace each `<file>.age` in `staging` by its plaintext `<file>` (worker thread)."""
    for name in encrypted:
        source = staging / name
        try:
            decrypt_file(source, source.with_name(source.name[: -len(AGE_SUFFIX)]), identities)
        except DecryptFailed as exc:
            raise DecryptionError(
                f"could not decrypt {name!r} with the identity given ({exc}); is it the key "
                "of one of the export's age_encryption_recipients? Nothing was kept."
            ) from None
        source.unlink()


# --- extraction (runs in a worker thread) ----------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_members: int
    max_ratio: float | None

    @classmethod
    def checked(cls, max_bytes: int, max_members: int, max_ratio: float | None) -> _Limits:
        for name, value in (("max_extracted_bytes", max_bytes), ("max_members", max_members)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
        if max_ratio is not None and (
            isinstance(max_ratio, bool)
            or not isinstance(max_ratio, int | float)
            or not max_ratio >= 1
        ):
            raise InvalidInputError(
                f"max_compression_ratio must be a number >= 1 or None, got {max_ratio!r}"
            )
        return cls(max_bytes, max_members, max_ratio)

    def byte_budget(self, archive_size: int) -> tuple[int, str]:
        """The bytes this archive may expand to, and which limit sets it."""
        if self.max_ratio is None:
            return self.max_bytes, f"max_extracted_bytes={self.max_bytes}"
        by_ratio = RATIO_ALLOWANCE_BYTES + int(self.max_ratio * archive_size)
        if by_ratio < self.max_bytes:
            return by_ratio, (
                f"max_compression_ratio={self.max_ratio:g} (at most {by_ratio} bytes from a "
                f"{archive_size}-byte archive)"
            )
        return self.max_bytes, f"max_extracted_bytes={self.max_bytes}"


def _check_member(member: tarfile.TarInfo, root: str) -> None:
    """Raise UnsafeArchiveError if `member` could write outside `root` or is not a plain file."""
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


def _check_members(
    tar: tarfile.TarFile, extract_dir: Path, limits: _Limits | None = None, archive_size: int = 0
) -> list[tarfile.TarInfo]:
    """Every member of `tar`, after checking that each one is safe to extract and that the
    archive stays within `limits` (checked as each header is read, before the next one).

    Raises UnsafeArchiveError naming the first offending member, ArchiveLimitError when a
    limit is passed, ArchiveError when a member would go inside another member that is a file.
    """
    limits = limits or _Limits(DEFAULT_MAX_EXTRACTED_BYTES, DEFAULT_MAX_MEMBERS, None)
    budget, budget_reason = limits.byte_budget(archive_size)
    root = os.path.realpath(extract_dir)
    members: list[tarfile.TarInfo] = []
    files: set[str] = set()
    dirs: set[str] = set()
    total = 0
    for member in tar:
        if len(members) >= limits.max_members:
            raise ArchiveLimitError(
                f"checkpoint archive has more than {limits.max_members} members "
                f"(max_members={limits.max_members}); nothing was extracted"
            )
        _check_member(member, root)
        parts = PurePosixPath(member.name).parts
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise ArchiveError(
                    f"corrupt checkpoint archive: member {member.name!r} lies inside "
                    f"{parent!r}, which is a file"
                )
            dirs.add(parent)
        key = "/".join(parts)
        if member.isfile():
            if key in dirs:
                raise ArchiveError(
                    f"corrupt checkpoint archive: member {member.name!r} is a file but an "
                    "earlier member made it a directory"
                )
            files.add(key)
            total += member.size
            if total > budget:
                raise ArchiveLimitError(
                    f"checkpoint archive expands to more than {budget} bytes ({budget_reason}) "
                    f"at member {member.name!r}; nothing was extracted"
                )
        else:
            if key in files:
                raise ArchiveError(
                    f"corrupt checkpoint archive: member {member.name!r} is a directory but an "
                    "earlier member is a file of that name"
                )
            dirs.add(key)
        members.append(member)
    return members


def _extract_into_place(
    archive: Path, out: Path, name: str, force: bool, limits: _Limits | None = None
) -> None:
    """Extract `archive` into `out/name` via a temporary sibling directory, then rename."""
    staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=out))
    try:
        try:
            tar = tarfile.open(archive, mode="r:*")
        except (*_READ_ERRORS, OSError) as exc:
            if not _is_corrupt_data(exc):
                raise
            raise ArchiveError(f"the downloaded checkpoint is not a tar archive: {exc}") from exc
        with tar:
            try:
                members = _check_members(tar, staging, limits, archive.stat().st_size)
                tar.extractall(staging, members=members, filter="data")
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"unsafe checkpoint archive: {exc}") from exc
            except (*_READ_ERRORS, OSError) as exc:
                if not _is_corrupt_data(exc):
                    raise
                raise ArchiveError(
                    f"the checkpoint archive is truncated or corrupt: {exc!r}"
                ) from exc
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
