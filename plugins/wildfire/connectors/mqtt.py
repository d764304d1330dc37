"""IoT sensors over MQTT (paho-mqtt 2.x) -> ``iot_reading`` records, acknowledged only once stored.

Guarantees:

- MQTT 5, QoS 1 subscription on a persistent session (``clean_start=False``, fixed client id, session expiry
  ``options.session_expiry_s``, default one day): messages published while the connector is away are kept by
  the broker and delivered when it returns (a session left alone longer than the expiry is discarded).
- Scale-out (``options.shared_group``; unset: one plain subscription): the subscription becomes the MQTT 5
  shared subscription ``$share/<group>/<topic_filter>``, so N connectors (N IoT workers, each with its own
  spool and client id) split the fleet: the broker hands each message to one member. A member that dies
  leaves its unacknowledged messages, and its round-robin share of newer ones, in its persistent session
  (Mosquitto 2.0 neither redelivers them to other members nor stops queueing for an offline member; with
  session expiry 0 it discards them). The survivors therefore take the session over: see
  :mod:`wildfire.connectors.mqtt_shared` (membership by retained status + delayed Last Will, session adoption).
- Manual acknowledgement: a message is PUBACKed only after the injected ``sink(records)`` returned
  without raising (the spool accepted it). If the sink raises, the message is left unacknowledged
  and the broker delivers it again when the session resumes (MQTT redelivers unacked QoS 1
  messages on reconnect); it is counted as ``sink_failed``. Delivery is therefore at-least-once:
  the natural key ``sensor_id|timestamp`` lets storage collapse a redelivery.
- Group commit: with ``async_sink`` (e.g. :meth:`wildfire.group_commit.GroupCommitter.submit`) a
  record is handed over without blocking paho's network thread and the message is PUBACKed from the
  future's callback once the record is durable; a future that fails (or an ``async_sink`` that
  raises) leaves the message unacknowledged and counts ``sink_failed``, as above. Messages that
  arrive together (up to the broker's in-flight window) then share one spool transaction and fsync.
- A payload that is not JSON or fails the :class:`IotReading` schema becomes a counted dead letter
  (handed to ``dead_letter_sink``) and is then acknowledged: retrying it cannot make it valid. So
  does any other failure to turn one payload into a record (reason ``bad_reading``): nothing a
  publisher sends can raise out of paho's callback thread.
- A payload larger than ``config.max_payload_bytes`` (default 64 KiB) is not decoded: it is a dead
  letter ``too_large`` holding its first 4 KiB. A timestamp outside the source's plausibility
  window (default: before 1970 or more than a day after the injected clock's now), or one that
  cannot be converted to UTC, is a dead letter ``implausible_time``.
- Bounded: ``sink_failures`` keeps the last ``SINK_FAILURE_SAMPLE`` failure texts;
  ``sink_failure_count`` counts them all.
- Priority is ``config.record_priority`` (NORMAL), raised to HIGH when a reading crosses any
  fire-weather threshold from ``config.options["thresholds"]`` (defaults: temperature >= 40 C,
  relative humidity <= 15 %, wind >= 13 m/s).
- The network loop reconnects by itself after a broker restart (back-off 1-30 s).
- Transport security: TLS when a CA file is given (``tls_ca``; ``tls=True`` alone uses the system's CAs), the
  broker's certificate and host name verified; an optional client certificate (``tls_cert`` + ``tls_key``);
  username/password. A file that does not exist is a ValueError naming the setting at construction. A refused
  connection (bad credentials, not authorised) or a failed TCP/TLS connect is logged as an ERROR once per streak
  and kept in ``last_error``; the loop keeps retrying, the password is never logged. Settings come from
  :class:`wildfire.sources.Endpoints` (``WILDFIRE_MQTT_*`` variables or the ``mqtt_default`` Connection):
  :meth:`MqttConnector.from_endpoints`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from wildfire.clock import SYSTEM_CLOCK, Clock
from wildfire.config import SourceConfig
from wildfire.connectors.base import DeadLetter, ImplausibleTime, RunSummary, TimeWindow, describe
from wildfire.priority import Priority
from wildfire.records import Record

if TYPE_CHECKING:
    from wildfire.sources import Endpoints

log = logging.getLogger(__name__)

SINK_FAILURE_SAMPLE = 100  # recent sink failure texts kept for diagnosis; older ones only counted
TOO_LARGE_RAW_BYTES = 4096  # what a too_large dead letter keeps of its payload

DEFAULT_THRESHOLDS = {"temperature_c_min": 40.0, "relative_humidity_pct_max": 15.0, "wind_speed_ms_min": 13.0}


class IotReading(BaseModel):
    """The JSON a field sensor publishes. Unknown keys are errors, so a firmware typo is noticed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sensor_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    timestamp: AwareDatetime
    latitude: float | None = Field(None, ge=-90, le=90)
    longitude: float | None = Field(None, ge=-180, le=180)
    temperature_c: float | None = Field(None, ge=-80, le=80)
    relative_humidity_pct: float | None = Field(None, ge=0, le=100)
    wind_speed_ms: float | None = Field(None, ge=0, le=120)
    wind_direction_deg: float | None = Field(None, ge=0, le=360)
    pm25_ugm3: float | None = Field(None, ge=0, le=10_000)
    battery_v: float | None = Field(None, ge=0, le=60)


