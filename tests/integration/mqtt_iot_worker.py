"""One IoT worker process for the scale-out tests: MQTT -> the project's Ingestor -> its own spool.

``python tests/integration/mqtt_iot_worker.py CONFIG CLIENT_ID SPOOL [SINK_DELAY_S [MODE]]``

MODE ``accept`` (default): ``MqttConnector`` with ``Ingestor.accept`` as the sink. MODE ``group_commit``: the
path of ``StreamWorker._start_mqtt`` (``Ingestor.submit`` through a ``GroupCommitter`` as the connector's
``async_sink``, acks once durable; SINK_DELAY_S is ignored). Either way without
the Kafka drain, so every stored record stays in the spool where the test can count it. ``SINK_DELAY_S`` slows
each store down so that QoS 1 messages are in flight (delivered, not yet acknowledged) when the test kills the
process. Prints ``READY`` once subscribed, ``ADOPTED n`` after each session adoption; on SIGTERM it stops and prints one JSON line of counts.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from wildfire.config import load_config  # noqa: E402
from wildfire.connectors.mqtt import MqttConnector  # noqa: E402
from wildfire.group_commit import GroupCommitter  # noqa: E402
from wildfire.ingest import Ingestor  # noqa: E402
from wildfire.spool import BufferManager  # noqa: E402

HOST, PORT = "127.0.0.1", 1883


def main(argv: list[str]) -> int:
    config_path, client_id, spool_path = argv[:3]
    delay = float(argv[3]) if len(argv) > 3 else 0.0
    mode = argv[4] if len(argv) > 4 else "accept"
    cfg = load_config(config_path, environ={})
    spool = BufferManager(cfg.spool, cfg.sources, path=spool_path)
    ingestor = Ingestor(spool, cfg)

    def sink(records: list) -> None:
        if delay:
            time.sleep(delay)
        ingestor.accept("iot_mqtt", records)

    def dead(dl: object) -> None:
        ingestor.accept("iot_mqtt", [], dead_letters=[dl])

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    committer = GroupCommitter(spool) if mode == "group_commit" else None
    async_sink = None
    if committer is not None:
        def async_sink(record: object) -> object:
            return ingestor.submit("iot_mqtt", record, committer)

    conn = MqttConnector(HOST, PORT, cfg.sources["iot_mqtt"], sink=sink, dead_letter_sink=dead,
                         client_id=client_id, async_sink=async_sink).start()
    if not conn.wait_connected(20):
        print(f"not connected: {conn.last_error}", flush=True)
        return 1
    print("READY", flush=True)
    adopted = 0
    while not stop.wait(0.1):
        members = getattr(conn, "members", None)  # None: not in a group
        if members is not None and members.adopted_sessions > adopted:
            adopted = members.adopted_sessions
            print(f"ADOPTED {adopted}", flush=True)
    conn.stop()
    if committer is not None:
        committer.close()
    members = getattr(conn, "members", None)
    print(json.dumps({"accepted": conn.summary.accepted, "connections": conn.connections,
                      "adopted_sessions": members.adopted_sessions if members else 0,
                      "adopted_messages": members.adopted_messages if members else 0}), flush=True)
    spool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
