"""The demo's outside world, in one process: upstream APIs replayed from the samples, and a sensor fleet.

    python -m wildfire.demo.serve --port 8765 [--sensors 50 --rate 25]

- Upstream APIs at their real URL layouts on http://127.0.0.1:PORT (see :mod:`wildfire.demo.upstream`).
- A fleet of simulated IoT sensors publishing JSON readings over MQTT (QoS 1) to
  ``wildfire/sensors/<id>`` at ``--rate`` messages per second in total.
- Control, for the scenario driver (GET, loopback only):
  ``/_demo/spike?factor=10`` (fleet rate and FIRMS volume x factor), ``/_demo/calm``,
  ``/_demo/alert?event=Evacuation%20Immediate``, ``/_demo/stats`` (JSON counters).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any

from wildfire.connectors.replay import Reply
from wildfire.demo.upstream import JSON, UpstreamReplay

# Ten sensor sites spread over California's fire country (lat, lon).
SITES = [(38.58, -121.49), (34.05, -118.24), (37.77, -122.42), (36.74, -119.79), (40.59, -122.39),
         (34.42, -119.70), (39.73, -121.84), (33.83, -116.55), (41.74, -122.63), (35.37, -119.02)]


class SensorFleet:
    """``sensors`` field sensors publishing over MQTT at ``rate`` readings/s in total (bounded, loopback)."""

    def __init__(self, host: str, port: int, *, sensors: int = 50, rate: float = 25.0, seed: int = 7) -> None:
        import paho.mqtt.client as mqtt

        self.sensors = sensors
        self.rate = rate
        self.factor = 1.0
        self.sent = 0
        self.malformed = 0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-fleet-{seed}")
        self.client.connect(host, port)
        self.client.loop_start()

    def reading(self, i: int) -> dict[str, Any]:
        lat, lon = SITES[i % len(SITES)]
        hot = self.factor > 1 and i % 7 == 0  # during the spike some sites cross fire-weather thresholds
        return {
            "sensor_id": f"ca-{i:04d}",
            "timestamp": datetime.now(UTC).isoformat(),
            "latitude": round(lat + self._rng.uniform(-0.2, 0.2), 5),
            "longitude": round(lon + self._rng.uniform(-0.2, 0.2), 5),
            "temperature_c": round(self._rng.uniform(41, 46) if hot else self._rng.uniform(15, 35), 2),
            "relative_humidity_pct": round(self._rng.uniform(5, 12) if hot else self._rng.uniform(20, 70), 2),
            "wind_speed_ms": round(self._rng.uniform(12, 20) if hot else self._rng.uniform(0, 8), 2),
            "battery_v": round(self._rng.uniform(3.5, 4.2), 2),
        }

    def run(self) -> None:
        i = 0
        while not self._stop.is_set():
            per_s = max(1.0, self.rate * self.factor)
            burst = max(1, int(per_s / 10))
            for _ in range(burst):
                sensor = i % self.sensors
                if i % 500 == 499:  # a firmware bug now and then: must be dead-lettered, not crash anything
                    self.client.publish(f"wildfire/sensors/ca-{sensor:04d}", b'{"sensor_id": "ca-', qos=1)
                    self.malformed += 1
                else:
                    self.client.publish(f"wildfire/sensors/ca-{sensor:04d}", json.dumps(self.reading(sensor)), qos=1)
                self.sent += 1
                i += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.client.loop_stop()
        self.client.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wildfire.demo.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--sensors", type=int, default=50)
    parser.add_argument("--rate", type=float, default=25.0, help="fleet readings per second (before a spike)")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600, help="stop by itself after this long")
    args = parser.parse_args(argv)

    upstream = UpstreamReplay(port=args.port)
    fleet = SensorFleet(args.mqtt_host, args.mqtt_port, sensors=args.sensors, rate=args.rate)

    def spike(path: str, query: dict[str, list[str]]) -> Reply:
        factor = float(query.get("factor", ["10"])[0])
        fleet.factor = factor
        upstream.firms_copies = max(1, int(factor))
        return Reply(200, json.dumps({"factor": factor}).encode(), JSON)

    def calm(path: str, query: dict[str, list[str]]) -> Reply:
        fleet.factor = 1.0
        upstream.firms_copies = 1
        return Reply(200, b'{"factor": 1}', JSON)

    def alert(path: str, query: dict[str, list[str]]) -> Reply:
        alert_id = upstream.raise_alert(query.get("event", ["Evacuation Immediate"])[0])
        return Reply(200, json.dumps({"id": alert_id}).encode(), JSON)

    def stats(path: str, query: dict[str, list[str]]) -> Reply:
        body = {"fleet_sent": fleet.sent, "fleet_malformed": fleet.malformed, "fleet_factor": fleet.factor,
                "polls": dict(upstream._polls)}
        return Reply(200, json.dumps(body).encode(), JSON)

    for path, handler in (("/_demo/spike", spike), ("/_demo/calm", calm), ("/_demo/alert", alert),
                          ("/_demo/stats", stats)):
        upstream.server.route(path, handler)
    upstream.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=fleet.run, name="fleet", daemon=True).start()
    print(f"demo upstream on {upstream.url}; sensor fleet on mqtt://{args.mqtt_host}:{args.mqtt_port}", flush=True)
    stop.wait(args.max_seconds)
    fleet.stop()
    upstream.stop()
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
