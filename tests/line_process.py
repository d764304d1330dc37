"""A Python child process that talks in lines: how the tests and benchmarks launch IoT workers and consumers.

``LineProcess([script, *args])`` starts ``script`` with this interpreter and ``PYTHONPATH=plugins``; a daemon
thread collects every stdout line into ``lines`` (``READY``, ``COUNT n`` ..., and one JSON line of counts at the
end), so the parent polls ``lines`` without ever blocking on the pipe. ``finish()`` is the graceful end
(SIGTERM, then that JSON line); ``kill()`` is SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class LineProcess:
    def __init__(self, args: list[str], *, stdin: int | None = None, stderr: int | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], stdin=stdin, stdout=subprocess.PIPE, stderr=stderr,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def said(self, word: str) -> bool:
        return word in self.lines

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM, wait for the exit and the last line read; the last JSON line it printed."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self._reader.join(10)  # the pipe's last lines, read after the exit
        return json.loads(next(line for line in reversed(self.lines) if line.startswith("{")))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
