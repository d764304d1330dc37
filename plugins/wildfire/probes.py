"""A process's own HTTP endpoints for Kubernetes probes and Prometheus, outside Airflow.

    GET /health   200 {"status": "ok"|"degraded", ...}  or 503 {"status": "unhealthy", "reasons": [...]}
    GET /ready    200 once the process has started its work, 503 before
    GET /metrics  Prometheus text from the given registry
    GET /status   the process's JSON snapshot (optional)

Binds ``host:port`` (port 0 picks a free one, read back from ``ProbeServer.port``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

Health = Callable[[], tuple[bool, list[str], list[str]]]


class ProbeServer:
    def __init__(self, registry: CollectorRegistry, health: Health, *, ready: Callable[[], bool],
                 status: Callable[[], dict[str, Any]] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                code, ctype, body = probe.answer(self.path)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.registry, self.health, self.ready, self.status = registry, health, ready, status
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = self._httpd.server_address[1]

    def answer(self, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(self.registry)
        if path == "/health":
            ok, reasons, warnings = self.health()
            status = ("degraded" if warnings else "ok") if ok else "unhealthy"
            body = {"status": status, "reasons": reasons, "warnings": warnings}
            return (200 if ok else 503), "application/json", json.dumps(body).encode()
        if path == "/ready":
            ready = bool(self.ready())
            return (200 if ready else 503), "application/json", json.dumps({"ready": ready}).encode()
        if path == "/status" and self.status is not None:
            return 200, "application/json", json.dumps(self.status(), default=str).encode()
        return 404, "text/plain", b"not found"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ProbeServer:
        threading.Thread(target=self._httpd.serve_forever, name="probes", daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
