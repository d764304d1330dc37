"""A PRIVATE Apache Kafka broker for fault tests: started, stopped and killed without touching the shared 9092.

    broker = PrivateKafka(tmp_path / "kafka")     # free ports picked at random
    broker.start()                                  # ~10 s; data kept under the directory
    broker.stop()                                   # graceful; broker.start() again resumes the same log
    broker.kill()                                   # SIGKILL of the broker's process group

It drives ``scripts/services.sh kafka-start|kafka-stop`` with KAFKA_DIR / KAFKA_PORT / KAFKA_CONTROLLER_PORT
overrides, so it is the same broker build and configuration as the shared one.

    PrivateKafka(d, sasl_ssl=True, authorizer=True, super_users="User:ANONYMOUS;User:admin")

adds a SASL_SSL listener (SCRAM-SHA-512 over TLS) on ``broker.sasl_ssl_port``, with a CA and broker keystore that
services.sh generates under ``d/tls`` (``broker.ca_file``), and ACLs enforced by KRaft's StandardAuthorizer. The
plaintext listener stays; its principal is ``User:ANONYMOUS`` (a super user by default: the test's admin path for
creating SCRAM users and ACLs).

A broker's refusals that no local broker gives on demand (a short ISR, an ACL a test cannot configure) come from
:class:`RefusingProducer`: the real producer on the shared broker, answering the refused records with the real
``KafkaError`` delivery report such a broker sends.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "scripts" / "services.sh"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    for _ in range(200):
        port = random.randrange(20_000, 40_000, 2)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise RuntimeError("no free pair of TCP ports found for a private Kafka broker")


def free_port(exclude: tuple[int, ...] = ()) -> int:
    for _ in range(200):
        port = random.randrange(20_000, 40_000)
        if port not in exclude and _port_free(port):
            return port
    raise RuntimeError("no free TCP port found for a private Kafka listener")


class PrivateKafka:
    def __init__(self, directory: Path, port: int | None = None, *, sasl_ssl: bool = False, authorizer: bool = False,
                 super_users: str | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port_pair()
        if self.port == 9092:
            raise ValueError("port 9092 is the shared broker: fault tests must never stop it")
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.sasl_ssl_port = free_port((self.port, self.port + 1)) if sasl_ssl else None
        self.sasl_ssl_bootstrap = f"127.0.0.1:{self.sasl_ssl_port}" if sasl_ssl else None
        self.ca_file = self.directory / "tls" / "ca.crt"  # written by services.sh when sasl_ssl
        self.authorizer = authorizer
        self.super_users = super_users

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "KAFKA_DIR": str(self.directory), "KAFKA_PORT": str(self.port),
               "KAFKA_CONTROLLER_PORT": str(self.port + 1)}
        for name in ("KAFKA_SASL_SSL_PORT", "KAFKA_SSL_KEYSTORE", "KAFKA_SSL_KEYSTORE_PASSWORD", "KAFKA_AUTHORIZER",
                     "KAFKA_SUPER_USERS", "KAFKA_ADVERTISED_PORT"):
            env.pop(name, None)  # only what this instance asks for
        if self.sasl_ssl_port:
            env["KAFKA_SASL_SSL_PORT"] = str(self.sasl_ssl_port)
        if self.authorizer:
            env["KAFKA_AUTHORIZER"] = "1"
        if self.super_users:
            env["KAFKA_SUPER_USERS"] = self.super_users
        return env

    def _run(self, action: str, timeout: float) -> None:
        proc = subprocess.run(["bash", str(SERVICES), action], env=self._env(), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"services.sh {action} on port {self.port} failed:\n{proc.stderr[-3000:]}")

    def start(self) -> None:
        self._run("kafka-start", timeout=180)

    def stop(self) -> None:
        self._run("kafka-stop", timeout=120)

    def kill(self) -> None:
        pid_file = self.directory / "kafka.pid"
        pid = int(pid_file.read_text().strip())
        os.killpg(pid, signal.SIGKILL)  # its own process group (setsid in services.sh)
        pid_file.unlink()

    def is_up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False


class RefusingProducer:
    """The real ``confluent_kafka.Producer`` behind a broker that refuses some records: a record ``refuses(topic)``
    holds for is not sent; at the next ``poll``/``flush`` its delivery callback gets ``error(n)`` (n: the running
    count of refusals, from 1), a real ``KafkaError``, as the broker's delivery report. Everything else is sent."""

    def __init__(self, conf: dict[str, Any], *, refuses: Callable[[str], bool], error: Callable[[int], Any]) -> None:
        from confluent_kafka import Producer

        self._p = Producer(conf)
        self._refuses, self._error = refuses, error
        self._pending: list[Callable[[Any, Any], None]] = []
        self.refusals = 0

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        if self._refuses(topic):
            self._pending.append(on_delivery)
            return
        self._p.produce(topic, value, key, headers=headers, on_delivery=on_delivery)

    def _answer(self) -> int:
        pending, self._pending = self._pending, []
        for cb in pending:
            self.refusals += 1
            cb(self._error(self.refusals), None)
        return len(pending)

    def poll(self, timeout=0.0):
        return self._answer() + self._p.poll(timeout)

    def flush(self, timeout=0.0):
        self._answer()
        return self._p.flush(timeout)

    def __len__(self):
        return len(self._p) + len(self._pending)
