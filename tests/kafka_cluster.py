"""A PRIVATE 3-node Apache Kafka cluster for failover tests: nodes killed and restarted without touching 9092.

    cluster = PrivateKafkaCluster(tmp_path / "cluster")   # free loopback ports picked at random
    cluster.start()                   # ~15 s: three KRaft processes, each broker + controller (static quorum)
    cluster.leader_of(topic)          # {partition: node id} from the cluster's metadata
    cluster.kill(2)                   # SIGKILL of node 2's process group (only processes this object started)
    cluster.start_node(2)             # the same node again, on its own data directory
    cluster.close()                   # SIGKILL of every node still running (tests: also on failure)

It drives ``scripts/services.sh cluster-up|cluster-node-start`` with CLUSTER_DIR / CLUSTER_PORTS /
CLUSTER_CONTROLLER_PORTS overrides, so it is the same build and configuration as ``make cluster``: RF 3 for
the internal topics, ``min.insync.replicas=2``, unclean leader election off, a 512 MiB heap per node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.kafka_broker import SERVICES, free_port


class PrivateKafkaCluster:
    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.directory = Path(directory)
        used: list[int] = []
        for _ in range(2 * nodes):
            used.append(free_port(tuple(used)))
        self.ports, self.controller_ports = used[:nodes], used[nodes:]
        if 9092 in self.ports:
            raise ValueError("port 9092 is the shared broker: failover tests must never touch it")
        self.nodes = nodes
        self.bootstrap = ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLUSTER_"))}
        env.update(CLUSTER_DIR=str(self.directory), CLUSTER_PORTS=",".join(map(str, self.ports)),
                   CLUSTER_CONTROLLER_PORTS=",".join(map(str, self.controller_ports)))
        return env

    def _run(self, *action: str, timeout: float = 240) -> None:
        proc = subprocess.run(["bash", str(SERVICES), *action], env=self._env(), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"services.sh {' '.join(action)} failed:\n{proc.stderr[-3000:]}")

    def start(self) -> None:
        self._run("cluster-up")

    def start_node(self, node: int) -> None:
        self._run("cluster-node-start", str(node))

    def pid(self, node: int) -> int | None:
        path = self.directory / f"node{node}" / "kafka.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self, node: int) -> None:
        """SIGKILL node ``node`` (its own process group, started by services.sh under setsid)."""
        pid = self.pid(node)
        if pid is None:
            raise RuntimeError(f"node {node} has no pid file: it was not started by this cluster")
        os.killpg(pid, signal.SIGKILL)
        (self.directory / f"node{node}" / "kafka.pid").unlink()
        for _ in range(100):  # the port closes when the process is gone
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, 0)
                time.sleep(0.05)
                continue
            break

    def close(self) -> None:
        for node in range(1, self.nodes + 1):
            if self.pid(node) is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError, RuntimeError):
                    self.kill(node)

    def admin(self):
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap})

    def leaders(self, topic: str, timeout: float = 10.0) -> dict[int, int]:
        """{partition: leader node id} (-1: no leader) from the cluster's metadata."""
        md = self.admin().list_topics(topic, timeout=timeout).topics[topic]
        return {p.id: p.leader for p in md.partitions.values()}

    def isr(self, topic: str, timeout: float = 10.0) -> dict[int, list[int]]:
        md = self.admin().list_topics(topic, timeout=timeout).topics[topic]
        return {p.id: list(p.isrs) for p in md.partitions.values()}

    def create_topic(self, name: str, partitions: int, replication_factor: int = 3, min_isr: int = 2) -> str:
        from confluent_kafka.admin import NewTopic

        new = NewTopic(name, num_partitions=partitions, replication_factor=replication_factor,
                       config={"min.insync.replicas": str(min_isr), "message.timestamp.type": "LogAppendTime"})
        admin = self.admin()  # kept alive until the futures resolve
        for fut in admin.create_topics([new], request_timeout=30).values():
            fut.result()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every partition has a leader and a full ISR
            with contextlib.suppress(Exception):
                isr = self.isr(name)
                if len(isr) == partitions and all(len(v) == replication_factor for v in isr.values()):
                    return name
            time.sleep(0.2)
        raise RuntimeError(f"topic {name} did not get {replication_factor} in-sync replicas within 30 s")

    def wait_full_isr(self, topic: str, timeout: float = 90.0) -> float:
        """Seconds until every partition of ``topic`` has all ``nodes`` replicas in sync again."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(Exception):
                if all(len(v) == self.nodes for v in self.isr(topic, timeout=5).values()):
                    return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{topic}: the ISR was not full again within {timeout:.0f} s")
