"""Benchmark results as data: every benchmark writes one JSON file under ``docs/results/``.

A result holds what was run (``command``, ``inputs``), where (``machine``: CPUs, load before the run,
versions, the code's commit), every round, and the summary figures with the goal they are judged against.
``tests/performance/report.py`` (``make report``) renders ``docs/benchmarks.md``'s table from these files,
so no figure there is typed by hand.

::

    write_result("spool_publish", command="...", inputs={...}, rounds=[{...}, ...],
                 summary={"put_batch_per_s": 1.0}, goals=[{"name": "...", "met": True, "figure": "..."}])
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def machine() -> dict[str, Any]:
    """Where a result was measured: host, CPUs, load (1/5/15 min), versions, the code's commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg()),
            "python": platform.python_version(), "platform": platform.platform(), "commit": commit}


def write_result(name: str, *, command: str, inputs: dict[str, Any], rounds: list[dict[str, Any]],
                 summary: dict[str, Any], goals: list[dict[str, Any]], machine_before: dict[str, Any] | None = None,
                 out: Path | None = None) -> Path:
    """Write ``<out>/<name>.json`` (default ``docs/results``); returns its path."""
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command, "run_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine_before or machine(), "machine_after": machine(), "inputs": inputs,
           "rounds": rounds, "summary": summary, "goals": goals}
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path
