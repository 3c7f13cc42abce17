"""Serve a synchronous `httpx.Request -> httpx.Response` function over real HTTP on 127.0.0.1.

The REST and download tests script their server as a plain function (one `Router` used both
behind `httpx.MockTransport` and here), so the same expectations run in memory and over real
sockets. The server is the standard library's threading HTTP server on an ephemeral port, in
a daemon thread: it needs no trio (the client under test owns the trio run), and its handler
threads never touch the test's event loop.

Bodies can be files (`FileBody`) so that large archives are streamed from disk, not held in
memory: the download benchmark measures the client's memory and must not be fooled by ours.
"""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["FileBody", "Handler", "serve"]


@dataclass(frozen=True)
class FileBody:
    """A response whose body is streamed from `path` with a Content-Length header."""

    path: Path
    status: int = 200
    content_length: bool = True


Handler = Callable[[httpx.Request], "httpx.Response | FileBody"]

_CHUNK = 1 << 16


@contextmanager
def serve(handler: Handler) -> Iterator[str]:
    """Run `handler` behind an HTTP/1.1 server; yield its base URL (`http://127.0.0.1:<port>`)."""

    class _RequestHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = httpx.Request(
                self.command,
                f"http://{self.headers.get('Host', '127.0.0.1')}{self.path}",
                headers=list(self.headers.items()),
                content=body,
            )
            reply = handler(request)
            if isinstance(reply, FileBody):
                self.send_response(reply.status)
                size = reply.path.stat().st_size
                if reply.content_length:
                    self.send_header("Content-Length", str(size))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                with reply.path.open("rb") as file:
                    shutil.copyfileobj(file, self.wfile, _CHUNK)
                if not reply.content_length:
                    self.close_connection = True
                return
            content = reply.content
            self.send_response(reply.status_code)
            for name, value in reply.headers.multi_items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, args=(0.02,), name="router-server", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