def crosses_thresholds(reading: IotReading, thresholds: dict[str, float]) -> list[str]:
    """Names of the fire-weather thresholds this reading crosses (empty list: none)."""
    crossed = []
    t = thresholds
    if reading.temperature_c is not None and reading.temperature_c >= t["temperature_c_min"]:
        crossed.append("temperature")
    if reading.relative_humidity_pct is not None and reading.relative_humidity_pct <= t["relative_humidity_pct_max"]:
        crossed.append("relative_humidity")
    if reading.wind_speed_ms is not None and reading.wind_speed_ms >= t["wind_speed_ms_min"]:
        crossed.append("wind_speed")
    return crossed


def _schema_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<payload>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_iot_payload(
    payload: bytes,
    topic: str,
    source_name: str,
    *,
    thresholds: dict[str, float] | None = None,
    base_priority: Priority = Priority.NORMAL,
    ingest_time: datetime | None = None,
    window: TimeWindow | None = None,
    now: float | None = None,
    max_bytes: int | None = None,
) -> Record | DeadLetter:
    """One MQTT payload -> Record, or a DeadLetter naming what is wrong. Never raises on bad input.

    ``max_bytes``: a longer payload is ``too_large`` without being decoded. ``window``: the
    timestamp must lie in it around ``now`` (epoch seconds; default the ingest time).
    """
    if max_bytes is not None and len(payload) > max_bytes:
        return DeadLetter(source_name, "too_large", bytes(payload[:TOO_LARGE_RAW_BYTES]),
                          f"{topic}: payload of {len(payload)} bytes is over the max_payload_bytes limit of "
                          f"{max_bytes}; not decoded (first {TOO_LARGE_RAW_BYTES} bytes kept)")
    try:
        return _parse(payload, topic, source_name, thresholds=thresholds, base_priority=base_priority,
                      ingest_time=ingest_time, window=window, now=now)
    except ImplausibleTime as exc:
        return DeadLetter(source_name, "implausible_time", bytes(payload), f"{topic}: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever one payload does, it is that payload's dead letter
        return DeadLetter(source_name, "bad_reading", bytes(payload), f"{topic}: {describe(exc)}")


def _parse(
    payload: bytes,
    topic: str,
    source_name: str,
    *,
    thresholds: dict[str, float] | None,
    base_priority: Priority,
    ingest_time: datetime | None,
    window: TimeWindow | None,
    now: float | None,
) -> Record | DeadLetter:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return DeadLetter(source_name, "not_json", payload, f"{topic}: payload is not JSON ({exc})")
    try:
        reading = IotReading.model_validate(obj)
    except ValidationError as exc:
        return DeadLetter(source_name, "schema", payload, f"{topic}: {_schema_error(exc)}")
    crossed = crosses_thresholds(reading, {**DEFAULT_THRESHOLDS, **(thresholds or {})})
    try:
        when = reading.timestamp.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-05:00 is past what datetime holds in UTC
        raise ImplausibleTime(f"timestamp {reading.timestamp.isoformat()} cannot be converted to UTC") from None
    ingest_time = ingest_time or datetime.now(UTC)
    if window is not None:
        window.check(when, ingest_time.timestamp() if now is None else now)
    fields = reading.model_dump(exclude={"timestamp", "latitude", "longitude"})
    present = [v for k, v in fields.items() if k not in ("sensor_id", "battery_v")]
    quality = sum(v is not None for v in present) / len(present)
    return Record(
        source=source_name,
        kind="iot_reading",
        key=f"{reading.sensor_id}|{when.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}",
        event_time=when,
        priority=Priority.HIGH if crossed and base_priority > Priority.HIGH else base_priority,
        payload={**fields, "topic": topic, "thresholds_crossed": crossed},
        lat=reading.latitude,
        lon=reading.longitude,
        quality=round(quality, 3),
        ingest_time=ingest_time,
    )


class MqttConnector:
    """Subscribe, validate, hand to the sink, then acknowledge.

    ``MqttConnector("127.0.0.1", 1883, cfg, sink=spool.accept, client_id="wildfire-iot-1").start()``
    """

    def __init__(
        self,
        host: str,
        port: int,
        config: SourceConfig,
        *,
        sink: Callable[[list[Record]], None],
        client_id: str,
        dead_letter_sink: Callable[[DeadLetter], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        source_name: str = "iot_mqtt",
        keepalive_s: int = 30,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        async_sink: Callable[[Record], Future[Any]] | None = None,
    ) -> None:
        if not client_id:
            raise ValueError(f"{source_name}: a fixed client_id is required for a persistent session")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError(f"{source_name}: MQTT TLS client certificate and key go together "
                             f"(tls_cert={tls_cert!r}, tls_key={'set' if tls_key else None})")
        for setting, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{source_name}: MQTT {setting} file {path!r} does not exist")
        self.tls = bool(tls or tls_ca or tls_cert)
        self.last_error: str | None = None
        self._answered = False  # a CONNACK arrived on the current connection (accepted or refused)
        self.host, self.port = host, port
        self.config = config
        self.sink = sink
        self.async_sink = async_sink
        self.dead_letters: list[DeadLetter] = []
        self.dead_letter_sink = dead_letter_sink or self.dead_letters.append
        self.clock = clock
        self.source_name = source_name
        self.keepalive_s = keepalive_s
        opts = config.options
        self.topic_filter = str(opts.get("topic_filter", "wildfire/sensors/#"))
        self.qos = int(opts.get("qos", 1))
        from wildfire.connectors.mqtt_shared import ShareOptions

        self.share = ShareOptions.from_options(opts, source_name)
        self.client_id = client_id
        # What this client subscribes to: the plain filter, or the group's shared subscription.
        self.subscription = self.share.subscription(self.topic_filter)
        self.thresholds = {**DEFAULT_THRESHOLDS, **opts.get("thresholds", {})}
        self.summary = RunSummary(source_name)
        self.window = TimeWindow.from_config(config)
        self.max_payload_bytes = config.max_payload_bytes
        # Bounded: a sink down for hours fails every message; keep a count and a recent sample only.
        self.sink_failures: deque[str] = deque(maxlen=SINK_FAILURE_SAMPLE)
        self.sink_failure_count = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribe_mid: int | None = None
        self.connections = 0
        self._credentials = (username, password)
        self._tls_files = (tls_ca, tls_cert, tls_key)
        client = self.new_client(client_id)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.members: Any = None
        if self.share.group:
            from wildfire.connectors.mqtt_shared import Membership

            # Sets the delayed Last Will on ``client``: peers learn of our death only if we stay away.
            self.members = Membership(self, client)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def new_client(self, client_id: str) -> Any:
        """A paho MQTT 5 client with this connector's credentials and TLS, manual acks; no callbacks yet."""
        import paho.mqtt.client as mqtt

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.manual_ack_set(True)
        username, password = self._credentials
        if username:
            client.username_pw_set(username, password)
        if self.tls:
            # Verifies the broker's certificate chain and host name (paho's default); ca None: system CAs.
            tls_ca, tls_cert, tls_key = self._tls_files
            client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
        return client

    def connect_properties(self) -> Any:
        """CONNECT properties: the session outlives the connection by ``session_expiry_s`` (MQTT 5 default 0
        would discard it, and with it every unacknowledged message, at the first network blip)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.share.session_expiry_s
        return props

    # -- paho callbacks (network thread)

    @classmethod
    def from_endpoints(cls, endpoints: Endpoints, config: SourceConfig, **kw: Any) -> MqttConnector:
        """A connector for the broker, credentials and TLS settings of ``endpoints``."""
        e = endpoints
        return cls(e.mqtt_host, e.mqtt_port, config, username=e.mqtt_username, password=e.mqtt_password,
                   tls=e.mqtt_tls, tls_ca=e.mqtt_tls_ca, tls_cert=e.mqtt_tls_cert, tls_key=e.mqtt_tls_key, **kw)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _failed(self, text: str) -> None:
        # Once per streak: the loop retries every 1-30 s and a wrong password must not flood the log.
        if text != self.last_error:
            log.error("%s: %s", self.source_name, text)
        self.last_error = text

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._failed(f"cannot connect to {self.url} (broker down, or the TLS handshake failed: check the CA, "
                     "the broker's certificate and host name); retrying")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._answered = True
        if reason_code.is_failure:
            hint = (" (check the MQTT username and password)" if int(reason_code.value) in (4, 5, 134, 135)
                    else "")
            self._failed(f"broker {self.url} refused the connection: {reason_code}{hint}; retrying")
            return
        if self.last_error:
            log.warning("%s: connected to %s again", self.source_name, self.url)
        self.last_error = None
        # The persistent session keeps the subscription, but a broker that lost its state would not.
        # "Connected" is only reported once the SUBACK is back (see _on_subscribe): before that a
        # message published by another client can reach the broker ahead of our SUBSCRIBE on a new
        # session and is not routed to us.
        _, self._subscribe_mid = client.subscribe(self.subscription, qos=self.qos)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            # Stay "not connected": readiness probes then report the source as down.
            log.error("%s: broker refused the subscription to %r: %s", self.source_name, self.subscription,
                      reason_codes)
            return
        with self._lock:
            self.connections += 1
        if self.members is not None:
            self.members.announce(client)  # "online", and watch the other members' status
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        if not self._answered and reason_code.is_failure:
            # TCP was accepted but the broker hung up without a CONNACK: typically a TLS-only listener
            # reached without TLS (or a broker that rejects the client before MQTT starts).
            self._failed(f"{self.url} closed the connection before answering (a TLS listener reached without TLS? "
                         "set WILDFIRE_MQTT_TLS_CA or the Connection's tls_ca); retrying")
        self._answered = False

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = self.clock.time()
        ingest = datetime.fromtimestamp(now, UTC)
        item = parse_iot_payload(
            msg.payload, msg.topic, self.source_name, thresholds=self.thresholds,
            base_priority=self.config.record_priority, ingest_time=ingest, window=self.window, now=now,
            max_bytes=self.max_payload_bytes,
        )
        try:
            if isinstance(item, DeadLetter):
                self.dead_letter_sink(item)
            elif self.async_sink is not None:
                # Acked from the future's callback (the group commit's writer thread) once the record is durable.
                self.async_sink(item).add_done_callback(
                    functools.partial(self._stored, client, msg.mid, msg.qos))
                return
            else:
                self.sink([item])
        except Exception as exc:  # noqa: BLE001 - any sink failure means "not stored": do not ack
            self._sink_failed(exc)
            return
        with self._lock:
            if isinstance(item, DeadLetter):
                self.summary.reject(item.reason)
            else:
                self.summary.accepted += 1
        client.ack(msg.mid, msg.qos)

    def _sink_failed(self, exc: BaseException) -> None:
        with self._lock:
            self.summary.reject("sink_failed")
            self.sink_failure_count += 1
            self.sink_failures.append(f"{type(exc).__name__}: {exc}"[:1000])

    def _stored(self, client: Any, mid: int, qos: int, future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:  # not stored: no ack, the broker redelivers on the next session
            self._sink_failed(exc)
            return
        with self._lock:
            self.summary.accepted += 1
        client.ack(mid, qos)

    # -- lifecycle

    def start(self) -> MqttConnector:
        """Connect in the background; the loop keeps reconnecting until :meth:`stop`."""
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=False,
                                  properties=self.connect_properties())
        self.client.loop_start()
        return self

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected *and* subscribed (the broker acknowledged the subscription)."""
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        if self.members is not None:
            # Leave with the (delayed) Last Will: back within takeover_after_s (a restart), nothing happens;
            # otherwise a peer adopts the session and what is queued in it.
            self.members.stop()
            self.client.disconnect(reasoncode=self.members.leave_reason())
        else:
            self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> MqttConnector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
