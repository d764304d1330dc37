"""kill -9 of the draining worker at a random moment loses no accepted record (real Kafka, real processes).

A writer process puts N >= 100,000 records while ``python -m wildfire.publish`` drains the same spool
into a fresh topic; the test SIGKILLs the worker, restarts it until the spool is empty, then reads the
topic back: every accepted key must be there (duplicates allowed and counted).

Also runnable as the writer: ``python tests/integration/test_spool_crash.py CONFIG SPOOL N``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
N_RECORDS = 120_000
BATCH = 1_000


def write_config(tmp_path: Path, bootstrap: str, topic: str) -> Path:
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "enable_dlq": False},
        "spool": {"capacity_per_source": 1_000_000, "archive_expired_path": None},
        "sources": {"crash_test": {"source_type": "iot_mqtt", "topic": topic, "priority": 6}},
        "topics": {topic: {"partitions": 3}},
    }
    path = tmp_path / "stream_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def consume_keys(bootstrap: str, topic: str, expect_at_least: int, timeout: float = 60) -> Counter[str]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"verify-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p) for p in md.partitions]
        high = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in high])
        keys: Counter[str] = Counter()
        position = dict.fromkeys(high, 0)
        deadline = time.monotonic() + timeout
        while any(position[p] < high[p] for p in high) and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    continue
                keys[msg.key().decode()] += 1
                position[msg.partition()] = msg.offset() + 1
        assert sum(keys.values()) >= expect_at_least, f"read {sum(keys.values())} messages, high watermarks {high}"
        return keys
    finally:
        consumer.close()


def start_worker(config: Path, spool: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"}
    return subprocess.Popen([sys.executable, "-m", "wildfire.publish", "--config", str(config), "--spool", str(spool),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.kafka
@pytest.mark.slow
def test_sigkill_of_worker_loses_no_accepted_record(kafka_bootstrap, kafka_topic, tmp_path):
    config = write_config(tmp_path, kafka_bootstrap, kafka_topic)
    spool = tmp_path / "spool.db"
    # Create the store first so writer and worker never race on the schema.
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"}
    writer = subprocess.Popen([sys.executable, __file__, str(config), str(spool), str(N_RECORDS)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = start_worker(config, spool, "--run-seconds", "120")
    try:
        time.sleep(random.uniform(1.5, 4.0))  # a random point while both are busy
        assert worker.poll() is None, f"worker exited early: {worker.communicate()}"
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert worker.returncode == -signal.SIGKILL
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
        accepted = int(out.strip().splitlines()[-1])
        assert accepted == N_RECORDS  # capacity is large: every record offered was accepted
        restarted = start_worker(config, spool, "--until-empty", "--run-seconds", "120")
        r_out, r_err = restarted.communicate(timeout=150)
        assert restarted.returncode == 0, r_err[-2000:]
    finally:
        for p in (writer, worker):
            if p.poll() is None:
                p.kill()
                p.wait()

    keys = consume_keys(kafka_bootstrap, kafka_topic, expect_at_least=N_RECORDS)
    missing = [f"k{i}" for i in range(N_RECORDS) if f"k{i}" not in keys]
    duplicates = sum(n - 1 for n in keys.values())
    print(f"\ncrash test: {N_RECORDS} accepted, {len(keys)} distinct keys in Kafka, {duplicates} duplicates, "
          f"restart: {r_out.strip()}")
    assert not missing, f"{len(missing)} accepted records missing from Kafka, e.g. {missing[:5]}"
    assert set(keys) == {f"k{i}" for i in range(N_RECORDS)}


def _writer(config: str, spool_path: str, n: int) -> None:
    sys.path[:0] = [str(ROOT / "plugins")]
    import orjson

    from wildfire.config import load_config
    from wildfire.priority import Priority
    from wildfire.records import EncodedBatch
    from wildfire.spool import BufferManager

    cfg = load_config(config)
    spool = BufferManager(cfg.spool, cfg.sources, path=spool_path)
    accepted = 0
    for start in range(0, n, BATCH):
        keys = [f"k{i}" for i in range(start, min(n, start + BATCH))]
        # Every tenth batch is HIGH: those writes are fsynced (synchronous=FULL) before put returns.
        prio = Priority.HIGH if (start // BATCH) % 10 == 0 else Priority.NORMAL
        values = [orjson.dumps({"source": "crash_test", "kind": "iot_reading", "key": k, "payload": {"i": k}})
                  for k in keys]
        out = spool.put_batch(EncodedBatch("crash_test", keys, [prio] * len(keys), values))
        accepted += out.accepted
    print(accepted, flush=True)


if __name__ == "__main__":
    _writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))
