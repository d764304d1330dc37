"""Admission is decided per source: one source's full spool never sheds another source's records.

Real SQLite spool, real ``Ingestor`` and ``BackpressureManager`` at the shipped thresholds. The spool of
source ``full`` is filled to its capacity (LOAD_SHEDDING for it); source ``empty`` then offers records in
turn with ``full``, reading after reading, as the stream worker's poll loops do.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from wildfire.clock import ManualClock
from wildfire.config import DEFAULT_CONFIG_PATH, build_config, read_yaml
from wildfire.ingest import Ingestor
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager

JANUARY = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC).timestamp()  # outside the shipped fire season
NORMAL = 2


def batch(source: str, prefix: str, n: int) -> EncodedBatch:
    return EncodedBatch(source, [f"{prefix}-{i}" for i in range(n)], [NORMAL] * n, [b"{}"] * n)


def test_a_full_source_does_not_shed_a_source_whose_spool_is_empty(tmp_path: Path) -> None:
    raw = read_yaml(DEFAULT_CONFIG_PATH)
    cfg = build_config(raw, {
        "spool": {"path": str(tmp_path / "spool.db"), "archive_expired_path": str(tmp_path / "expired.jsonl"),
                  "capacity_per_source": 1000, "overflow_strategy": "drop_oldest"},
        "sources": {"full": {"source_type": "purpleair", "topic": "wildfire-air-quality"},
                    "empty": {"source_type": "purpleair", "topic": "wildfire-air-quality"}},
    })
    clock = ManualClock(wall_start=JANUARY)
    spool = BufferManager(cfg.spool, cfg.sources, clock=clock)
    ingestor = Ingestor(spool, cfg, clock=clock, rng=random.Random(3))
    spool.put_batch(batch("full", "filler", 1000))
    offered_empty = accepted_empty = shed_full = 0
    for round_ in range(40):
        full = ingestor.accept("full", batch("full", f"f{round_}", 10))
        empty = ingestor.accept("empty", batch("empty", f"e{round_}", 10))
        assert full.backpressure_state == "LOAD_SHEDDING" and empty.backpressure_state == "NORMAL"
        shed_full += full.shed_total
        offered_empty += 10
        accepted_empty += empty.accepted_total
        assert not empty.not_accepted, f"round {round_}: the empty source was shed: {empty.not_accepted}"
    assert shed_full == 400 and accepted_empty == offered_empty == 400
    # status follows the fullest source; each source keeps its own state
    assert ingestor.backpressure.state.name == "LOAD_SHEDDING"
    assert ingestor.states() == {"empty": "NORMAL", "full": "LOAD_SHEDDING"}
    # decisions of both sources land in the one count the metrics export
    assert ingestor.backpressure.decisions[("empty", NORMAL, "admitted")] == 400
    assert ingestor.backpressure.decisions[("full", NORMAL, "rejected")] == 400
