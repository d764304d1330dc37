"""``python -m wildfire.spool salvage FILE`` against the real local Kafka.

A spool is written, damaged (or left whole), moved aside by a normal open as a worker would, then salvaged
by the command line in its own process; the topic is read back and checked by key and value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import yaml

from wildfire.config import load_config
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager

ROOT = Path(__file__).resolve().parents[2]
N_NORMAL, N_CRITICAL = 3000, 5


def write_config(tmp_path: Path, bootstrap: str, topic: str) -> Path:
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "enable_dlq": False},
        "spool": {"capacity_per_source": 1_000_000, "archive_expired_path": None},
        "sources": {"salv": {"source_type": "iot_mqtt", "topic": topic, "priority": 6}},
        "topics": {topic: {"partitions": 2}},
    }
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def value(key: str) -> bytes:
    return orjson.dumps({"source": "salv", "kind": "iot_reading", "key": key, "payload": {"pad": "v" * 200}})


def read_topic(bootstrap: str, topic: str, timeout: float = 60) -> dict[str, list[tuple[bytes, dict]]]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"salvage-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        high = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in high])
        got: dict[str, list[tuple[bytes, dict]]] = {}
        position = dict.fromkeys(high, 0)
        deadline = time.monotonic() + timeout
        while any(position[p] < high[p] for p in high) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error():
                    continue
                got.setdefault(msg.key().decode(), []).append((msg.value(), dict(msg.headers() or [])))
                position[msg.partition()] = msg.offset() + 1
        return got
    finally:
        consumer.close()


def run_salvage(config: Path, file: Path) -> tuple[int, dict, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "wildfire.spool", "salvage", str(file), "--config", str(config),
                           "--timeout-s", "60", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, report, proc.stdout


@pytest.mark.kafka
@pytest.mark.parametrize("damage", ["none", "last_page"])
def test_salvage_publishes_every_readable_row_and_counts_the_rest(tmp_path, kafka_bootstrap, kafka_topic, damage):
    config = write_config(tmp_path, kafka_bootstrap, kafka_topic)
    cfg = load_config(config, environ={})
    path = tmp_path / "spool.db"
    spool = BufferManager(cfg.spool, cfg.sources, path=path)
    keys = [f"k{i}" for i in range(N_NORMAL)]
    for start in range(0, N_NORMAL, 500):
        chunk = keys[start:start + 500]
        spool.put_batch(EncodedBatch("salv", chunk, [Priority.NORMAL] * len(chunk), [value(k) for k in chunk]))
    crit = [f"evac{i}" for i in range(N_CRITICAL)]
    spool.put_batch(EncodedBatch("salv", crit, [Priority.CRITICAL] * N_CRITICAL, [value(k) for k in crit]))
    spool._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    spool.close()
    del spool
    if damage == "last_page":
        data = bytearray(path.read_bytes())
        page = 16_384
        last = len(data) - page
        # Garbage over the second half of the last page, where a b-tree leaf keeps its cells (rows).
        data[last + page // 2: last + page] = b"\xde\xad\xbe\xef" * (page // 8)
        path.write_bytes(bytes(data))
        # A worker opening the spool finds the damage and moves the file aside.
        fresh = BufferManager(cfg.spool, cfg.sources, path=path)
        assert fresh.depth() == 0
        (moved,) = tmp_path.glob("spool.db.corrupt-*")
    else:
        moved = tmp_path / "spool.db.corrupt-20260101T000000"  # a good file quarantined: everything comes back
        os.replace(path, moved)
    evidence = moved.read_bytes()

    code, report, out = run_salvage(config, moved)

    got = read_topic(kafka_bootstrap, kafka_topic)
    everything = set(keys) | set(crit)
    assert set(got) <= everything
    for key, messages in got.items():
        assert all(v == value(key) for v, _h in messages), key  # same value as a normal drain
        assert all(h.get("source") == b"salv" for _v, h in messages)
    assert set(crit) <= set(got)  # CRITICAL rows live in the first pages: always salvageable here
    assert report["recorded"] == N_NORMAL + N_CRITICAL
    assert report["published"] == report["read"] == len(got)
    # Every recorded row is read or counted (a garbage cell may count as one more unreadable row).
    assert report["read"] + report["unreadable_rows"] + report["missing"] >= N_NORMAL + N_CRITICAL
    assert moved.read_bytes() == evidence  # salvage only reads (a copy of) the file
    if damage == "none":
        assert code == 0 and set(got) == everything, out
        assert "everything recorded was read and published" in out
        assert not Path(str(moved) + ".salvage").exists()
    else:
        lost = everything - set(got)
        assert code == 1 and lost, out  # something was unreadable: a non-zero exit, and it says so
        assert report["missing"] > 0 or report["unreadable_rows"] > 0
        assert report["damaged_regions"] + report["unreadable_rows"] >= 1
        assert "INCOMPLETE" in out and f"read intact      {len(got)}" in out
        assert len(got) > N_NORMAL // 2  # one damaged page costs its rows, not the file


@pytest.mark.kafka
def test_salvage_of_a_file_that_is_no_database_says_so(tmp_path, kafka_bootstrap, kafka_topic):
    config = write_config(tmp_path, kafka_bootstrap, kafka_topic)
    junk = tmp_path / "spool.db.corrupt-x"
    junk.write_bytes(b"\x00not a database\xff" * 1000)
    code, report, out = run_salvage(config, junk)
    assert code == 1 and report["read"] == 0 and report["recorded"] is None
    assert "SQLITE_NOTADB" in out or "not a database" in out
