"""Checkpoint download: streaming, progress, force, and refusal of unsafe archives.

Most tests serve archives from a scripted `httpx.MockTransport` (no sockets; the download's
file work runs in worker threads, so no autojump clock is used anywhere here). The tests at
the end download over real sockets on 127.0.0.1 from the fault server.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _router_server import FileBody, serve

from tinkex_trio._transport import Transport
from tinkex_trio.config import Config
from tinkex_trio.download import (
    ArchiveError,
    ArchiveLimitError,
    UnsafeArchiveError,
    download,
    target_dirname,
)
from tinkex_trio.errors import APIConnectionError, InvalidInputError, NotFoundError
from tinkex_trio.rest import RestClient

BASE = "http://api.test"
TINKER_PATH = "tinker://sess-1:train:0/weights/step-100"
TARGET = "sess-1:train:0_weights_step-100"
ARCHIVE_ROUTE = "/api/v1/training_runs/sess-1:train:0/checkpoints/weights/step-100/archive"
FILES = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": os.urandom(300_000),
    "checkpoint_complete": b"",
}

Member = tuple[tarfile.TarInfo, bytes | None]


def build_tar(members: list[Member], *, compress: bool = False) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    blob = raw.getvalue()
    return gzip.compress(blob) if compress else blob


def regular(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def good_archive(*, compress: bool = False) -> bytes:
    folder = tarfile.TarInfo("sub")
    folder.type = tarfile.DIRTYPE
    folder.mode = 0o755
    members = [regular(name, data) for name, data in FILES.items()]
    members += [(folder, None), regular("sub/extra.txt", b"x")]
    return build_tar(members, compress=compress)


class ArchiveServer:
    """MockTransport handler: the archive endpoint redirects to a signed URL serving `blob`."""

    def __init__(
        self, blob: bytes | Callable[[], AsyncIterator[bytes]], *, length: bool = True
    ) -> None:
        self.blob = blob
        self.length = length
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == ARCHIVE_ROUTE:
            return httpx.Response(302, headers={"Location": f"{BASE}/signed/archive.tar?sig=1"})
        if request.url.path == "/signed/archive.tar":
            if callable(self.blob):
                return httpx.Response(200, content=self.blob())
            headers = {} if self.length else {"Transfer-Encoding": "chunked"}
            if not self.length:
                blob = self.blob

                async def chunks() -> AsyncIterator[bytes]:
                    for start in range(0, len(blob), 65536):
                        yield blob[start : start + 65536]

                return httpx.Response(200, headers=headers, content=chunks())
            return httpx.Response(200, content=self.blob)
        return httpx.Response(404, json={"detail": "no route"})


def rest_for(handler: ArchiveServer) -> RestClient:
    config = Config(api_key="tml-test", base_url=BASE, max_retries=0)
    return RestClient(Transport(config, transport=httpx.MockTransport(handler)))


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def test_target_dirname() -> None:
    assert target_dirname(TINKER_PATH) == TARGET
    assert target_dirname("tinker://r/sampler_weights/s") == "r_sampler_weights_s"
    with pytest.raises(InvalidInputError, match="tinker_path"):
        target_dirname("tinker://only-two/parts")


@pytest.mark.parametrize("compress", [False, True])
async def test_download_extracts_and_reports_progress(tmp_path: Path, compress: bool) -> None:
    blob = good_archive(compress=compress)
    server = ArchiveServer(blob)
    calls: list[tuple[int, int | None]] = []
    target = await download(
        rest_for(server),
        TINKER_PATH,
        output_dir=tmp_path,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert target == tmp_path / TARGET
    for name, data in FILES.items():
        assert (target / name).read_bytes() == data
    assert (target / "sub" / "extra.txt").read_bytes() == b"x"
    assert calls[-1] == (len(blob), len(blob))
    assert all(total == len(blob) for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert listing(tmp_path) == {TARGET} | {f"{TARGET}/{p}" for p in listing(target)}
    archive_request = server.requests[0]
    assert archive_request.headers["accept"] == "application/gzip"
    assert server.requests[1].url.params["sig"] == "1"


async def test_progress_without_content_length(tmp_path: Path) -> None:
    blob = good_archive()
    calls: list[tuple[int, int | None]] = []
    await download(
        rest_for(ArchiveServer(blob, length=False)),
        TINKER_PATH,
        output_dir=tmp_path / "new" / "dir",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (len(blob), len(blob))
    assert all(total is None for _, total in calls[:-1])
    assert (tmp_path / "new" / "dir" / TARGET / "checkpoint_complete").is_file()


async def test_existing_target_needs_force(tmp_path: Path) -> None:
    server = ArchiveServer(good_archive())
    old = tmp_path / TARGET
    old.mkdir()
    (old / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"force=True"):
        await download(rest_for(server), TINKER_PATH, output_dir=tmp_path)
    assert server.requests == [], "refused before anything was sent"
    assert (old / "stale.txt").is_file()

    target = await download(rest_for(server), TINKER_PATH, output_dir=tmp_path, force=True)
    assert not (target / "stale.txt").exists()
    assert (target / "adapter_config.json").is_file()
    assert listing(tmp_path) == {TARGET} | {f"{TARGET}/{p}" for p in listing(target)}


async def test_force_keeps_old_target_when_new_archive_is_unsafe(tmp_path: Path) -> None:
    old = tmp_path / TARGET
    old.mkdir()
    (old / "stale.txt").write_text("old")
    blob = build_tar([regular("ok.txt", b"1"), regular("../evil.txt", b"2")])
    with pytest.raises(UnsafeArchiveError):
        await download(rest_for(ArchiveServer(blob)), TINKER_PATH, output_dir=tmp_path, force=True)
    assert listing(tmp_path) == {TARGET, f"{TARGET}/stale.txt"}


async def test_malformed_tinker_path_sends_nothing(tmp_path: Path) -> None:
    server = ArchiveServer(good_archive())
    for bad in ["sess/weights/x", "tinker://run/bogus/x", "tinker://run/weights/a/b"]:
        with pytest.raises(InvalidInputError, match="tinker_path"):
            await download(rest_for(server), bad, output_dir=tmp_path)
    assert server.requests == []
    assert listing(tmp_path) == set()


UNSAFE = {
    "absolute": ([regular("/tmp/tinkex-evil-abs.txt", b"x")], "absolute"),
    "dotdot": ([regular("ok.txt", b"1"), regular("a/../../evil.txt", b"x")], "'..'"),
    "symlink": ([special("link", tarfile.SYMTYPE, "/etc/passwd")], "symlink"),
    "relative symlink": ([special("link", tarfile.SYMTYPE, "../x")], "symlink"),
    "hardlink": (
        [regular("ok.txt", b"1"), special("hard", tarfile.LNKTYPE, "ok.txt")],
        "hard link",
    ),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], "not a regular file"),
    "char device": ([special("dev", tarfile.CHRTYPE)], "not a regular file"),
    "block device": ([special("blk", tarfile.BLKTYPE)], "not a regular file"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
async def test_unsafe_archives_write_nothing(tmp_path: Path, case: str) -> None:
    members, reason = UNSAFE[case]
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=reason):
        await download(rest_for(ArchiveServer(build_tar(members))), TINKER_PATH, output_dir=out)
    assert listing(out) == set(), "no target, no staging dir, no temporary archive"
    assert listing(tmp_path) == {"out"}
    assert "tinkex-evil-abs.txt" not in os.listdir("/tmp")


async def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a tar archive"):
        await download(
            rest_for(ArchiveServer(b"this is not a tar file" * 100)),
            TINKER_PATH,
            output_dir=tmp_path,
        )
    assert listing(tmp_path) == set()


async def test_archive_url_error_is_raised(tmp_path: Path) -> None:
    class Missing(ArchiveServer):
        async def __call__(self, request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return httpx.Response(404, json={"detail": "no such checkpoint"})

    with pytest.raises(NotFoundError):
        await download(rest_for(Missing(b"")), TINKER_PATH, output_dir=tmp_path)
    assert listing(tmp_path) == set()


async def test_cancel_mid_download_removes_temporary_archive(tmp_path: Path) -> None:
    started = trio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"\0" * 100_000
        started.set()
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await download(rest_for(ArchiveServer(slow)), TINKER_PATH, output_dir=tmp_path)

        nursery.start_soon(run)
        with trio.fail_after(10):
            await started.wait()
        assert any(name.startswith(".tinkex-download-") for name in os.listdir(tmp_path))
        nursery.cancel_scope.cancel()
    assert listing(tmp_path) == set()


# --- over real sockets on 127.0.0.1 ----------------------------------------------------------


class FileServer:
    """Real-server handler: the archive endpoint 302s to `/files/archive`, served from disk."""

    def __init__(self, archive: Path, *, busy: int = 0, content_length: bool = True) -> None:
        self.archive = archive
        self.busy = busy
        self.content_length = content_length
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response | FileBody:
        self.requests.append(request)
        host = request.headers["host"]
        if request.url.path == ARCHIVE_ROUTE:
            if self.busy:
                self.busy -= 1
                return httpx.Response(503, headers={"retry-after-ms": "10"})
            return httpx.Response(302, headers={"Location": f"http://{host}/files/archive?s=1"})
        if request.url.path == "/files/archive":
            return FileBody(self.archive, content_length=self.content_length)
        return httpx.Response(404, json={"detail": "no route"})


async def _download_from(
    server: FileServer, output_dir: Path, **kwargs: Any
) -> tuple[Path, list[tuple[int, int | None]]]:
    calls: list[tuple[int, int | None]] = []
    with serve(server) as base:
        config = Config(api_key="tml-test", base_url=base, timeout=10, max_retries=2)
        transport = Transport(config)
        try:
            with trio.fail_after(60):
                target = await download(
                    RestClient(transport),
                    TINKER_PATH,
                    output_dir=output_dir,
                    progress=lambda done, total: calls.append((done, total)),
                    **kwargs,
                )
        finally:
            await transport.aclose()
    return target, calls


@pytest.mark.parametrize("content_length", [True, False])
async def test_real_server_download(tmp_path: Path, content_length: bool) -> None:
    archive = tmp_path / "served.tar.gz"
    archive.write_bytes(good_archive(compress=True))
    out = tmp_path / "out"
    server = FileServer(archive, busy=1, content_length=content_length)
    target, calls = await _download_from(server, out)
    size = archive.stat().st_size
    assert calls[-1] == (size, size)
    assert (target / "adapter_model.safetensors").read_bytes() == FILES["adapter_model.safetensors"]
    assert listing(out) == {TARGET} | {f"{TARGET}/{p}" for p in listing(target)}
    paths = [r.url.path for r in server.requests]
    assert paths == [ARCHIVE_ROUTE, ARCHIVE_ROUTE, "/files/archive"]
    # The signed URL is on the same origin here, so the key is sent; the archive call asks
    # for gzip.
    assert server.requests[0].headers["accept"] == "application/gzip"

    # force=True replaces the directory over the real server too.
    (target / "marker").write_text("old")
    target_again, _ = await _download_from(FileServer(archive), out, force=True)
    assert target_again == target
    assert not (target / "marker").exists()


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "fifo"])
async def test_real_server_refuses_unsafe(tmp_path: Path, case: str) -> None:
    archive = tmp_path / "served.tar"
    archive.write_bytes(build_tar(UNSAFE[case][0]))
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError):
        await _download_from(FileServer(archive), out)
    assert listing(out) == set()
    assert listing(tmp_path) == {"out", "served.tar"}


# --- the fault server: 503 first, chunked bodies, a connection dropped mid-body --------------


async def test_fault_server_503_then_chunked_archive(tmp_path: Path) -> None:
    fault_server = pytest.importorskip("fault_server")
    blob = good_archive(compress=True)
    async with fault_server.open_fault_server() as srv:
        srv.script(
            "GET",
            ARCHIVE_ROUTE,
            fault_server.Reply(status=503, headers={"retry-after-ms": "10"}),
            fault_server.Reply(
                status=302, headers={"Location": f"{srv.base_url}/signed/a.tar.gz?sig=x"}
            ),
        )
        srv.always("GET", "/signed/a.tar.gz", fault_server.Reply(body=blob, chunked=True))
        calls: list[tuple[int, int | None]] = []
        transport = Transport(Config(api_key="tml-test", base_url=srv.base_url, max_retries=2))
        try:
            with trio.fail_after(30):
                target = await download(
                    RestClient(transport),
                    TINKER_PATH,
                    output_dir=tmp_path,
                    progress=lambda done, total: calls.append((done, total)),
                )
        finally:
            await transport.aclose()
        assert [r.path for r in srv.requests] == [ARCHIVE_ROUTE, ARCHIVE_ROUTE, "/signed/a.tar.gz"]
        assert srv.requests[0].headers["accept"] == "application/gzip"
        assert srv.requests[2].query == "sig=x"
    assert calls[-1] == (len(blob), len(blob))
    assert (target / "adapter_config.json").read_bytes() == FILES["adapter_config.json"]


async def test_fault_server_dropped_mid_body_cleans_up(tmp_path: Path) -> None:
    fault_server = pytest.importorskip("fault_server")
    async with fault_server.open_fault_server() as srv:
        srv.always(
            "GET",
            ARCHIVE_ROUTE,
            fault_server.Reply(status=302, headers={"Location": f"{srv.base_url}/signed/a.tar"}),
        )
        srv.always("GET", "/signed/a.tar", fault_server.Reply(body=good_archive(), drop="mid_body"))
        transport = Transport(Config(api_key="tml-test", base_url=srv.base_url, max_retries=0))
        try:
            with trio.fail_after(30), pytest.raises(APIConnectionError, match="interrupted"):
                await download(RestClient(transport), TINKER_PATH, output_dir=tmp_path)
        finally:
            await transport.aclose()
    assert listing(tmp_path) == set()


# --- end to end against the local backend (its fake engine; real sockets) --------------------


async def test_local_backend_round_trip(tmp_path: Path) -> None:
    """save_weights on the local backend, then list, download, publish, TTL and delete it."""
    pytest.importorskip("hypercorn")
    local = pytest.importorskip("tinkex_trio.local")
    fake = pytest.importorskip("tinkex_trio.local.testing")
    import msgspec

    async with local.open_local_backend(
        data_dir=tmp_path / "data", engine=fake.FakeEngine(), api_key="tml-e2e"
    ) as backend:
        transport = Transport(Config(api_key=backend.api_key, base_url=backend.base_url))
        rest = RestClient(transport)

        async def post(path: str, body: dict[str, Any]) -> Any:
            response = await transport.request(
                "POST", f"/api/v1/{path}", content=msgspec.json.encode(body)
            )
            return response.json()

        async def result(submitted: Any) -> Any:
            while True:
                body = await post(
                    "retrieve_future",
                    {"request_id": submitted["request_id"], "allow_metadata_only": True},
                )
                if body.get("type") != "try_again":
                    return body

        try:
            with trio.fail_after(60):
                session = await post(
                    "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "t"}
                )
                model = await result(
                    await post(
                        "create_model",
                        {
                            "session_id": session["session_id"],
                            "model_seq_id": 0,
                            "base_model": fake.FAKE_MODEL_NAME,
                            "lora_config": {"rank": 4},
                        },
                    )
                )
                saved = await result(
                    await post(
                        "save_weights", {"model_id": model["model_id"], "path": "s1", "seq_id": 1}
                    )
                )
                path = saved["path"]
                listed = await rest.list_checkpoints(model["model_id"])
                assert [c.tinker_path for c in listed.checkpoints] == [path]
                calls: list[tuple[int, int | None]] = []
                target = await download(
                    rest,
                    path,
                    output_dir=tmp_path / "out",
                    progress=lambda done, total: calls.append((done, total)),
                )
                assert {"adapter_config.json", "checkpoint_complete"} <= set(os.listdir(target))
                assert calls[-1][0] == calls[-1][1]
                assert (await rest.get_training_run_by_tinker_path(path)).lora_rank == 4
                assert (await rest.get_weights_info_by_tinker_path(path)).is_lora
                await rest.publish_checkpoint_from_tinker_path(path)
                await rest.set_checkpoint_ttl_from_tinker_path(path, 3600)
                await rest.delete_checkpoint_by_tinker_path(path)
                assert (await rest.list_checkpoints(model["model_id"])).checkpoints == []
        finally:
            await transport.aclose()
    assert listing(tmp_path / "out") == {target.name} | {
        f"{target.name}/{name}" for name in os.listdir(target)
    }


# --- extraction limits and malformed archives (nothing escapes, nothing stays) ---------------


class _Zeros(io.RawIOBase):
    """A readable stream of `size` zero bytes that never holds them all in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n


