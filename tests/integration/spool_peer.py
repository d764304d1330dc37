"""Another process on a worker's spool, for tests/integration/test_worker_doorbell.py.

``python tests/integration/spool_peer.py write CONFIG SOURCE SECONDS INTERVAL_S BATCH CRITICAL_EVERY_S``: admits
``BATCH`` NORMAL records of ``SOURCE`` every ``INTERVAL_S`` through an ``Ingestor`` on the spool of CONFIG (a
JSON stream config), and one CRITICAL record every ``CRITICAL_EVERY_S`` (0: none), for ``SECONDS``; prints one
``RESULT {json}`` line: records written, the CRITICAL keys, and the doorbell rings sent and failed.

``python tests/integration/spool_peer.py worker CONFIG``: runs a ``StreamWorker`` (real_time, nothing polled) on
that spool and prints ``BOUND <doorbell path> <bound>`` once its doorbell is bound; runs until killed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from wildfire.config import build_config
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager


def write(config: Path, source: str, seconds: float, interval_s: float, batch: int, critical_every_s: float) -> None:
    cfg = build_config(json.loads(config.read_text()))
    spool = BufferManager(cfg.spool, cfg.sources)
    ingestor = Ingestor(spool, cfg)
    written, criticals, i = 0, [], 0
    start = time.monotonic()
    next_critical = start + critical_every_s if critical_every_s else float("inf")
    due = start
    while time.monotonic() - start < seconds:
        keys = [f"bulk-{i + j}" for j in range(batch)]
        i += batch
        report = ingestor.accept(source, EncodedBatch(source, keys, [Priority.NORMAL] * batch,
                                                      [b'{"k":"%s"}' % k.encode() for k in keys]))
        written += report.accepted_total
        if time.monotonic() >= next_critical:
            key = f"alert-{len(criticals)}"
            report = ingestor.accept(source, EncodedBatch(source, [key], [Priority.CRITICAL], [b'{"alert":1}']))
            assert report.accepted == {"CRITICAL": 1}, report
            criticals.append(key)
            written += 1
            next_critical += critical_every_s
        due += interval_s
        time.sleep(max(0.0, due - time.monotonic()))
    bell = getattr(ingestor, "bell", None)  # None: admission without a doorbell
    spool.close()
    print("RESULT " + json.dumps({"written": written, "critical_keys": criticals, "rung": bell.rung if bell else 0,
                                  "failed": bell.failed if bell else 0}), flush=True)


def worker(config: Path) -> None:
    from wildfire.worker import StreamWorker

    class NoLag:
        def total_lag(self) -> int:
            return 0

    cfg = build_config(json.loads(config.read_text()))
    w = StreamWorker(cfg, mode="real_time", sources=["era5"], run_minutes=10, status_db=False, metrics_port=-1,
                     lag_source=NoLag())
    print(f"BOUND {w.doorbell.path} {w.doorbell.bound}", flush=True)
    w.run()


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "write":
        write(Path(rest[0]), rest[1], float(rest[2]), float(rest[3]), int(rest[4]), float(rest[5]))
    elif cmd == "worker":
        worker(Path(rest[0]))
    else:
        raise SystemExit(f"unknown command {cmd!r}: write or worker")
