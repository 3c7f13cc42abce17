"""Every response type decodes with `null` in every optional field (issue: other
Tinker-compatible servers, SkyRL tx and hatchery-core, send `null` where an official server
sends a default or nothing).

The bodies are built from the types themselves (msgspec.inspect): required fields get a
plausible value, optional ones `null`, recursively through nested structs. So a response type
added later is covered without touching this file.
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from tinkex_trio import types as t

SAMPLE_TIME = "2026-01-05T10:00:00Z"


def _response_types() -> list[type[t.Response]]:
    seen: list[type[t.Response]] = []
    stack: list[type[t.Response]] = [t.Response]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen and sub.__module__.startswith("tinkex_trio.types"):
                seen.append(sub)
                stack.append(sub)
    return sorted(seen, key=lambda c: c.__name__)


RESPONSE_TYPES = _response_types()


def _accepts_none(info: mi.Type) -> bool:
    if isinstance(info, mi.NoneType | mi.AnyType):
        return True
    return isinstance(info, mi.UnionType) and any(_accepts_none(m) for m in info.types)


def _value(info: mi.Type) -> Any:
    """A plausible JSON value of a required field."""
    if isinstance(info, mi.StructType):
        return _body(info)
    if isinstance(info, mi.UnionType):
        usable = [m for m in info.types if not isinstance(m, mi.NoneType)]
        return _value(usable[0])
    if isinstance(info, mi.LiteralType):
        return info.values[0]
    simple: dict[type[mi.Type], Any] = {
        mi.StrType: "x",
        mi.IntType: 1,
        mi.FloatType: 1.0,
        mi.BoolType: True,
        mi.DateTimeType: SAMPLE_TIME,
        mi.BytesType: "",
        mi.AnyType: {},
        mi.ListType: [],
        mi.DictType: {},
        mi.VarTupleType: [],
    }
    for kind, value in simple.items():
        if isinstance(info, kind):
            return value
    raise AssertionError(f"no sample value for {info!r}; teach _value this type")


def _body(info: mi.StructType) -> dict[str, Any]:
    """Required fields filled, every optional field null, tag included."""
    body: dict[str, Any] = {}
    if info.tag_field is not None:
        body[info.tag_field] = info.tag
    for field in info.fields:
        body[field.encode_name] = _value(field.type) if field.required else None
    return body


def test_every_response_type_is_found() -> None:
    names = {cls.__name__ for cls in RESPONSE_TYPES}
    assert {"Checkpoint", "TrainingRun", "SessionSummary", "ClientConfigResponse"} <= names
    assert {"BillingUsageEvent", "AuditLogEntry", "SampleResponse"} <= names
    assert len(RESPONSE_TYPES) > 60


@pytest.mark.parametrize("cls", RESPONSE_TYPES, ids=lambda c: c.__name__)
def test_null_in_every_optional_field_decodes(cls: type[t.Response]) -> None:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    body = _body(info)
    decoded = t.decode(msgspec.json.encode(body), cls)
    for field in info.fields:
        if field.required:
            continue
        got = getattr(decoded, field.name)
        if _accepts_none(field.type):
            assert got is None, (cls.__name__, field.name, got)
        else:
            default = (
                field.default_factory()
                if field.default_factory is not msgspec.NODEFAULT
                else field.default
            )
            assert got == default, (cls.__name__, field.name, got, default)


def test_nulls_inside_nested_and_listed_structs_take_their_defaults() -> None:
    """The shapes the peers were seen to send: a checkpoint listing with `time`, `public` and
    `size_bytes` null, and a training run whose nested checkpoint and flags are null."""
    listing = t.decode(
        b'{"checkpoints": [{"checkpoint_id": "checkpoints/c1", "checkpoint_type": "training",'
        b' "time": null, "tinker_path": "tinker://run-1/checkpoints/c1", "size_bytes": null,'
        b' "public": null, "user_metadata": null, "expires_at": null}], "cursor": null}',
        t.CheckpointsListResponse,
    )
    [checkpoint] = listing.checkpoints
    assert checkpoint.time is None and checkpoint.public is False
    assert checkpoint.tinker_path == "tinker://run-1/checkpoints/c1"
    runs = t.decode(
        b'{"training_runs": [{"training_run_id": "r", "base_model": "m", "model_owner": "o",'
        b' "is_lora": true, "last_request_time": "2026-01-05T10:00:00Z", "corrupted": null,'
        b' "lora_rank": null, "last_checkpoint": {"checkpoint_id": "weights/a",'
        b' "checkpoint_type": "training", "time": null, "tinker_path": "tinker://r/weights/a",'
        b' "public": null}}], "cursor": {"offset": 0, "limit": 20, "total_count": 1}}',
        t.TrainingRunsResponse,
    )
    [run] = runs.training_runs
    assert run.corrupted is False and run.last_checkpoint is not None
    assert run.last_checkpoint.public is False


def test_a_real_type_error_still_fails_with_its_path() -> None:
    """Leniency is about nulls only: a wrong type or a missing required field is refused."""
    with pytest.raises(msgspec.ValidationError, match=r"\$\.checkpoints\[0\]\.public"):
        t.decode(
            b'{"checkpoints": [{"checkpoint_id": "a", "checkpoint_type": "training",'
            b' "tinker_path": "tinker://r/weights/a", "public": "yes", "time": null}]}',
            t.CheckpointsListResponse,
        )
    with pytest.raises(msgspec.ValidationError, match="tinker_path"):
        t.decode(
            b'{"checkpoints": [{"checkpoint_id": "a", "checkpoint_type": "training",'
            b' "public": null}]}',
            t.CheckpointsListResponse,
        )
    with pytest.raises(msgspec.ValidationError, match="training_run_id"):
        t.decode(b'{"training_run_id": null}', t.TrainingRun)


def test_response_types_are_all_structs() -> None:
    assert all(inspect.isclass(c) and issubclass(c, msgspec.Struct) for c in RESPONSE_TYPES)
