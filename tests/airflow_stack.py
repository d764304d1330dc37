"""What the tests that start a real Airflow (``airflow api-server`` or ``airflow standalone``) share.

- :func:`airflow_base_env`: the environment of ``scripts/airflow_env.sh``, as ``scripts/airflow.sh`` sources it;
  each fixture then sets its own home, port, metadata database and config file over it.
- :func:`free_port`: a free loopback port for the instance's api-server.
- :func:`wait_until_up`: the one start-up wait: the process is alive, ``/api/v2/monitor/health`` answers 200 and
  the caller's own readiness check (components healthy, DAGs parsed ...) holds, within a bound. A process that
  exits, or a bound that passes, fails the test with the tail of its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_BIN = ROOT / ".venv" / "bin" / "airflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_base_env() -> dict[str, str]:
    """``scripts/airflow_env.sh`` sourced over this process's environment, as ``scripts/airflow.sh`` does."""
    out = subprocess.run(["bash", "-c", "source scripts/airflow_env.sh && env -0"], cwd=ROOT, check=True,
                         capture_output=True, env={**os.environ, "ROOT": str(ROOT)}).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, *, what: str, timeout_s: float,
                  ready: Callable[[], bool] | None = None, poll_s: float = 1.0, http_timeout_s: float = 2.0) -> None:
    """Return once ``url``'s health endpoint answers 200 and ``ready()`` (if given) is true; fail the test when
    ``proc`` exits first or ``timeout_s`` passes. A connection error (still starting) is asked again."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if (httpx.get(f"{url}/api/v2/monitor/health", timeout=http_timeout_s).status_code == 200
                    and (ready is None or ready())):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready within {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(poll_s)  # waiting for a real server to start; the bound is timeout_s, not a timed assertion
