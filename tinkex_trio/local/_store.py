"""The local backend's durable state: one SQLite database (WAL) in the data directory.

Tables: sessions, models (training runs), checkpoints, sampling_sessions, futures. Checkpoint
files live beside the database; the table holds their paths.

Threading decision: every call runs **inline on the trio thread**. Each statement touches a
handful of small rows in a local WAL database (tens of microseconds; a commit with
`synchronous=NORMAL` does not fsync), so a thread hop (~50-100 µs plus a CapacityLimiter) would
cost more than the work. Running inline also keeps the server deterministic under
`trio.testing.MockClock(autojump_threshold=0)`, which cannot see worker threads. The one large
value, a future's result payload, is written once and read once per completed poll.

After a restart everything survives; futures that were pending or running are failed with
category `server` (see `Store.open`), and training runs whose adapter lived only in the engine's
memory are marked `corrupted` (the weights since their last checkpoint are gone).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FutureState = Literal["pending", "running", "done", "failed"]
Category = Literal["user", "server", "unknown"]

#: Message stored in futures that were in flight when the server stopped.
RESTART_FAILURE_MESSAGE = (
    "The local backend restarted while this request was pending; it was not executed. "
    "Submit it again (training clients must be recreated from a checkpoint)."
)


class StoreOpenError(ValueError):
    """The database cannot be opened or recovered; one line naming the file, cause and fix."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    user_metadata TEXT,
    project_id TEXT,
    display_name TEXT,
    sdk_version TEXT,
    finished_reason TEXT,
    last_heartbeat REAL
);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    model_seq_id INTEGER NOT NULL,
    base_model TEXT NOT NULL,
    lora_config TEXT NOT NULL,
    optimizer_config TEXT NOT NULL DEFAULT '{"type": "adamw"}',
    user_metadata TEXT,
    created_at REAL NOT NULL,
    last_request_time REAL NOT NULL,
    corrupted INTEGER NOT NULL DEFAULT 0,
    unloaded INTEGER NOT NULL DEFAULT 0,
    next_seq_id INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    checkpoint_type TEXT NOT NULL,
    created_at REAL NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER,
    public INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,
    user_metadata TEXT,
    PRIMARY KEY (run_id, checkpoint_id)
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    sampling_session_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    model_path TEXT,
    adapter_dir TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    model_id TEXT,
    sampling_session_id TEXT,
    seq_id INTEGER,
    request_type TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    result BLOB,
    error TEXT,
    category TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (model_id, seq_id),
    UNIQUE (sampling_session_id, seq_id)
);
CREATE INDEX IF NOT EXISTS checkpoints_by_time ON checkpoints (created_at);
CREATE INDEX IF NOT EXISTS models_by_session ON models (session_id);
"""

#: The audit log (`GET audit`, and checkpoint lifetimes for billing usage): one row per change
#: of a session, training run or checkpoint, written by the Store method that makes it.
_AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL,
    event TEXT NOT NULL,
    details TEXT NOT NULL,
    model_id TEXT,
    tinker_path TEXT,
    purpose TEXT
);
CREATE INDEX IF NOT EXISTS audit_events_by_time ON audit_events (timestamp);
"""


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    created_at: float
    tags: list[str]
    user_metadata: dict[str, str] | None
    project_id: str | None
    display_name: str | None
    finished_reason: str | None
    last_heartbeat: float | None


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: dict[str, Any]
    optimizer_config: dict[str, Any]
    user_metadata: dict[str, str] | None
    created_at: float
    last_request_time: float
    corrupted: bool
    unloaded: bool
    next_seq_id: int


@dataclass(frozen=True)
class CheckpointRow:
    run_id: str
    checkpoint_id: str  # "weights/<name>", "sampler_weights/<name>", "external_weights/<name>"
    checkpoint_type: Literal["training", "sampler", "external"]
    created_at: float
    path: str  # directory on disk
    size_bytes: int | None
    public: bool
    expires_at: float | None
    user_metadata: dict[str, str] | None

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"


@dataclass(frozen=True)
class SamplingSessionRow:
    sampling_session_id: str
    session_id: str
    base_model: str
    model_path: str | None
    adapter_dir: str | None
    created_at: float


