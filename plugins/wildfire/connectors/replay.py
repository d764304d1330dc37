"""A real local HTTP server that replays canned upstream answers, for tests and benchmarks.

Connectors are pointed at ``server.url`` exactly as at the real API, so the whole HTTP code path
(httpx pooling, headers, status handling, Retry-After) runs; nothing in the connector is patched.

    with ReplayServer() as srv:
        srv.route("/alerts/active", Reply(200, body))                 # same answer every time
        srv.route("/x", [Reply(429, b"", {"Retry-After": "1"}), Reply(200, body)])   # in order, last repeats
        srv.route_prefix("/stations/", lambda path, query: Reply(200, ...))          # computed answer
        srv.route("/cut", Reply(200, body[:100], content_length=len(body)))           # dropped mid-body
        srv.url  # http://127.0.0.1:<port>

Binds 127.0.0.1 on a free port; each request runs in its own thread, so ``delay_s`` answers overlap
the way a slow real upstream's do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass(slots=True, frozen=True)
class Reply:
    """One canned HTTP answer."""

    status: int = 200
    """HTTP status code."""
    body: bytes = b""
    """Response body, sent as is (may be truncated or malformed on purpose)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (Content-Type, Retry-After ...)."""
    delay_s: float = 0.0
    """Seconds to wait before answering (a slow upstream)."""
    content_length: int | None = None
    """Content-Length to announce; None: the body's length. More than the body imitates a connection
    dropped mid-body, -1 sends no Content-Length (the body ends when the connection closes). Either
    way other than None the connection is closed after the body."""


@dataclass(slots=True, frozen=True)
class SeenRequest:
    """A request the server received."""

    path: str
    """Path without the query string."""
    query: dict[str, list[str]]
    """Parsed query string."""
    headers: dict[str, str]
    """Request headers, names lower-cased."""


Handler = Reply | list[Reply] | Callable[[str, dict[str, list[str]]], Reply]


class ReplayServer:
    def __init__(self, port: int = 0) -> None:
        self._exact: dict[str, Handler] = {}
        self._prefix: list[tuple[str, Handler]] = []
        self._cursor: dict[str, int] = {}
        self._lock = threading.Lock()
        self.requests: list[SeenRequest] = []
        self.outage: Reply | None = None  # set: every route answers this (an upstream outage), see set_outage
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is exercised

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                with server._lock:
                    server.requests.append(
                        SeenRequest(parts.path, query, {k.lower(): v for k, v in self.headers.items()})
                    )
                reply = server._answer(parts.path, query)
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length is None:
                    self.send_header("Content-Length", str(len(reply.body)))
                else:
                    self.close_connection = True
                    self.send_header("Connection", "close")
                    if reply.content_length >= 0:
                        self.send_header("Content-Length", str(reply.content_length))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test output
                pass

        class _Server(ThreadingHTTPServer):
            # The default listen backlog (5) drops simultaneous connects and the client retries a
            # second later: a real API front end accepts many at once, and so must this.
            request_queue_size = 256

        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def route(self, path: str, handler: Handler) -> None:
        self._exact[path] = handler
        self._cursor.pop(path, None)

    def route_prefix(self, prefix: str, handler: Handler) -> None:
        self._prefix.append((prefix, handler))

    def set_outage(self, reply: Reply | None = Reply(503, b"Service Unavailable", {"Retry-After": "1"})) -> None:
        """Answer every request with ``reply`` (default 503) until called with ``None``: an upstream outage."""
        self.outage = reply

    def _answer(self, path: str, query: dict[str, list[str]]) -> Reply:
        if self.outage is not None:
            return self.outage
        handler: Handler | None = self._exact.get(path)
        slot = path
        if handler is None:
            for prefix, h in self._prefix:
                if path.startswith(prefix):
                    handler, slot = h, prefix
                    break
        if handler is None:
            return Reply(404, b'{"detail": "no route in replay server"}', {"Content-Type": "application/json"})
        if isinstance(handler, Reply):
            return handler
        if isinstance(handler, list):
            with self._lock:
                i = self._cursor.get(slot, 0)
                self._cursor[slot] = i + 1
            return handler[min(i, len(handler) - 1)]
        return handler(path, query)

    def start(self) -> ReplayServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="replay-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
