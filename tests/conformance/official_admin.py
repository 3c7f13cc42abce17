"""Session search and the admin calls through the official `tinker` 0.38 SDK.

`python official_admin.py BASE_URL API_KEY MODEL`: saves two checkpoints and deletes one, then
calls `RestClient.search_sessions` and the three `AdminClient` calls (audit log, billing usage
events, current checkpoint storage). The SDK builds its response objects without validation,
so each answer is validated again, strictly, by its official pydantic type (`model_validate`),
which refuses a null where the type wants a value. Prints one JSON object of what the test
checks.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta

import tinker
from tinker import types


def strict(model: object) -> object:
    """`model` validated again by its own type from its JSON form."""
    cls = type(model)
    return cls.model_validate(model.model_dump(mode="json", warnings=False))  # type: ignore[attr-defined]


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=model, rank=4, seed=0)
    training = training.result() if hasattr(training, "result") else training
    rest = service.create_rest_client()
    kept = training.save_state("kept").result().path
    gone = training.save_state("gone").result().path
    rest.delete_checkpoint_from_tinker_path(gone).result()

    found = strict(rest.search_sessions(types.SessionSearchRequest()).result())
    admin = tinker.AdminClient(base_url=base_url, api_key=api_key)
    audit = strict(admin.get_audit_log().result())
    checkpoint_audit = strict(admin.get_audit_log(event_type="checkpoints").result())
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    usage = strict(
        admin.get_billing_usage(hour - timedelta(hours=1), hour + timedelta(hours=1)).result()
    )
    storage = strict(admin.get_current_checkpoint_storage_usage().result())
    print(
        json.dumps(
            {
                "kept": kept,
                "gone": gone,
                "sessions": [
                    {
                        "session_id": s.session_id,
                        "project_id": s.project_id,
                        "owner": s.owner,
                        "checkpoints_count": s.checkpoints_count,
                        "status": s.status.type if s.status is not None else None,
                    }
                    for s in found.sessions  # type: ignore[attr-defined]
                ],
                "audit": [[e.event, e.tinker_path] for e in audit.entries],  # type: ignore[attr-defined]
                "checkpoint_audit": [e.event for e in checkpoint_audit.entries],  # type: ignore[attr-defined]
                "usage": [
                    {
                        "type": e.event_info.type,
                        "count": getattr(e.event_info, "count", None),
                        "free": getattr(e.event_info, "free", None),
                        "cost": e.estimated_cost_usd,
                        "session_id": e.session_id,
                        "project_id": e.project_id,
                    }
                    for e in usage.data  # type: ignore[attr-defined]
                ],
                "storage": [
                    {
                        "project_id": i.project_id,
                        "checkpoint_count": i.checkpoint_count,
                        "size_bytes": i.size_bytes,
                        "cost": i.estimated_monthly_cost_usd,
                    }
                    for i in storage.data  # type: ignore[attr-defined]
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
