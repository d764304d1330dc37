"""Is the write-path pause at leader failover Kafka's or the project's? A plain confluent-kafka producer (no spool,
no publisher) writes ~5,000 records/s with acks=all to a 12-partition topic (RF 3, min ISR 2) on a private 3-node
cluster, once with and once without idempotence; the node leading the most partitions is SIGKILLed and the
longest stretch without an acknowledgement is printed per partition: the dead leader's and the others.

    .venv/bin/python tests/performance/failover_plain_producer.py      # ~2 min; never touches the shared 9092
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins"))

from tests.kafka_cluster import PrivateKafkaCluster  # noqa: E402


def main() -> int:
    from confluent_kafka import Producer

    cluster = PrivateKafkaCluster(Path(tempfile.mkdtemp(prefix="wf-failover-plain-")) / "cluster")
    try:
        cluster.start()
        for idempotence in (True, False):
            topic = cluster.create_topic(f"plain-{int(idempotence)}-{int(time.time())}", 12)
            producer = Producer({"bootstrap.servers": cluster.bootstrap, "acks": "all", "linger.ms": 100,
                                 "enable.idempotence": idempotence, "delivery.timeout.ms": 30_000})
            acks: dict[int, list[float]] = defaultdict(list)

            def report(err, msg, acks=acks) -> None:
                if err is None:
                    acks[msg.partition()].append(time.monotonic())

            def write(seconds: float, producer=producer, topic=topic, report=report) -> None:
                end, i = time.monotonic() + seconds, 0
                while time.monotonic() < end:
                    for _ in range(50):
                        producer.produce(topic, b"x", b"k%d" % i, on_delivery=report)
                        i += 1
                    producer.poll(0.01)

            write(3)
            leaders = cluster.leaders(topic)
            node = Counter(leaders.values()).most_common(1)[0][0]
            led = {p for p, n in leaders.items() if n == node}
            killed_at = time.monotonic()
            cluster.kill(node)
            write(18)
            producer.flush(30)

            def longest_gap(p: int, acks=acks, killed_at=killed_at) -> float:
                ts = sorted(acks[p])
                window = [t for t in ts if t <= killed_at][-1:] + [t for t in ts if t > killed_at]
                return round(max((b - a for a, b in zip(window, window[1:], strict=False)), default=-1.0), 2)

            print(f"idempotence {idempotence}: dead leader's partitions "
                  f"{ {p: longest_gap(p) for p in sorted(led)} }, others "
                  f"{ {p: longest_gap(p) for p in sorted(set(leaders) - led)} }", flush=True)
            cluster.start_node(node)
            cluster.wait_full_isr(topic)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
