"""Every RestClient method added for PROTOCOL.md 3.5 / 7.9, through the whole SDK, against the
local backend (Hypercorn on 127.0.0.1, FakeEngine): real sockets, so no virtual time; each
test runs under `trio.fail_after` and asserts outcomes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio

pytest.importorskip("hypercorn")

from tinkex_trio import open_service, rest as rest_module
from tinkex_trio.errors import InvalidInputError, NotFoundError, RequestFailedError
from tinkex_trio.local import open_local_backend
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine
from tinkex_trio.types import (
    SearchStatusActive,
    SearchStatusClientFinished,
    SessionSearchRequest,
    SessionStatusActive,
    SessionStatusClientFinished,
)

LIMIT = 60
TOKEN = "wat-local-secret"


async def test_external_weights_copy_project_trace_and_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The 5 s cadence itself is tested in virtual time (tests/test_rest.py); here it is shortened.
    monkeypatch.setattr(rest_module, "TRACE_EXPORT_POLL_INTERVAL", 0.05)
    caplog.set_level("DEBUG")
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(
                data_dir=tmp_path / "data", engine=FakeEngine(), api_key="tml-e2e"
            ) as backend,
            open_service(
                base_url=backend.base_url,
                api_key=backend.api_key,
                telemetry=False,
                project_id="proj-a",
                user_metadata={"team": "rl"},
            ) as service,
        ):
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            rest = service.create_rest_client()

            # save_weights_external -> signed per-file URLs, served by the backend.
            exported = await (await training.save_weights_external("dl", ttl_seconds=3600))
            assert exported.path == f"tinker://{training.model_id}/external_weights/dl"
            assert exported.size_bytes and exported.size_bytes > 0
            urls = await rest.get_external_weights_urls(exported.path)
            assert {"adapter_config.json", "adapter_model.safetensors"} <= set(urls.urls)
            assert urls.expires > datetime.now(UTC)
            async with httpx.AsyncClient() as plain:  # no Tinker headers, like the CLI
                got = await plain.get(urls.urls["adapter_config.json"])
                assert got.status_code == 200
                assert json.loads(got.content)["peft_type"] == "LORA"
                forged = urls.urls["adapter_config.json"].replace("signature=", "signature=0")
                assert (await plain.get(forged)).status_code == 403
            listed = await rest.list_checkpoints(training.model_id)
            kinds = {c.checkpoint_id: c.checkpoint_type for c in listed.checkpoints}
            assert kinds["external_weights/dl"] == "external"

            # copy_weights: new untrainable run, same kind, token accepted (and never logged).
            saved = await (await training.save_state("step-1"))
            copy = await rest.copy_weights(saved.path, ttl_seconds=7200, weights_access_token=TOKEN)
            assert copy.tinker_path.endswith("/weights/step-1")
            assert copy.tinker_path != saved.path
            copied_run = copy.tinker_path.split("/")[2]
            run = await rest.get_training_run(copied_run)
            assert run.base_model == FAKE_MODEL_NAME
            assert run.last_checkpoint is not None
            assert run.last_checkpoint.checkpoint_type == "training"
            assert run.last_checkpoint.expires_at is not None
            info = await rest.get_weights_info_by_tinker_path(copy.tinker_path)
            assert info.lora_rank == 4
            ext_copy = await rest.copy_weights(exported.path, destination_project_id="proj-b")
            assert "/external_weights/dl" in ext_copy.tinker_path
            assert (await rest.get_external_weights_urls(ext_copy.tinker_path)).urls
            # The copy outlives its source (its files are links, not the same directory).
            await rest.delete_checkpoint_by_tinker_path(saved.path)
            await rest.get_weights_info_by_tinker_path(copy.tinker_path)
            # And it can seed a new training client (but not be trained itself).
            resumed = await service.create_training_client_from_state(copy.tinker_path)
            assert resumed.model_id != copied_run
            with pytest.raises(InvalidInputError, match="external_weights"):
                await rest.get_external_weights_urls(copy.tinker_path)

            # assign_session_project + search by project.
            session_id = service.session_id
            assert session_id is not None
            await rest.assign_session_project(session_id, "proj-moved")
            found = await rest.search_sessions(SessionSearchRequest(project_ids=["proj-moved"]))
            assert [s.session_id for s in found.sessions] == [session_id]
            mine = found.sessions[0]
            assert isinstance(mine.status, SessionStatusActive)
            assert mine.user_metadata == {"team": "rl"}
            assert mine.checkpoints_count == 1  # external_weights/dl (step-1 was deleted)
            assert mine.checkpoint_storage_bytes == exported.size_bytes
            # Copies live in finished sessions named "copy of <source>" (word-wise match).
            by_name = await rest.search_sessions(
                SessionSearchRequest(display_name="COPY tinker://", limit=200)
            )
            assert len(by_name.sessions) == 2 and session_id not in by_name.sessions
            none = await rest.search_sessions(
                SessionSearchRequest(user_metadata={"team": "other"}, session_id=session_id)
            )
            assert none.sessions == []
            # The copies' sessions are finished; walk everything two at a time.
            every = [s async for s in rest.iter_search_sessions(SessionSearchRequest(limit=2))]
            assert len(every) == 3 and len({s.session_id for s in every}) == 3
            assert [s.created_at for s in every] == sorted(
                (s.created_at for s in every), reverse=True
            )
            finished = await rest.search_sessions(
                SessionSearchRequest(statuses=[SearchStatusClientFinished(reasons=["success"])])
            )
            assert {s.session_id for s in finished.sessions} == {
                s.session_id for s in every if s.session_id != session_id
            }
            assert all(isinstance(s.status, SessionStatusClientFinished) for s in finished.sessions)
            active = await rest.search_sessions(
                SessionSearchRequest(statuses=[SearchStatusActive()], session_id=session_id)
            )
            assert [s.session_id for s in active.sessions] == [session_id]

            # export_session_trace: pending first, then ready with a signed URL.
            trace = await rest.export_session_trace(session_id)
            assert trace.url is not None
            async with httpx.AsyncClient() as plain:
                document = (await plain.get(trace.url)).json()
            assert document["session"]["session_id"] == session_id
            types = [r["request_type"] for r in document["requests"]]
            assert {"CreateModel", "SaveWeightsExternal", "SaveWeights"} <= set(types)
            assert all("result" not in r for r in document["requests"])

            # Server-side checks answer 4xx (category user).
            with pytest.raises(NotFoundError, match="user"):
                await rest.copy_weights(f"tinker://{training.model_id}/weights/nope")
            with pytest.raises(NotFoundError):
                await rest.assign_session_project("no-such-session", "p")
    assert TOKEN not in caplog.text


async def test_trace_export_failure_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rest_module, "TRACE_EXPORT_POLL_INTERVAL", 0.05)
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(
                data_dir=tmp_path / "data", engine=FakeEngine(), api_key="tml-e2e"
            ) as backend,
            open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service,
        ):
            # A file where the traces directory should be: the export cannot be written.
            (tmp_path / "data" / "traces").write_text("not a directory")
            rest = service.create_rest_client()
            assert service.session_id is not None
            with pytest.raises(RequestFailedError, match="could not write"):
                with trio.fail_after(20):
                    await rest.export_session_trace(service.session_id)
