"""Assets on the stored tables, so downstream DAGs can be scheduled on new data, and the CRITICAL alerts Asset,
updated by the triggerer (an AssetWatcher on the alerts topic) so the evacuation_alert DAG runs on each one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import Asset, AssetWatcher

if TYPE_CHECKING:
    from wildfire.config import AlertWatchConfig

FIRE_DETECTIONS = Asset(name="wildfire_fire_detections", uri="wildfire://storage/fire_detections",
                        group="wildfire")


def critical_alerts_asset(watch: AlertWatchConfig, *, kafka_config_id: str = "kafka_default") -> Asset:
    """The Asset a CRITICAL record on ``watch.topic`` updates (through :class:`CriticalAlertTrigger`).

    The trigger's kwargs (topic, group, Connection id) are part of the serialized DAG; the Kafka client config
    and its secrets are read from the Connection in the triggerer.
    """
    from wildfire.airflow.triggers.alerts import CriticalAlertTrigger

    trigger = CriticalAlertTrigger(topic=watch.topic, group=watch.consumer_group, kafka_config_id=kafka_config_id,
                                   max_age_s=watch.max_age_s, poll_timeout_s=watch.poll_timeout_s)
    return Asset(name="wildfire_critical_alerts", uri=f"wildfire://kafka/{watch.topic}/critical", group="wildfire",
                 watchers=[AssetWatcher(name="critical_alerts_watcher", trigger=trigger)])
