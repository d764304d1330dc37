"""Scale-out of the IoT shard: N connectors share one MQTT 5 subscription, and survivors adopt a dead member's session.

``sources.iot_mqtt.options.shared_group: iot`` turns the subscription into ``$share/iot/<topic_filter>``: the
broker hands each message to ONE member of the group (round robin in Mosquitto), so N IoT workers, each with
its own client id and its own spool, split the sensor fleet. Without the option nothing here is used.

What the broker does when a member dies (measured on Mosquitto 2.0, ``tests/integration/test_mqtt_shared.py``):

- session expiry 0 (MQTT 5 ``clean_start`` sessions): the dead member's unacknowledged QoS 1 messages are
  discarded with its session; they are NOT handed to another member. Lost.
- session expiry > 0: they stay in the dead member's session, and the broker keeps queueing that member's
  round-robin share of NEW messages there while it is offline. Nothing is lost, but half the fleet's readings
  wait for that one worker to come back.

Neither is "the broker redelivers to the survivor", so the members do it themselves:

1. Each member keeps a persistent session (``clean_start=False``, ``session_expiry_s``), publishes the retained
   status ``online`` to ``<members_topic>/<group>/<client id>`` and sets the retained Last Will ``offline`` there
   with a Will Delay of ``takeover_after_s``: a member that restarts within that time (same client id) never
   looks dead. A SIGKILLed or partitioned member's will is published once the delay has passed; a member that
   stops on purpose disconnects with reason 0x04 (send the will), so the same happens if it does not return.
2. Every member watches the statuses. On ``offline`` the next live member after the dead one (ring order of
   client ids; the others after ``takeover_after_s`` per rank, in case it does not) *adopts* the session:
   it connects with the dead member's client id and ``clean_start=False``. The broker resends the in-flight
   messages (DUP) and everything queued. The adopter unsubscribes the session from the group (no new share
   is queued there), runs every message through the connector's normal path (validate, spool, then PUBACK),
   and once nothing has arrived for ``ADOPT_QUIET_S`` ends the session (DISCONNECT with session expiry 0) and
   clears the retained status.

Guarantee: at-least-once across the group. A message the dead member stored in ITS spool but had not yet
acknowledged is delivered again to the adopter and stored twice (once per spool); those duplicates are
exactly the dead member's unacknowledged in-flight messages (at most the broker's ``max_inflight_messages``,
20 by default) and carry the same natural key ``sensor_id|timestamp``, which storage upserts on, so one row
remains. Records the dead member had already spooled but not yet published wait in its spool until it runs
again (same client id or not: the spool is per worker, not per session).

Not guaranteed: the next member in ring order also adopts once its stagger (``takeover_after_s`` per rank)
has passed while the status still says ``offline``; it takes the session over from a slow or dead first
adopter (the broker moves the session; unacknowledged messages go to the newcomer, so again at-least-once).
If every live member fails to finish, the session (its expiry unchanged) waits for the member's return or
the next ``offline`` status. Quiet for ``ADOPT_QUIET_S`` is taken as "the broker has nothing more queued".
A member whose client id changes on every start (the stream worker's default id contains the pid) is adopted
after each stop, by its peers or by its own next incarnation. Anyone allowed to publish to the members topic
can trigger an adoption of any client id: restrict that topic with broker ACLs.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from wildfire.connectors.mqtt import MqttConnector

log = logging.getLogger(__name__)

ADOPT_QUIET_S = 1.0  # an adopted session is drained once nothing has arrived for this long
ADOPT_MAX_S = 300.0  # one adoption ends (keeping the session) after this long, however much is still coming
ONLINE, OFFLINE = b"online", b"offline"
_LEVEL = re.compile(r"^[^/+#$\x00]+$")  # one topic level without wildcards; not starting with $


class ShareOptions(BaseModel):
    """The MQTT session and scale-out keys of ``sources.iot_mqtt.options``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    shared_group: str | None = Field(None, max_length=64, description="unset: one plain subscription")
    session_expiry_s: int = Field(86_400, ge=1, le=4_294_967_294,
                                  description="how long the broker keeps a disconnected member's session")
    takeover_after_s: int = Field(30, ge=0, le=86_400,
                                  description="Will Delay: a member away this long is declared dead")
    members_topic: str = Field("wildfire/iot-members", min_length=1, max_length=200)
    client_id: str | None = Field(None, min_length=1, max_length=64,
                                  description="the stream worker's MQTT client id (its persistent session); unset: "
                                              "WILDFIRE_MQTT_CLIENT_ID, else wildfire-stream_worker-<host name>")

    @field_validator("shared_group")
    @classmethod
    def _one_level(cls, v: str | None) -> str | None:
        if v is not None and not _LEVEL.match(v):
            raise ValueError("must be one topic level: no '/', '+', '#', and not starting with '$'")
        return v

    @field_validator("members_topic")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if any(c in v for c in "+#") or v.startswith("$") or v.endswith("/"):
            raise ValueError("must be a plain topic (no wildcards, not starting with '$', no trailing '/')")
        return v

    @classmethod
    def from_options(cls, options: dict[str, Any], source_name: str) -> ShareOptions:
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"sources.{source_name}.options: {where}") from None

    @property
    def group(self) -> str | None:
        return self.shared_group

    def subscription(self, topic_filter: str) -> str:
        return f"$share/{self.shared_group}/{topic_filter}" if self.shared_group else topic_filter

    def status_topic(self, client_id: str) -> str:
        return f"{self.members_topic}/{self.shared_group}/{client_id}"

    def status_filter(self) -> str:
        return f"{self.members_topic}/{self.shared_group}/+"


