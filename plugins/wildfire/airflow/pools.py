"""Pools and priority weights of the wildfire DAGs (resource isolation).

- ``wildfire_streaming``: the two continuous tasks (``wildfire_stream.stream_worker``,
  ``storage_consumer.consume``). Two slots: each holds one for its whole window, and none of the default
  pool's slots, so batch and alert tasks never wait behind them.
- ``wildfire_backfill``: the mapped ERA5 and FIRMS-archive backfill tasks. Few slots, so a 366-day backfill
  never takes every executor slot from the alert and batch DAGs.

Priority weights (``weight_rule="absolute"``: the number given is the task's, not summed downstream) order
what the executor runs first when slots are short: alert paths (``nws_alerts_batch`` and anything evacuation
related) :data:`PRIORITY_ALERT`, the continuous tasks :data:`PRIORITY_STREAM`, other batch and reporting
tasks :data:`PRIORITY_BATCH`, backfills :data:`PRIORITY_BACKFILL` (lowest).

The pools are created when local Airflow starts (``scripts/airflow.sh`` runs ``python -m
wildfire.airflow.pools write FILE`` and ``airflow pools import FILE``; importing an existing pool sets its
slots again, so it is idempotent). Elsewhere, create them from this module's :data:`POOLS`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STREAMING_POOL = "wildfire_streaming"
BACKFILL_POOL = "wildfire_backfill"

POOLS: dict[str, dict[str, object]] = {
    STREAMING_POOL: {"slots": 2, "description": "the continuous stream worker and storage consumer (one each)",
                     "include_deferred": False},
    BACKFILL_POOL: {"slots": 2, "description": "ERA5 and FIRMS-archive backfill days (mapped tasks)",
                    "include_deferred": False},
}

PRIORITY_ALERT = 100
PRIORITY_STREAM = 50
PRIORITY_BATCH = 10
PRIORITY_BACKFILL = 1


def pools_json() -> str:
    """The ``airflow pools import`` file."""
    return json.dumps(POOLS, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.airflow.pools", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    write = sub.add_parser("write", help="write the airflow pools import file")
    write.add_argument("path")
    args = parser.parse_args(argv)
    Path(args.path).write_text(pools_json() + "\n", encoding="utf-8")
    print(f"wrote {len(POOLS)} pools to {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
