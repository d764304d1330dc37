"""Deferrable wait for new FIRMS detections in a bounding box (runs in the triggerer).

The trigger carries the Connection id, never the MAP_KEY: its kwargs are stored in the metadata
database and shown in the UI, so the key is read from the Connection inside :meth:`run`, and every
error text it logs or reports has the key masked.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from wildfire.connectors.base import mask_secrets


def count_new_detections(csv_text: str, since: datetime) -> tuple[int, str | None]:
    """Rows acquired strictly after ``since`` and the newest acquisition time seen (ISO, UTC)."""
    reader = csv.DictReader(io.StringIO(csv_text.lstrip("\ufeff")))
    new, newest = 0, None
    for row in reader:
        try:
            hhmm = str(row["acq_time"]).strip().zfill(4)
            ts = datetime.strptime(f"{row['acq_date'].strip()} {hhmm}", "%Y-%m-%d %H%M").replace(tzinfo=UTC)
        except (KeyError, ValueError, AttributeError):
            continue  # malformed rows are the connector's business; here they are simply not "new"
        if ts > since:
            new += 1
        if newest is None or ts.isoformat() > newest:
            newest = ts.isoformat()
    return new, newest


class FirmsNewDetectionsTrigger(BaseTrigger):
    """Polls the FIRMS area CSV API until a detection newer than ``since`` appears.

    Fires ``{"status": "new", "count": n, "newest": iso}``; on ``timeout_s`` fires ``{"status": "timeout"}``;
    on repeated HTTP errors keeps polling (FIRMS outages are common) and reports the last error on timeout.
    Base URL and MAP_KEY come from the Airflow Connection ``conn_id`` (read in the triggerer).
    """

    def __init__(self, *, conn_id: str, satellite_source: str, bbox: list[float],
                 since: str, poll_interval_s: float = 300.0, timeout_s: float = 3600.0, day_range: int = 1) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.satellite_source = satellite_source
        self.bbox = [float(x) for x in bbox]
        self.since = since
        self.poll_interval_s = float(poll_interval_s)
        self.timeout_s = float(timeout_s)
        self.day_range = int(day_range)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "wildfire.airflow.triggers.firms.FirmsNewDetectionsTrigger",
            {
                "conn_id": self.conn_id,
                "satellite_source": self.satellite_source,
                "bbox": self.bbox,
                "since": self.since,
                "poll_interval_s": self.poll_interval_s,
                "timeout_s": self.timeout_s,
                "day_range": self.day_range,
            },
        )

    def url(self, base_url: str, map_key: str) -> str:
        bbox = ",".join(f"{x:g}" for x in self.bbox)
        return f"{base_url.rstrip('/')}/api/area/csv/{map_key}/{self.satellite_source}/{bbox}/{self.day_range}"

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        from wildfire.airflow.hooks.firms import FirmsHook

        endpoint = await FirmsHook(self.conn_id).aget_endpoint()
        key = endpoint.credential or ""
        url = self.url(endpoint.base_url, key)
        since = datetime.fromisoformat(self.since)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        last_error = None
        async with httpx.AsyncClient(timeout=30.0) as client:
            while True:
                try:
                    resp = await client.get(url)
                    resp.raise_for_status()
                    count, newest = count_new_detections(resp.text, since)
                    if count:
                        yield TriggerEvent({"status": "new", "count": count, "newest": newest})
                        return
                except httpx.HTTPError as exc:
                    # httpx names the URL (and so the key) in its status errors: mask before logging.
                    last_error = mask_secrets(f"{type(exc).__name__}: {exc}", (key,))
                    self.log.warning("FIRMS poll failed, will retry: %s", last_error)
                if loop.time() + self.poll_interval_s > deadline:
                    yield TriggerEvent({"status": "timeout", "last_error": last_error})
                    return
                await asyncio.sleep(self.poll_interval_s)
