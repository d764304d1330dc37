"""Benchmark: bare confluent-kafka vs spool -> SpoolPublisher -> Kafka acknowledged, plus spool write rate.

    .venv/bin/python tests/performance/bench_publish.py [--records 100000]

All three figures come from the same run on the same machine; the goals (issue 4) are printed as ratios:
(b) >= 50 % of (a) records/s, and put_batch >= 200,000 records/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

from wildfire.config import CircuitBreakerConfig, KafkaConfig, SourceConfig, SpoolConfig  # noqa: E402
from wildfire.priority import Priority  # noqa: E402
from wildfire.publish import ProducerWrapper, SpoolPublisher  # noqa: E402
from wildfire.records import EncodedBatch  # noqa: E402
from wildfire.spool import BufferManager  # noqa: E402
from wildfire.streaming.breaker import CircuitBreaker  # noqa: E402

BATCH = 10_000


def make_values(n: int) -> tuple[list[str], list[bytes]]:
    keys = [f"VIIRS_NOAA21|N21|2025-04-07|{i:06d}|34.{i % 10000:04d}|-118.5678" for i in range(n)]
    values = [
        (b'{"source":"bench","kind":"fire_detection","key":"%s","event_time":"2025-04-07T06:59:00Z",'
         b'"ingest_time":"2025-04-07T07:02:11Z","priority":"NORMAL","lat":34.1234,"lon":-118.5678,"quality":0.85,'
         b'"payload":{"frp_mw":12.5,"brightness_k":331.2,"confidence":"n","scan_km":0.39,"track_km":0.36},'
         b'"schema_version":1}') % k.encode()
        for k in keys
    ]
    return keys, values


def create_topic(bootstrap: str, partitions: int = 3) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"bench-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        fut.result(30)
    return name


def delete_topic(bootstrap: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.delete_topics([name], operation_timeout=30).values():
        fut.result(30)


def bare(kafka: KafkaConfig, topic: str, keys: list[str], values: list[bytes]) -> float:
    """(a) confluent-kafka alone, same settings, same pre-serialized messages, waits for every ack."""
    from confluent_kafka import Producer

    conf = ProducerWrapper(kafka, breaker=CircuitBreaker(), producer_factory=lambda c: None).settings()
    conf.pop("error_cb")
    producer = Producer(conf)
    done = [0]

    def cb(err, _msg):
        if err is None:
            done[0] += 1

    headers = [("source", b"bench"), ("priority", b"NORMAL"), ("schema_version", b"1"),
               ("ingest_time", b"2025-04-07T07:02:11.000000Z")]
    start = time.perf_counter()
    for k, v in zip(keys, values, strict=True):
        while True:
            try:
                producer.produce(topic, value=v, key=k, headers=headers, on_delivery=cb)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    elapsed = time.perf_counter() - start
    assert done[0] == len(keys), f"bare producer delivered {done[0]} of {len(keys)}"
    return len(keys) / elapsed


def spool_writes(path: Path, sources: dict, keys: list[str], values: list[bytes]) -> float:
    spool = BufferManager(SpoolConfig(capacity_per_source=10_000_000, archive_expired_path=None), sources, path=path)
    prios = [Priority.NORMAL] * BATCH
    batches = [EncodedBatch("bench", keys[i:i + BATCH], prios[: len(keys[i:i + BATCH])], values[i:i + BATCH])
               for i in range(0, len(keys), BATCH)]
    start = time.perf_counter()
    for b in batches:
        spool.put_batch(b)
    rate = len(keys) / (time.perf_counter() - start)
    spool.close()
    return rate


def spool_to_kafka(path: Path, sources: dict, kafka: KafkaConfig, n: int) -> float:
    """(b) rows already in the spool -> SpoolPublisher -> every row acknowledged and deleted."""
    spool = BufferManager(SpoolConfig(capacity_per_source=10_000_000, archive_expired_path=None), sources, path=path)
    assert spool.depth() == n
    publisher = SpoolPublisher(spool, ProducerWrapper(kafka, breaker=CircuitBreaker(CircuitBreakerConfig())))
    start = time.perf_counter()
    totals = publisher.run(threading.Event(), until_empty=True, idle_wait_s=0.005)
    elapsed = time.perf_counter() - start
    assert totals.delivered >= n and spool.depth() == 0, (totals, spool.depth())
    return n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = parser.parse_args()
    kafka = KafkaConfig(bootstrap_servers=args.bootstrap)
    keys, values = make_values(args.records)
    topic_a, topic_b = create_topic(args.bootstrap), create_topic(args.bootstrap)
    sources = {"bench": SourceConfig(source_type="nasa_firms", topic=topic_b, priority=5)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spool.db"
            a = bare(kafka, topic_a, keys, values)
            w = spool_writes(path, sources, keys, values)
            b = spool_to_kafka(path, sources, kafka, args.records)
    finally:
        delete_topic(args.bootstrap, topic_a)
        delete_topic(args.bootstrap, topic_b)
    print(f"records: {args.records}, value size: {len(values[0])} B, settings: acks=all idempotent zstd "
          f"linger.ms={kafka.linger_ms} batch.num.messages={kafka.batch_size}")
    print(f"{'measurement':<48}{'records/s':>12}{'ratio':>9}{'goal':>8}")
    print(f"{'(a) bare confluent-kafka (baseline)':<48}{a:>12,.0f}{1.0:>9.2f}{'':>8}")
    print(f"{'(b) spool -> SpoolPublisher -> Kafka acked':<48}{b:>12,.0f}{b / a:>9.2f}{'>=0.50':>8}")
    print(f"{'spool put_batch (10,000/batch) vs 200,000/s goal':<48}{w:>12,.0f}{w / 200_000:>9.2f}{'>=1.00':>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
