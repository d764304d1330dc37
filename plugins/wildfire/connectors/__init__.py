"""Source connectors: FIRMS, NWS observations and alerts, PurpleAir, ERA5 (GRIB), IoT over MQTT.

Each turns one upstream format into standardized :class:`wildfire.records.Record` values (or an
:class:`~wildfire.records.EncodedBatch` of their wire JSON), dead-letters what it cannot use and
counts everything in a :class:`~wildfire.connectors.base.RunSummary`. Heavy libraries (polars,
xarray, cfgrib, paho) are imported by the modules that need them, not here.
"""

from __future__ import annotations
