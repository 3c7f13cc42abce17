"""AdminClient (PROTOCOL.md 3.6) and the default project (7.9), through the whole SDK, against the
local backend (Hypercorn on 127.0.0.1, FakeEngine): real sockets, so no virtual time; each test
runs under `trio.fail_after` and asserts outcomes.

What the answers must be is what the store knows: the audit log lists the changes made in this
test, in order; storage counts and sizes equal the checkpoint listing's; billing counts the
checkpoints saved and prices everything at zero.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
import trio

pytest.importorskip("hypercorn")

from pathlib import Path

from tinkex_trio import open_service
from tinkex_trio.errors import InvalidInputError
from tinkex_trio.local import open_local_backend
from tinkex_trio.local._backend import DEFAULT_PROJECT_ID
from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine
from tinkex_trio.types import (
    AuditLogResponse,
    CheckpointBillingEvent,
    SessionSearchRequest,
    StorageBillingEvent,
)

LIMIT = 60


def _this_hour() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


async def test_admin_calls_report_what_the_store_knows(tmp_path: Path) -> None:
    first_hour = _this_hour()
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(data_dir=tmp_path / "data", engine=FakeEngine()) as backend,
            open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service,
        ):
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            rest = service.create_rest_client()
            admin = service.create_admin_client()
            run = training.model_id
            kept = await (await training.save_state("kept"))
            gone = await (await training.save_state("gone"))
            await rest.delete_checkpoint_by_tinker_path(gone.path)
            await rest.publish_checkpoint_by_tinker_path(kept.path)
            exported = await (await training.save_weights_external("ext"))
            urls = await rest.get_external_weights_urls(exported.path)
            async with httpx.AsyncClient() as plain:
                fetched = await plain.get(urls.urls["adapter_config.json"])
                assert fetched.status_code == 200

            audit = await admin.get_audit_log()
            checkpoints_only = await admin.get_audit_log(
                "checkpoints", day=datetime.now(UTC).date()
            )
            yesterday = await admin.get_audit_log(day=datetime.now(UTC).date() - timedelta(1))
            listing = await rest.list_checkpoints(run)
            storage = await admin.get_current_checkpoint_storage_usage()
            mine = await admin.get_current_checkpoint_storage_usage(DEFAULT_PROJECT_ID)
            other = await admin.get_current_checkpoint_storage_usage("no-such-project")
            start = _this_hour() - timedelta(hours=2)
            usage = await admin.get_billing_usage(start, start + timedelta(hours=3))
            found = await rest.search_sessions(SessionSearchRequest())
            in_default = await rest.search_sessions(
                SessionSearchRequest(project_ids=[DEFAULT_PROJECT_ID])
            )
            runs = await rest.list_training_runs(project_id=DEFAULT_PROJECT_ID)
            no_runs = await rest.list_training_runs(project_id="elsewhere")

    assert isinstance(audit, AuditLogResponse)
    events = [(e.event, e.tinker_path) for e in audit.entries]
    assert events == [
        ("session_create", None),
        ("training_run_create", None),
        ("checkpoint_create", kept.path),
        ("checkpoint_create", gone.path),
        ("checkpoint_delete", gone.path),
        ("checkpoint_publish", kept.path),
        ("checkpoint_create", exported.path),
        ("checkpoint_read", exported.path),
    ]
    assert [e.timestamp for e in audit.entries] == sorted(e.timestamp for e in audit.entries)
    read = audit.entries[-1]
    assert read.purpose == "download" and read.model_id == run
    assert read.event_details["file"] == "adapter_config.json"
    assert audit.entries[0].event_details["session_id"] == service.session_id
    assert audit.entries[0].event_details["actor"] == "tml:user:local"
    assert [e.event for e in checkpoints_only.entries] == [
        e for e, _ in events if e.startswith("checkpoint_")
    ]
    assert yesterday.entries == []

    # Storage: exactly the live checkpoints of the listing, all in the default project.
    live_bytes = sum(c.size_bytes or 0 for c in listing.checkpoints)
    assert len(listing.checkpoints) == 2 and live_bytes > 0
    assert storage.effective_rate_usd_per_gigabyte_month == 0.0
    [item] = storage.data
    assert (item.project_id, item.checkpoint_count, item.size_bytes) == (
        DEFAULT_PROJECT_ID,
        2,
        live_bytes,
    )
    assert item.size_gigabytes == pytest.approx(live_bytes / 1e9)
    assert item.estimated_monthly_cost_usd == 0.0
    assert mine.data == storage.data and other.data == []

    # Billing: 3 checkpoints saved this hour, by this session; storage free and at zero cost.
    counts = [e for e in usage.data if isinstance(e.event_info, CheckpointBillingEvent)]
    assert sum(e.event_info.count for e in counts) == 3  # type: ignore[union-attr]
    assert {e.session_id for e in counts} == {service.session_id}
    assert {e.base_model for e in counts} == {FAKE_MODEL_NAME}
    # Saved during this test: in the hour it started (or the next, had the clock turned).
    assert {e.bucket_start for e in counts} <= {first_hour, _this_hour()}
    stored = [e for e in usage.data if isinstance(e.event_info, StorageBillingEvent)]
    assert stored and all(
        e.event_info.free and e.estimated_cost_usd == 0.0
        for e in stored  # type: ignore[union-attr]
    )
    assert all(e.bucket_end - e.bucket_start == timedelta(hours=1) for e in usage.data)
    assert usage.cost_data_through is None
    assert set(usage.sessions) == {service.session_id}

    # Sessions belong to the default project unless assigned.
    assert [s.project_id for s in found.sessions] == [DEFAULT_PROJECT_ID]
    assert [s.session_id for s in in_default.sessions] == [service.session_id]
    assert [r.training_run_id for r in runs.training_runs] == [run]
    assert no_runs.training_runs == []


async def test_admin_query_validation_is_a_user_error(tmp_path: Path) -> None:
    """Our SDK refuses bad arguments before sending; the server answers the same with a 400."""
    hour = _this_hour()
    refused_locally = [
        ("get_audit_log", {"event_type": "everything"}, "event_type"),
        ("get_audit_log", {"day": datetime.now(UTC)}, "day"),
        (
            "get_billing_usage",
            {"starting_on": hour.replace(minute=5), "ending_before": hour},
            "aligned",
        ),
        (
            "get_billing_usage",
            {"starting_on": hour.replace(tzinfo=None), "ending_before": hour},
            "time zone",
        ),
        ("get_billing_usage", {"starting_on": hour, "ending_before": hour}, "after"),
        (
            "get_billing_usage",
            {"starting_on": hour - timedelta(days=15), "ending_before": hour},
            "14 days",
        ),
        ("get_billing_usage", {"starting_on": "yesterday", "ending_before": hour}, "RFC 3339"),
        ("get_current_checkpoint_storage_usage", {"project_id": " "}, "project_id"),
    ]
    raw_refusals = [
        ("audit", {"day": "2026-13-01"}, "day"),
        ("audit", {"day": "05/01/2026"}, "day"),
        ("audit", {"event_type": "users"}, "event_type"),
        (
            "billing/usage/events",
            {"ending_before": "2026-01-01T00:00:00Z"},
            "starting_on is required",
        ),
        (
            "billing/usage/events",
            {"starting_on": "2026-01-01T00:30:00Z", "ending_before": "2026-01-01T02:00:00Z"},
            "aligned",
        ),
        (
            "billing/usage/events",
            {"starting_on": "2026-01-01T00:00:00Z", "ending_before": "2026-01-16T00:00:00Z"},
            "14 days",
        ),
        (
            "billing/usage/events",
            {"starting_on": "2026-01-02T00:00:00Z", "ending_before": "2026-01-01T00:00:00Z"},
            "after",
        ),
        (
            "billing/usage/events",
            {
                "starting_on": (hour + timedelta(hours=2)).isoformat(),
                "ending_before": (hour + timedelta(hours=3)).isoformat(),
            },
            "future",
        ),
        ("billing/usage/events", {"starting_on": "soon", "ending_before": "later"}, "RFC 3339"),
        ("billing/usage/checkpoints/current", {"project_id": " "}, "project_id"),
    ]
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(data_dir=tmp_path / "data", engine=FakeEngine()) as backend,
            open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service,
        ):
            admin = service.create_admin_client()
            for method, kwargs, words in refused_locally:
                with pytest.raises(InvalidInputError, match=words):
                    await getattr(admin, method)(**kwargs)
            async with httpx.AsyncClient(
                base_url=backend.base_url + "/api/v1/", headers={"X-API-Key": backend.api_key}
            ) as raw:
                for path, params, words in raw_refusals:
                    answer = await raw.get(path, params=params)
                    assert answer.status_code == 400, (path, params, answer.text)
                    assert answer.json()["category"] == "user"
                    assert words in answer.json()["detail"], (path, params, answer.text)


async def test_admin_cli(tmp_path: Path) -> None:
    """`tinkex-trio admin audit|usage|storage`, as a user types them, against the backend."""
    import json
    import os
    import sys

    hour = _this_hour()
    with trio.fail_after(LIMIT):
        async with (
            open_local_backend(data_dir=tmp_path / "data", engine=FakeEngine()) as backend,
            open_service(
                base_url=backend.base_url, api_key=backend.api_key, telemetry=False
            ) as service,
        ):
            training = await service.create_lora_training_client(FAKE_MODEL_NAME, rank=4)
            saved = await (await training.save_state("one"))
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("TINKER_")},
                "TINKER_BASE_URL": backend.base_url,
                "TINKER_API_KEY": backend.api_key,
                "TINKER_TELEMETRY": "0",
            }

            async def cli(*argv: str) -> tuple[int, str, str]:
                done = await trio.run_process(
                    [sys.executable, "-m", "tinkex_trio.cli", *argv],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                return done.returncode, done.stdout.decode(), done.stderr.decode()

            audit = await cli("--format", "json", "admin", "audit", "--event-type", "checkpoints")
            storage = await cli("--format", "json", "admin", "storage")
            start, end = (hour - timedelta(hours=1)).isoformat(), (hour + timedelta(hours=1))
            usage = await cli("admin", "usage", "--start", start, "--end", end.isoformat())
            too_long = await cli(
                "admin", "usage", "--start", "2026-01-01T00:00:00Z", "--end", "2026-02-01T00:00:00Z"
            )
            bad_day = await cli("admin", "audit", "--day", "yesterday")
    assert audit[0] == 0, audit[2]
    assert [(e["event"], e["tinker_path"]) for e in json.loads(audit[1])["entries"]] == [
        ("checkpoint_create", saved.path)
    ]
    assert storage[0] == 0, storage[2]
    [item] = json.loads(storage[1])["data"]
    assert (item["project_id"], item["checkpoint_count"]) == (DEFAULT_PROJECT_ID, 1)
    assert usage[0] == 0, usage[2]
    assert "checkpoint" in usage[1] and "count=1" in usage[1] and "storage" in usage[1]
    assert too_long[0] == 2 and "14 days" in too_long[2]
    assert bad_day[0] == 2 and "--day" in bad_day[2]
