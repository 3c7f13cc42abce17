"""The local Tinker-compatible backend (install the `local` extra).

`open_local_backend(...)` runs it inside your program (yields `.base_url` and `.api_key`);
`serve_local_backend(...)` is the same as a task for `nursery.start`; `tinkex-trio serve`
runs it from the command line.
"""

from tinkex_trio.local.server import (
    LocalBackend as LocalBackend,
    open_local_backend as open_local_backend,
    serve_local_backend as serve_local_backend,
)

__all__ = ["LocalBackend", "open_local_backend", "serve_local_backend"]
