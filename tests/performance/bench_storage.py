"""Benchmark: Kafka -> PostgreSQL through the StorageConsumer, beside a plain COPY of the same rows.

    .venv/bin/python tests/performance/bench_storage.py --repeat 3      # 1,000,000 FIRMS-shaped records
    .venv/bin/python tests/performance/bench_storage.py --records 200000

Both sides run in one process against the local Kafka and PostgreSQL, into a throwaway database
with the migrated schema. Baseline: ``COPY fire_detections_baseline FROM STDIN`` of the already
decoded rows, streamed from a file, into a table with the same columns and indexes. The consumer
side is end to end: consume, decode and validate, COPY (straight into the table, or to staging and
upsert when a key exists), DB commit, offset commit. The records are produced once; each repeat
re-creates the baseline table, empties ``fire_detections`` and consumes with a new consumer group,
so every repeat measures both sides on the same rows into the same empty, indexed table. The
medians of the repeats are the figures to report.
Goals (issue 6): >= 100,000 rows/s end to end and >= 50 % of the plain COPY's rate.
Writes ``docs/results/storage.json`` (``--out`` to change the directory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.conftest import (  # noqa: E402
    KAFKA_BOOTSTRAP,
    create_database,
    create_topic,
    delete_topic,
    drop_database,
)
from wildfire.config import build_config  # noqa: E402
from wildfire.priority import Priority  # noqa: E402
from wildfire.records import Record  # noqa: E402
from wildfire.storage.consumer import StorageConsumer  # noqa: E402
from wildfire.storage.migrate import upgrade  # noqa: E402
from wildfire.storage.rows import ROW_COLUMNS, decode_row  # noqa: E402
from wildfire.storage.schema import TYPED_COLUMNS  # noqa: E402

T0 = datetime(2025, 8, 1, tzinfo=UTC)
SATS = (("N21", "VIIRS_NOAA21_NRT", "VIIRS"), ("N", "VIIRS_SNPP_NRT", "VIIRS"), ("T", "MODIS_NRT", "MODIS"))


def firms_record(i: int) -> bytes:
    sat, src, inst = SATS[i % 3]
    t = T0 + timedelta(seconds=i * 7)
    lat, lon = 32.53 + (i % 9491) * 0.001, -124.48 + (i // 9491 % 10350) * 0.001
    return Record(
        source="nasa_firms", kind="fire_detection",
        key=f"{src}|{sat}|{inst}|{t:%Y-%m-%d}|{t:%H%M}|{lat:.4f}|{lon:.4f}|{i}",
        event_time=t, priority=Priority.HIGH, lat=round(lat, 4), lon=round(lon, 4), quality=0.85,
        payload={"satellite": sat, "instrument": inst, "confidence": "n" if inst == "VIIRS" else 80,
                 "frp": 1.0 + (i % 500) / 10, "brightness": 300.0 + (i % 900) / 10, "scan": 0.39, "track": 0.36,
                 "daynight": "N", "version": "2.0NRT", "acq_date": f"{t:%Y-%m-%d}", "acq_time": f"{t:%H%M}"},
        ingest_time=T0 + timedelta(days=1),
    ).to_json()


def produce(topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "linger.ms": 50, "batch.size": 1_000_000,
                  "compression.type": "zstd", "enable.idempotence": True,
                  "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576})
    for i, v in enumerate(values):
        while True:
            try:
                p.produce(topic, value=v, key=v[v.index(b'"key":"') + 7: v.index(b'","event_time"')])
                break
            except BufferError:
                p.poll(0.1)
        if i % 10000 == 0:
            p.poll(0)
    assert p.flush(120) == 0, "producer did not deliver everything"


def write_copy_file(values: list[bytes], path: Path) -> int:
    import psycopg  # noqa: F401 - the same text format the writer streams

    def field(v: object) -> str:
        if v is None:
            return "\\N"
        s = str(v)
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    with path.open("w", encoding="utf-8") as f:
        for v in values:
            _, row = decode_row(v)
            f.write("\t".join(field(x) for x in row))
            f.write("\n")
    return path.stat().st_size


def plain_copy(url: str, path: Path, n: int) -> float:
    """Seconds for ``COPY fire_detections_baseline FROM STDIN`` of the file, into a fresh copy of the table."""
    import psycopg

    cols = ", ".join(ROW_COLUMNS + tuple(c.name for c in TYPED_COLUMNS["fire_detection"]))
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS fire_detections_baseline")
        # Same columns, defaults (stored_at), indexes and unique constraint as the consumer's table.
        conn.execute("CREATE TABLE fire_detections_baseline (LIKE fire_detections INCLUDING ALL)")
        conn.commit()
        t = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY fire_detections_baseline ({cols}) FROM STDIN") as cp, \
                path.open("rb") as f:
            while chunk := f.read(1 << 20):
                cp.write(chunk)
        conn.commit()
        seconds = time.perf_counter() - t
        copied = conn.execute("SELECT count(*) FROM fire_detections_baseline").fetchone()[0]
        conn.execute("DROP TABLE fire_detections_baseline")
        conn.commit()
    assert copied == n, f"baseline copied {copied} rows, expected {n}"
    return seconds


def consume_all(url: str, topic: str, n: int, batch_size: int) -> float:
    """Seconds for a new consumer group to store all ``n`` records into the emptied ``fire_detections``."""
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE fire_detections, dead_letters")
        conn.commit()
    cfg = build_config({"kafka": {"bootstrap_servers": KAFKA_BOOTSTRAP, "enable_dlq": False,
                                  "consumer_group": f"bench-{uuid.uuid4().hex[:8]}"},
                        "storage": {"batch_size": batch_size, "poll_timeout_s": 1.0}})
    consumer = StorageConsumer(cfg, topics=[topic], url=url)
    try:
        t = time.perf_counter()
        while consumer.stats.messages < n:
            consumer.poll_once()
            if time.perf_counter() - t > 1800:
                raise SystemExit(f"gave up after 30 min at {consumer.stats.messages} messages")
        consume_s = time.perf_counter() - t
    finally:
        consumer.close()
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT count(*) FROM fire_detections").fetchone()[0]
    assert stored == n, f"stored {stored} rows, expected {n}"
    return consume_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of both sides; medians are reported")
    ap.add_argument("--out", default=None, help="results directory (default docs/results)")
    args = ap.parse_args()
    n = args.records
    from results import machine, write_result

    before = machine()

    dbname, url = create_database("wf_bench", migrate=False)
    topic = create_topic(KAFKA_BOOTSTRAP, partitions=4, prefix="bench-storage")
    try:
        upgrade(url)
        print(f"building {n:,} FIRMS-shaped records ...", flush=True)
        values = [firms_record(i) for i in range(n)]
        print(f"producing to {topic} (4 partitions) ...", flush=True)
        t = time.perf_counter()
        produce(topic, values)
        print(f"  produced in {time.perf_counter() - t:.1f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "firms.tsv"
            size = write_copy_file(values, path)
            del values
            print(f"\n{'run':<5} {'plain COPY s':>12} {'rows/s':>10} {'consumer s':>11} {'rows/s':>10} {'ratio':>6}")
            copy_rates, e2e_rates, ratios = [], [], []
            for r in range(args.repeat):
                copy_s = plain_copy(url, path, n)
                consume_s = consume_all(url, topic, n, args.batch_size)
                copy_rates.append(n / copy_s)
                e2e_rates.append(n / consume_s)
                ratios.append(e2e_rates[-1] / copy_rates[-1])
                print(f"{r + 1:<5} {copy_s:>12.2f} {copy_rates[-1]:>10,.0f} {consume_s:>11.2f} "
                      f"{e2e_rates[-1]:>10,.0f} {ratios[-1]:>6.2f}", flush=True)
        med = statistics.median
        print()
        print(f"median of {args.repeat}: plain COPY from file ({size / 1e6:.0f} MB) {med(copy_rates):,.0f} rows/s; "
              f"Kafka -> StorageConsumer -> PostgreSQL {med(e2e_rates):,.0f} rows/s")
        print(f"ratio end-to-end / plain COPY (median of per-run ratios): {med(ratios):.2f}  (goal >= 0.50)")
        print(f"end-to-end rows/s (median): {med(e2e_rates):,.0f}  (goal >= 100,000)")
        print(f"records {n:,}; batch size {args.batch_size:,}; every run stored exactly {n:,} rows")
        path_out = write_result(
            "storage", command=f"tests/performance/bench_storage.py --records {n} --batch-size {args.batch_size} "
                               f"--repeat {args.repeat}",
            inputs={"records": n, "batch_size": args.batch_size, "partitions": 4, "copy_file_bytes": size},
            rounds=[{"plain_copy_rows_per_s": round(c, 1), "consumer_rows_per_s": round(e, 1), "ratio": round(x, 4)}
                    for c, e, x in zip(copy_rates, e2e_rates, ratios, strict=True)],
            summary={"plain_copy_rows_per_s": med(copy_rates), "consumer_rows_per_s": med(e2e_rates),
                     "ratio": med(ratios)},
            goals=[{"name": "Kafka -> PostgreSQL >= 50 % of a plain COPY (median of per-run ratios)",
                    "figure": f"{med(ratios):.2f}", "met": med(ratios) >= 0.5},
                   {"name": "Kafka -> PostgreSQL >= 100,000 rows/s (median)", "figure": f"{med(e2e_rates):,.0f}/s",
                    "met": med(e2e_rates) >= 100_000}],
            machine_before=before, out=Path(args.out) if args.out else None)
        print(f"result: {path_out}")
    finally:
        delete_topic(KAFKA_BOOTSTRAP, topic)
        drop_database(dbname)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
