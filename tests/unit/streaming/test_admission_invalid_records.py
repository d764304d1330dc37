"""One record that cannot be stored never costs the others in its batch: it becomes a dead letter.

Real SQLite spool and ``Ingestor``. A key with a lone surrogate (text decoded with ``surrogateescape``, or built
by code) cannot be written to SQLite or Kafka, and a ``Record`` whose payload does not serialize cannot be
encoded; before, either one made ``accept`` raise and the whole batch was lost.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import orjson

from wildfire.config import DEFAULT_CONFIG_PATH, build_config, read_yaml
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.records import EncodedBatch, Record
from wildfire.spool import BufferManager

T0 = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)


def setup(tmp_path: Path) -> tuple[BufferManager, Ingestor, str]:
    cfg = build_config(read_yaml(DEFAULT_CONFIG_PATH), {
        "spool": {"path": str(tmp_path / "spool.db"), "archive_expired_path": str(tmp_path / "expired.jsonl")}})
    spool = BufferManager(cfg.spool, cfg.sources)
    return spool, Ingestor(spool, cfg, rng=random.Random(1)), cfg.kafka.dlq_topic


def rows(spool: BufferManager) -> dict[str, tuple[str, bytes]]:
    return {r.key: (r.topic, r.value) for r in spool.peek_batch(100)}


def test_a_key_that_is_not_utf8_is_a_dead_letter_and_the_rest_are_stored(tmp_path: Path) -> None:
    spool, ingestor, dlq = setup(tmp_path)
    bad = "sensor-\ud800"
    batch = EncodedBatch("iot_mqtt", ["s-1", bad, "s-2", "capteur-é"], [Priority.NORMAL] * 4,
                         [b'{"n":1}', b'{"n":2}', b'{"n":3}', b'{"n":4}'])
    report = ingestor.accept("iot_mqtt", batch)
    stored = rows(spool)
    assert {"s-1", "s-2", "capteur-é"} <= set(stored)  # non-ASCII but valid keys are kept
    assert report.accepted_total == 3 and report.dropped == {"invalid": 1} and report.dead_letters == 1
    (dl_key,) = [k for k, (topic, _v) in stored.items() if topic == dlq]
    assert dl_key.startswith("iot_mqtt|invalid_key|")
    letter = orjson.loads(stored[dl_key][1])
    assert letter["reason"] == "invalid_key" and "not valid UTF-8" in letter["error"] and "\\ud800" in letter["error"]
    assert letter["raw"] == '{"n":2}'  # the record's value is kept in the dead letter


def test_a_record_that_does_not_serialize_is_a_dead_letter_and_the_rest_are_stored(tmp_path: Path) -> None:
    spool, ingestor, dlq = setup(tmp_path)

    def rec(key: str, payload: dict) -> Record:
        return Record(source="iot_mqtt", kind="iot_reading", key=key, event_time=T0, payload=payload,
                      priority=Priority.NORMAL)

    report = ingestor.accept("iot_mqtt", [rec("a", {"t": 1}), rec("b", {"t": {1, 2}}), rec("c", {"t": 3})])
    stored = rows(spool)
    assert {"a", "c"} <= set(stored) and "b" not in stored
    assert report.accepted_total == 2 and report.dropped == {"invalid": 1}
    (letter,) = [orjson.loads(v) for _k, (topic, v) in stored.items() if topic == dlq]
    assert letter["reason"] == "unencodable_record" and "does not serialize" in letter["error"]