@dataclass(frozen=True)
class FutureRow:
    request_id: str
    model_id: str | None
    sampling_session_id: str | None
    seq_id: int | None
    request_type: str
    payload_hash: str
    state: FutureState
    result: bytes | None
    error: str | None
    category: str | None


@dataclass(frozen=True)
class AuditRow:
    """One audited change: `event` is `<resource>_<action>` (`checkpoint_create`, ...)."""

    timestamp: float
    event: str
    details: dict[str, Any]
    model_id: str | None
    tinker_path: str | None
    purpose: str | None


def _dumps(value: object) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class Store:
    """Typed access to the database. Not thread-safe: use it from the trio thread only."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: Path, *, now: float | None = None) -> Store:
        """Open (creating if needed) and recover from an unclean or clean stop.

        Recovery: pending/running futures become failed (category `server`), and every live
        training run is marked corrupted, because its weights lived in the engine's memory.

        Raises:
            StoreOpenError: SQLite cannot open, read or write the file.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.executescript(_AUDIT_SCHEMA)
            store = cls(conn)
            stamp = time.time() if now is None else now
            with store._tx():
                conn.execute(
                    "UPDATE futures SET state='failed', error=?, category='server', finished_at=? "
                    "WHERE state IN ('pending', 'running')",
                    (RESTART_FAILURE_MESSAGE, stamp),
                )
                conn.execute("UPDATE models SET corrupted=1 WHERE unloaded=0")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreOpenError(
                f"cannot use the database {path} ({exc}); make it and its directory writable "
                "and check the disk, or pass --data-dir (data_dir=) another directory"
            ) from None
        return store

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ---------------------------------------------------------------- sessions

    def insert_session(
        self,
        session_id: str,
        *,
        created_at: float,
        tags: list[str],
        user_metadata: Mapping[str, str] | None,
        project_id: str | None,
        display_name: str | None,
        sdk_version: str | None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO sessions (session_id, created_at, tags, user_metadata, project_id,"
            " display_name, sdk_version, last_heartbeat) VALUES (?,?,?,?,?,?,?,?)",
            (
                session_id,
                created_at,
                json.dumps(tags),
                _dumps(dict(user_metadata) if user_metadata is not None else None),
                project_id,
                display_name,
                sdk_version,
                created_at,
            ),
        )
        self.record_event(
            "session_create",
            {
                "session_id": session_id,
                "project_id": project_id,
                "display_name": display_name,
                "tags": tags,
            },
            timestamp=created_at,
        )

    def get_session(self, session_id: str) -> SessionRow | None:
        row = self._conn.execute(
            "SELECT * FROM sessions WHERE session_id=?", (session_id,)
        ).fetchone()
        if row is None:
            return None
        return SessionRow(
            session_id=row["session_id"],
            created_at=row["created_at"],
            tags=json.loads(row["tags"]),
            user_metadata=_loads(row["user_metadata"]),
            project_id=row["project_id"],
            display_name=row["display_name"],
            finished_reason=row["finished_reason"],
            last_heartbeat=row["last_heartbeat"],
        )

    def heartbeat(self, session_id: str, now: float) -> None:
        self._conn.execute(
            "UPDATE sessions SET last_heartbeat=? WHERE session_id=?", (now, session_id)
        )

    def finish_session(self, session_id: str, reason: str) -> None:
        cursor = self._conn.execute(
            "UPDATE sessions SET finished_reason=? WHERE session_id=? AND finished_reason IS NULL",
            (reason, session_id),
        )
        if cursor.rowcount:
            self.record_event("session_finish", {"session_id": session_id, "reason": reason})

    def open_sessions(self) -> list[str]:
        """Ids of the sessions not finished yet."""
        rows = self._conn.execute(
            "SELECT session_id FROM sessions WHERE finished_reason IS NULL"
        ).fetchall()
        return [r[0] for r in rows]

    def set_session_project(self, session_id: str, project_id: str) -> None:
        self._conn.execute(
            "UPDATE sessions SET project_id=? WHERE session_id=?", (project_id, session_id)
        )
        self.record_event(
            "project_session_assign", {"session_id": session_id, "project_id": project_id}
        )

    def all_sessions(self) -> list[SessionRow]:
        """Every session, newest first (ties by session id, descending): the search order."""
        rows = self._conn.execute(
            "SELECT session_id FROM sessions ORDER BY created_at DESC, session_id DESC"
        ).fetchall()
        found = [self.get_session(r[0]) for r in rows]
        return [row for row in found if row is not None]

    def checkpoint_stats_of_session(self, session_id: str) -> tuple[int, int]:
        """(number of checkpoints, their total bytes) over the session's training runs."""
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM checkpoints WHERE run_id IN"
            " (SELECT model_id FROM models WHERE session_id=?)",
            (session_id,),
        ).fetchone()
        return int(row[0]), int(row[1])

    def futures_of_session(self, session_id: str) -> list[dict[str, Any]]:
        """The session's requests (no result payloads), oldest first, for trace exports."""
        rows = self._conn.execute(
            "SELECT request_id, request_type, model_id, sampling_session_id, seq_id, state,"
            " error, category, created_at, finished_at FROM futures"
            " WHERE model_id IN (SELECT model_id FROM models WHERE session_id=?)"
            " OR sampling_session_id IN"
            " (SELECT sampling_session_id FROM sampling_sessions WHERE session_id=?)"
            " ORDER BY created_at, request_id",
            (session_id, session_id),
        ).fetchall()
        return [dict(r) for r in rows]

    def list_sessions(self, *, limit: int, offset: int) -> tuple[list[str], int]:
        total = int(self._conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
        rows = self._conn.execute(
            "SELECT session_id FROM sessions ORDER BY created_at DESC, session_id DESC"
            " LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [r[0] for r in rows], total

    # ------------------------------------------------------------------ models

    def insert_model(
        self,
        *,
        model_id: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora_config: Mapping[str, Any],
        optimizer_config: Mapping[str, Any],
        user_metadata: Mapping[str, str] | None,
        now: float,
    ) -> None:
        self._conn.execute(
            "INSERT INTO models (model_id, session_id, model_seq_id, base_model, lora_config,"
            " optimizer_config, user_metadata, created_at, last_request_time)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (
                model_id,
                session_id,
                model_seq_id,
                base_model,
                json.dumps(dict(lora_config), sort_keys=True),
                json.dumps(dict(optimizer_config), sort_keys=True),
                _dumps(dict(user_metadata) if user_metadata is not None else None),
                now,
                now,
            ),
        )
        self.record_event(
            "training_run_create",
            {"training_run_id": model_id, "session_id": session_id, "base_model": base_model},
            timestamp=now,
            model_id=model_id,
        )

    def _model(self, row: sqlite3.Row) -> ModelRow:
        return ModelRow(
            model_id=row["model_id"],
            session_id=row["session_id"],
            model_seq_id=row["model_seq_id"],
            base_model=row["base_model"],
            lora_config=json.loads(row["lora_config"]),
            optimizer_config=json.loads(row["optimizer_config"]),
            user_metadata=_loads(row["user_metadata"]),
            created_at=row["created_at"],
            last_request_time=row["last_request_time"],
            corrupted=bool(row["corrupted"]),
            unloaded=bool(row["unloaded"]),
            next_seq_id=row["next_seq_id"],
        )

    def get_model(self, model_id: str) -> ModelRow | None:
        row = self._conn.execute("SELECT * FROM models WHERE model_id=?", (model_id,)).fetchone()
        return None if row is None else self._model(row)

    def update_model(self, model_id: str, **fields: object) -> None:
        """Update named columns; dict values are stored as JSON."""
        allowed = {
            "base_model",
            "lora_config",
            "optimizer_config",
            "last_request_time",
            "corrupted",
            "unloaded",
            "next_seq_id",
            "user_metadata",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update model columns {sorted(unknown)}")
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        values = [
            json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in fields.values()
        ]
        self._conn.execute(f"UPDATE models SET {cols} WHERE model_id=?", (*values, model_id))

    def list_models(self, *, limit: int, offset: int) -> tuple[list[ModelRow], int]:
        total = int(self._conn.execute("SELECT COUNT(*) FROM models").fetchone()[0])
        rows = self._conn.execute(
            "SELECT * FROM models ORDER BY created_at DESC, model_id DESC LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [self._model(r) for r in rows], total

    def list_models_in_project(
        self, project_id: str, *, include_unassigned: bool, limit: int, offset: int
    ) -> tuple[list[ModelRow], int]:
        """One page of the training runs whose session is in `project_id` (and, with
        `include_unassigned`, those whose session has no project), newest first; and the total."""
        where = (
            " FROM models WHERE session_id IN (SELECT session_id FROM sessions WHERE project_id=?"
            + (" OR project_id IS NULL)" if include_unassigned else ")")
        )
        total = int(self._conn.execute("SELECT COUNT(*)" + where, (project_id,)).fetchone()[0])
        rows = self._conn.execute(
            "SELECT *" + where + " ORDER BY created_at DESC, model_id DESC LIMIT ? OFFSET ?",
            (project_id, limit, offset),
        ).fetchall()
        return [self._model(r) for r in rows], total

    def models_of_session(self, session_id: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT model_id FROM models WHERE session_id=? ORDER BY model_seq_id", (session_id,)
        ).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------- checkpoints

    def upsert_checkpoint(self, ck: CheckpointRow) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO checkpoints (run_id, checkpoint_id, checkpoint_type,"
            " created_at, path, size_bytes, public, expires_at, user_metadata)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (
                ck.run_id,
                ck.checkpoint_id,
                ck.checkpoint_type,
                ck.created_at,
                ck.path,
                ck.size_bytes,
                int(ck.public),
                ck.expires_at,
                _dumps(ck.user_metadata),
            ),
        )
        self.record_event(
            "checkpoint_create",
            {
                "training_run_id": ck.run_id,
                "checkpoint_id": ck.checkpoint_id,
                "checkpoint_type": ck.checkpoint_type,
                "size_bytes": ck.size_bytes,
                "expires_at": ck.expires_at,
            },
            timestamp=ck.created_at,
            model_id=ck.run_id,
            tinker_path=ck.tinker_path,
        )

    def _checkpoint(self, row: sqlite3.Row) -> CheckpointRow:
        return CheckpointRow(
            run_id=row["run_id"],
            checkpoint_id=row["checkpoint_id"],
            checkpoint_type=row["checkpoint_type"],
            created_at=row["created_at"],
            path=row["path"],
            size_bytes=row["size_bytes"],
            public=bool(row["public"]),
            expires_at=row["expires_at"],
            user_metadata=_loads(row["user_metadata"]),
        )

    def get_checkpoint(self, run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        row = self._conn.execute(
            "SELECT * FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run_id, checkpoint_id)
        ).fetchone()
        return None if row is None else self._checkpoint(row)

    def checkpoints_of_run(self, run_id: str) -> list[CheckpointRow]:
        rows = self._conn.execute(
            "SELECT * FROM checkpoints WHERE run_id=? ORDER BY created_at DESC, checkpoint_id",
            (run_id,),
        ).fetchall()
        return [self._checkpoint(r) for r in rows]

    def list_checkpoints(self, *, limit: int, offset: int) -> tuple[list[CheckpointRow], int]:
        total = int(self._conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0])
        rows = self._conn.execute(
            "SELECT * FROM checkpoints ORDER BY created_at DESC, run_id, checkpoint_id"
            " LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [self._checkpoint(r) for r in rows], total

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        ck = self.get_checkpoint(run_id, checkpoint_id)
        self._conn.execute(
            "DELETE FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run_id, checkpoint_id)
        )
        if ck is not None:
            # created_at and size_bytes let billing usage count the storage it held.
            self.record_event(
                "checkpoint_delete",
                {
                    "training_run_id": run_id,
                    "checkpoint_id": checkpoint_id,
                    "checkpoint_type": ck.checkpoint_type,
                    "size_bytes": ck.size_bytes,
                    "created_at": ck.created_at,
                },
                model_id=run_id,
                tinker_path=ck.tinker_path,
            )

    def set_checkpoint_public(self, run_id: str, checkpoint_id: str, public: bool) -> None:
        self._conn.execute(
            "UPDATE checkpoints SET public=? WHERE run_id=? AND checkpoint_id=?",
            (int(public), run_id, checkpoint_id),
        )
        self.record_event(
            "checkpoint_publish" if public else "checkpoint_unpublish",
            {"training_run_id": run_id, "checkpoint_id": checkpoint_id},
            model_id=run_id,
            tinker_path=f"tinker://{run_id}/{checkpoint_id}",
        )

    def set_checkpoint_expiry(
        self, run_id: str, checkpoint_id: str, expires_at: float | None
    ) -> None:
        self._conn.execute(
            "UPDATE checkpoints SET expires_at=? WHERE run_id=? AND checkpoint_id=?",
            (expires_at, run_id, checkpoint_id),
        )
        self.record_event(
            "checkpoint_ttl_set",
            {"training_run_id": run_id, "checkpoint_id": checkpoint_id, "expires_at": expires_at},
            model_id=run_id,
            tinker_path=f"tinker://{run_id}/{checkpoint_id}",
        )

    def expired_checkpoints(self, now: float) -> list[CheckpointRow]:
        rows = self._conn.execute(
            "SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        ).fetchall()
        return [self._checkpoint(r) for r in rows]

    # ------------------------------------------------------- sampling sessions

    def insert_sampling_session(self, row: SamplingSessionRow) -> None:
        self._conn.execute(
            "INSERT INTO sampling_sessions (sampling_session_id, session_id, base_model,"
            " model_path, adapter_dir, created_at) VALUES (?,?,?,?,?,?)",
            (
                row.sampling_session_id,
                row.session_id,
                row.base_model,
                row.model_path,
                row.adapter_dir,
                row.created_at,
            ),
        )

    def get_sampling_session(self, sampling_session_id: str) -> SamplingSessionRow | None:
        row = self._conn.execute(
            "SELECT * FROM sampling_sessions WHERE sampling_session_id=?", (sampling_session_id,)
        ).fetchone()
        if row is None:
            return None
        return SamplingSessionRow(
            sampling_session_id=row["sampling_session_id"],
            session_id=row["session_id"],
            base_model=row["base_model"],
            model_path=row["model_path"],
            adapter_dir=row["adapter_dir"],
            created_at=row["created_at"],
        )

    def samplers_of_session(self, session_id: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT sampling_session_id FROM sampling_sessions WHERE session_id=?"
            " ORDER BY created_at, sampling_session_id",
            (session_id,),
        ).fetchall()
        return [r[0] for r in rows]

    # ----------------------------------------------------------------- futures

    def insert_future(
        self,
        *,
        request_id: str,
        model_id: str | None,
        sampling_session_id: str | None,
        seq_id: int | None,
        request_type: str,
        payload_hash: str,
        now: float,
    ) -> None:
        """Insert a pending future. Raises sqlite3.IntegrityError on a duplicate seq_id."""
        self._conn.execute(
            "INSERT INTO futures (request_id, model_id, sampling_session_id, seq_id,"
            " request_type, payload_hash, state, created_at) VALUES (?,?,?,?,?,?,'pending',?)",
            (request_id, model_id, sampling_session_id, seq_id, request_type, payload_hash, now),
        )

    def _future(self, row: sqlite3.Row) -> FutureRow:
        return FutureRow(
            request_id=row["request_id"],
            model_id=row["model_id"],
            sampling_session_id=row["sampling_session_id"],
            seq_id=row["seq_id"],
            request_type=row["request_type"],
            payload_hash=row["payload_hash"],
            state=row["state"],
            result=row["result"],
            error=row["error"],
            category=row["category"],
        )

    def get_future(self, request_id: str) -> FutureRow | None:
        row = self._conn.execute(
            "SELECT * FROM futures WHERE request_id=?", (request_id,)
        ).fetchone()
        return None if row is None else self._future(row)

    def find_future_by_seq(
        self, *, model_id: str | None, sampling_session_id: str | None, seq_id: int
    ) -> FutureRow | None:
        if model_id is not None:
            row = self._conn.execute(
                "SELECT * FROM futures WHERE model_id=? AND seq_id=?", (model_id, seq_id)
            ).fetchone()
        else:
            row = self._conn.execute(
                "SELECT * FROM futures WHERE sampling_session_id=? AND seq_id=?",
                (sampling_session_id, seq_id),
            ).fetchone()
        return None if row is None else self._future(row)

    def max_seq_of_model(self, model_id: str) -> int | None:
        value = self._conn.execute(
            "SELECT MAX(seq_id) FROM futures WHERE model_id=?", (model_id,)
        ).fetchone()[0]
        return None if value is None else int(value)

    def mark_running(self, request_id: str) -> None:
        self._conn.execute(
            "UPDATE futures SET state='running' WHERE request_id=? AND state='pending'",
            (request_id,),
        )

    def complete_future(self, request_id: str, result: bytes, now: float) -> None:
        self._conn.execute(
            "UPDATE futures SET state='done', result=?, finished_at=? WHERE request_id=?",
            (result, now, request_id),
        )

    def drop_result(self, request_id: str) -> None:
        """Delete a finished future's result payload (PROTOCOL.md 4.8 `retrieved_request_ids`).

        The row stays `done` with a NULL result, which no completion ever writes, so a later
        poll can tell "retrieved and deleted" (410) from "unknown" (404); the seq_id stays
        taken, so a resubmission of it is still recognised as a duplicate.
        """
        self._conn.execute(
            "UPDATE futures SET result=NULL WHERE request_id=? AND state='done'", (request_id,)
        )

    def fail_future(self, request_id: str, error: str, category: Category, now: float) -> None:
        self._conn.execute(
            "UPDATE futures SET state='failed', error=?, category=?, finished_at=?"
            " WHERE request_id=?",
            (error, category, now, request_id),
        )

    # ------------------------------------------------------------------- audit

    def record_event(
        self,
        event: str,
        details: Mapping[str, Any],
        *,
        timestamp: float | None = None,
        model_id: str | None = None,
        tinker_path: str | None = None,
        purpose: str | None = None,
    ) -> None:
        """Append one audit event (`<resource>_<action>`); `details` must be JSON-able."""
        self._conn.execute(
            "INSERT INTO audit_events (timestamp, event, details, model_id, tinker_path, purpose)"
            " VALUES (?,?,?,?,?,?)",
            (
                time.time() if timestamp is None else timestamp,
                event,
                json.dumps(dict(details), sort_keys=True),
                model_id,
                tinker_path,
                purpose,
            ),
        )

    def audit_events(
        self, *, start: float, end: float, prefix: str | None = None
    ) -> list[AuditRow]:
        """Events with start <= timestamp < end (all of them, or those whose name starts with
        `prefix`), oldest first."""
        query = "SELECT * FROM audit_events WHERE timestamp >= ? AND timestamp < ?"
        args: list[Any] = [start, end]
        if prefix is not None:
            query += " AND substr(event, 1, ?) = ?"
            args += [len(prefix), prefix]
        rows = self._conn.execute(query + " ORDER BY timestamp, id", args).fetchall()
        return [
            AuditRow(
                timestamp=r["timestamp"],
                event=r["event"],
                details=json.loads(r["details"]),
                model_id=r["model_id"],
                tinker_path=r["tinker_path"],
                purpose=r["purpose"],
            )
            for r in rows
        ]

    def sessions_of_runs(self, run_ids: list[str]) -> dict[str, tuple[str, str]]:
        """run id -> (session id, base model) for the given training runs that exist."""
        found: dict[str, tuple[str, str]] = {}
        for run_id in set(run_ids):
            row = self._conn.execute(
                "SELECT session_id, base_model FROM models WHERE model_id=?", (run_id,)
            ).fetchone()
            if row is not None:
                found[run_id] = (row["session_id"], row["base_model"])
        return found

    def live_checkpoint_spans(self) -> list[tuple[str, float, float | None, int]]:
        """(run id, created_at, expires_at, size_bytes) of every checkpoint row."""
        rows = self._conn.execute(
            "SELECT run_id, created_at, expires_at, COALESCE(size_bytes, 0) FROM checkpoints"
        ).fetchall()
        return [(r[0], float(r[1]), r[2], int(r[3])) for r in rows]
