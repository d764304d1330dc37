"""The demo's Airflow calls ride out an api-server that is starting or restarting (502/503/504); a 500 is an
error of the request and is raised at once (the metadata database is PostgreSQL: no "database is locked")."""

from __future__ import annotations

import json
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wildfire.demo.run import _http


class Flaky(BaseHTTPRequestHandler):
    """Answers the first ``failures`` requests with ``status``, then 200 with a JSON body."""

    failures = 0
    status = 500
    seen: list[str] = []

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen.append(self.path)
        if len(type(self).seen) <= type(self).failures:
            self.send_response(type(self).status)
            self.end_headers()
            return
        body = json.dumps({"is_paused": False}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Flaky.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_transient_503s_are_retried_with_doubling_waits(server: str, capsys) -> None:
    Flaky.failures, Flaky.status = 2, 503
    waits: list[float] = []
    assert _http("PATCH", f"{server}/api/v2/dags/x", {"is_paused": False}, sleep=waits.append) == {"is_paused": False}
    assert len(Flaky.seen) == 3 and waits == [1.0, 2.0]
    assert "HTTP 503; trying again in 1 s (1/5)" in capsys.readouterr().err


def test_a_500_is_raised_at_once(server: str) -> None:
    Flaky.failures, Flaky.status = 1, 500
    with pytest.raises(urllib.error.HTTPError) as err:
        _http("PATCH", f"{server}/api/v2/dags/x", {}, sleep=lambda s: pytest.fail("must not wait"))
    assert err.value.code == 500 and len(Flaky.seen) == 1


def test_gives_up_after_the_last_attempt(server: str) -> None:
    Flaky.failures, Flaky.status = 99, 503
    waits: list[float] = []
    with pytest.raises(urllib.error.HTTPError) as err:
        _http("PATCH", f"{server}/api/v2/dags/x", {}, attempts=3, sleep=waits.append)
    assert err.value.code == 503 and len(Flaky.seen) == 3 and waits == [1.0, 2.0]


def test_client_errors_are_not_retried(server: str) -> None:
    Flaky.failures, Flaky.status = 99, 404
    with pytest.raises(urllib.error.HTTPError) as err:
        _http("PATCH", f"{server}/api/v2/dags/missing", {}, sleep=lambda s: pytest.fail("must not wait"))
    assert err.value.code == 404 and len(Flaky.seen) == 1