class Membership:
    """One member's view of its group: announces itself, watches the others, adopts the sessions of the dead."""

    def __init__(self, connector: MqttConnector, client: Any) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.connector = connector
        self.share = connector.share
        self.me = connector.client_id
        if not _LEVEL.match(self.me):
            raise ValueError(f"{connector.source_name}: client id {self.me!r} cannot name a member of a shared group "
                             "(it must be one topic level: no '/', '+', '#')")
        will = Properties(PacketTypes.WILLMESSAGE)
        will.WillDelayInterval = self.share.takeover_after_s
        client.will_set(self.share.status_topic(self.me), OFFLINE, qos=1, retain=True, properties=will)
        client.message_callback_add(self.share.status_filter(), self._on_status)
        self._lock = threading.Lock()
        self.status: dict[str, bytes] = {}
        self._timers: dict[str, threading.Timer] = {}
        self._adopting: dict[str, SessionAdoption] = {}
        self._stopping = False
        self.adopted_sessions = 0
        self.adopted_messages = 0

    def announce(self, client: Any) -> None:
        """After every (re)subscription: say we are alive and (re)watch the group."""
        client.publish(self.share.status_topic(self.me), ONLINE, qos=1, retain=True)
        client.subscribe(self.share.status_filter(), qos=1)

    def leave_reason(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        return ReasonCode(PacketTypes.DISCONNECT, identifier=4)  # "Disconnect with Will Message"

    def _on_status(self, client: Any, userdata: Any, msg: Any) -> None:
        peer = msg.topic.rsplit("/", 1)[-1]
        payload = bytes(msg.payload)
        if msg.qos:
            client.ack(msg.mid, msg.qos)  # manual acks are on; a status is handled once read
        if peer == self.me or not _LEVEL.match(peer) or len(peer) > 256:
            return  # our own status, or a level no member of ours could have as client id: nothing to adopt
        with self._lock:
            if payload:
                self.status[peer] = payload
            else:
                self.status.pop(peer, None)
            timer = self._timers.pop(peer, None)
            if timer is not None:
                timer.cancel()
            if payload != OFFLINE or self._stopping or peer in self._adopting:
                return
            delay = self._rank(peer) * max(1, self.share.takeover_after_s)
            timer = threading.Timer(delay, self._adopt, args=(peer,))
            timer.daemon = True
            self._timers[peer] = timer
        log.info("%s: member %s of group %s is offline; adopting its session in %.0f s",
                 self.connector.source_name, peer, self.share.group, delay)
        timer.start()

    def _rank(self, dead: str) -> int:
        """0 if we are the first live member after ``dead`` in ring order, 1 if second, ...: one adopter at a time."""
        live = sorted({m for m, s in self.status.items() if s == ONLINE} | {self.me})
        after = [m for m in live if m > dead] + [m for m in live if m < dead]
        return after.index(self.me)

    def _adopt(self, peer: str) -> None:
        with self._lock:
            self._timers.pop(peer, None)
            if self._stopping or self.status.get(peer) != OFFLINE or peer in self._adopting:
                return
            adoption = SessionAdoption(self.connector, peer)
            self._adopting[peer] = adoption
        try:
            n = adoption.run()
        except Exception as exc:  # noqa: BLE001 - an adoption that fails leaves the session for the next try
            log.error("%s: adopting the session of %s failed: %s", self.connector.source_name, peer, exc)
            n = None
        finally:
            with self._lock:
                self._adopting.pop(peer, None)
        if n is None:
            return
        with self._lock:
            self.adopted_sessions += 1
            self.adopted_messages += n
            still_offline = self.status.get(peer) == OFFLINE
        if still_offline:
            # Clear the retained will: the session is gone, nobody needs to adopt it again.
            self.connector.client.publish(self.share.status_topic(peer), b"", qos=1, retain=True)
        log.info("%s: adopted the session of %s: %d messages", self.connector.source_name, peer, n)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            timers, adoptions = list(self._timers.values()), list(self._adopting.values())
            self._timers.clear()
        for t in timers:
            t.cancel()
        for a in adoptions:
            a.abort()


class SessionAdoption:
    """Connect as a dead member, take what its session holds through the connector's own path, end the session.

    ``run()`` returns the number of messages taken, or None when it did not finish (taken over by the member
    coming back or another adopter, aborted, refused, timed out): then the session, and with it every message
    not yet acknowledged, stays with the broker.
    """

    def __init__(self, connector: MqttConnector, peer: str) -> None:
        self.connector = connector
        self.peer = peer
        self.messages = 0
        self._last = time.monotonic()
        self._ready = threading.Event()  # connected, and the session was unsubscribed from the group
        self._gone = threading.Event()  # disconnected (by us or not)
        self._aborted = threading.Event()
        self._present = False
        self._unsub_mid: int | None = None
        self._failure: str | None = None
        self._busy = 0  # messages being stored right now (paho's network thread, one at a time)

    def abort(self) -> None:
        self._aborted.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._failure = f"refused: {reason_code}"
            self._gone.set()
            return
        self._present = bool(flags.session_present)
        if not self._present:
            self._ready.set()  # nothing to adopt (expired, or already adopted): end the empty session we made
            return
        share = self.connector.share
        _, self._unsub_mid = client.unsubscribe([self.connector.subscription, share.status_filter()])

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid == self._unsub_mid:
            self._ready.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._last = time.monotonic()
        if msg.topic.startswith(self.connector.share.members_topic + "/"):
            if msg.qos:
                client.ack(msg.mid, msg.qos)  # the dead member's view of the group: not ours to act on
            return
        self.messages += 1
        self._busy += 1
        try:
            self.connector._on_message(client, userdata, msg)  # validate, spool, then PUBACK: the normal path
        finally:
            self._busy -= 1
            self._last = time.monotonic()  # quiet counts from the end of the last store, however long it took

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._gone.set()

    def run(self) -> int | None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = self.connector
        client = c.new_client(self.peer)
        client.on_connect = self._on_connect
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        # No reconnect: if the broker hands the session to someone else (the member is back), we are done.
        client.connect(c.host, c.port, keepalive=c.keepalive_s, clean_start=False, properties=c.connect_properties())
        client.loop_start()
        deadline = time.monotonic() + ADOPT_MAX_S
        try:
            while not (self._ready.is_set() or self._gone.is_set() or self._aborted.is_set()):
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            if not self._ready.is_set():
                return None
            self._last = max(self._last, time.monotonic())
            while self._busy or time.monotonic() - self._last < ADOPT_QUIET_S:
                if self._gone.is_set() or self._aborted.is_set() or time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            end = Properties(PacketTypes.DISCONNECT)
            end.SessionExpiryInterval = 0  # the session ends here; its messages were all taken and acknowledged
            client.disconnect(properties=end)
            self._gone.wait(5)
            return self.messages
        finally:
            if not self._gone.is_set():
                client.disconnect()  # keeps the session (expiry unchanged) for whoever comes next
            client.loop_stop()