def gzip_bomb(size: int) -> bytes:
    """A tar.gz holding one `size`-byte file of zeros (about size / 1000 bytes compressed)."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            info = tarfile.TarInfo("adapter_model.safetensors")
            info.size = size
            tar.addfile(info, io.BufferedReader(_Zeros(size)))
    return raw.getvalue()


async def _refused(
    blob: bytes, tmp_path: Path, error: type[Exception], match: str, **kw: Any
) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as info:
        await download(rest_for(ArchiveServer(blob)), TINKER_PATH, output_dir=out, **kw)
    assert isinstance(info.value, ArchiveError)
    assert listing(out) == set(), "no target, no staging dir, no temporary archive"


async def test_gzip_bomb_stops_at_the_ratio_limit_before_writing(tmp_path: Path) -> None:
    blob = gzip_bomb(200 << 20)  # 200 MiB of zeros in ~200 KB
    assert len(blob) < 1 << 20
    await _refused(blob, tmp_path, ArchiveLimitError, "max_compression_ratio=200")


async def test_extracted_bytes_cap(tmp_path: Path) -> None:
    blob = good_archive(compress=True)
    await _refused(
        blob, tmp_path, ArchiveLimitError, "max_extracted_bytes=1000", max_extracted_bytes=1000
    )
    target = await download(
        rest_for(ArchiveServer(blob)),
        TINKER_PATH,
        output_dir=tmp_path / "ok",
        max_extracted_bytes=400_000,
    )
    assert (target / "adapter_model.safetensors").stat().st_size == 300_000


async def test_member_cap_default_and_per_call(tmp_path: Path) -> None:
    many = build_tar([regular(f"f{i}", b"") for i in range(10_001)], compress=True)
    await _refused(many, tmp_path / "a", ArchiveLimitError, "more than 10000 members")
    await _refused(
        good_archive(), tmp_path / "b", ArchiveLimitError, "max_members=2", max_members=2
    )


@pytest.mark.parametrize("compress", [False, True])
async def test_truncated_archive_is_an_archive_error(tmp_path: Path, compress: bool) -> None:
    blob = good_archive(compress=compress)
    await _refused(blob[: len(blob) // 2], tmp_path, ArchiveError, "truncated or corrupt")


async def test_corrupt_gzip_is_an_archive_error(tmp_path: Path) -> None:
    blob = bytearray(good_archive(compress=True))
    blob[40:2000] = os.urandom(1960)
    await _refused(bytes(blob), tmp_path, ArchiveError, "corrupt|not a tar archive")


async def test_member_inside_a_file_is_refused(tmp_path: Path) -> None:
    blob = build_tar([regular("a", b"file"), regular("a/b", b"inside")])
    await _refused(blob, tmp_path / "x", ArchiveError, "lies inside 'a', which is a file")
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    blob = build_tar([(folder, None), regular("d", b"now a file")])
    await _refused(blob, tmp_path / "y", ArchiveError, "earlier member made it a directory")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_extracted_bytes": 0},
        {"max_members": -1},
        {"max_compression_ratio": 0.5},
        {"max_members": True},
    ],
)
async def test_bad_limits_send_nothing(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    server = ArchiveServer(good_archive())
    with pytest.raises(InvalidInputError, match=next(iter(kwargs))):
        await download(rest_for(server), TINKER_PATH, output_dir=tmp_path, **kwargs)
    assert server.requests == []


async def test_real_server_gzip_bomb_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip_bomb(1 << 30))  # 1 GiB of zeros in ~1 MB
    out = tmp_path / "out"
    with pytest.raises(ArchiveLimitError):
        await _download_from(FileServer(archive), out)
    assert listing(out) == set()
