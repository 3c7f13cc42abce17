"""The local Tinker-compatible backend (install the `local` extra).

`open_local_backend(...)` runs it inside your program (yields `.base_url` and `.api_key`);
`serve_local_backend(...)` is the same as a task for `nursery.start`; `tinkex-trio serve`
runs it from the command line. All three take the options of `LocalBackendSettings`, as
keywords or as one `settings=` value. `tinkex_trio.local.testing.FakeEngine` runs the same
server without a model, for fast tests of your own code.

Layout (one job per module; the public ones have no underscore):

    server.py               serve_local_backend, open_local_backend, `tinkex-trio serve`
    testing.py              FakeEngine: a deterministic engine with explicit fault injection
    model_files.py          built-in models: the GGUF-derived SmolLM2 and the tiny random model
    engine/                 the PyTorch engine (LoRA, losses, AdamW, sampling)
    _settings.py            LocalBackendSettings: every serve option, checked, frozen
    _app.py                 BackendApp (ASGI: routing, auth, errors), open_backend_app
    _backend.py             Backend: the state every route group shares, and its lookups
    _routes_service.py      client/config, dynamic_config, auth/token, telemetry, health
    _routes_sessions.py     sessions: create, heartbeat, finish, list, get, project,
                            trace export, search
    _routes_models.py       training runs: create_model, get_info, forward(_backward),
                            optim_step, load_weights, unload_model, run listing
    _routes_checkpoints.py  checkpoints: saves, listing, delete, publish, TTL, weights_info,
                            archives, external-weights URLs, copy_weights
    _routes_sampling.py     sampling sessions, samplers, asample
    _routes_futures.py      retrieve_future, retrieve_futures, cancel_future
    _routes_admin.py        audit log, billing usage events, current checkpoint storage
    _age_export.py          age encryption of save_weights_external files (pyrage)
    _routes_custom_loss.py  create_custom_loss; forward_backward with loss_fn "custom"
    _custom_graph.py        custom-loss graphs: the allowlists, checks, per-session store
    _submit.py              TrainingSubmitter: dedup, checks and queueing by seq_id
    _checkpoints.py         Checkpoints: files, staging and atomic writes, rows, expiry, copies
    _archive.py             checkpoint tar.gz archives
    _trace_exports.py       session trace export files
    _signed_urls.py         signed, expiring URLs (archives, files, traces)
    _jwt.py                 JWT-exchange auth
    _futures.py             FutureRegistry (long-polls, completion logs), poll answers
    _scheduler.py           EngineRunner (the engine's one caller), training lanes,
                            sampling batcher
    _store.py               the SQLite store (and its audit log)
    _convert.py             wire types to engine types, with the input checks
    _stability.py           what record_stability_info samplers saw, per sequence id
                            (per session, a day after last use, memory-capped)
    _provenance.py          a datum's provenance spans checked against those recordings
    _engine_api.py          the Engine protocol and its plain types (the engine seam)
    _http.py                the small ASGI layer: requests, router, JSON and file answers

Every answer is encoded from the `tinkex_trio.types` Structs the SDK decodes.
"""

from tinkex_trio.local._settings import (
    LocalBackendOptions as LocalBackendOptions,
    LocalBackendSettings as LocalBackendSettings,
)
from tinkex_trio.local.server import (
    LocalBackend as LocalBackend,
    open_local_backend as open_local_backend,
    serve_local_backend as serve_local_backend,
)

__all__ = [
    "LocalBackend",
    "LocalBackendOptions",
    "LocalBackendSettings",
    "open_local_backend",
    "serve_local_backend",
]
