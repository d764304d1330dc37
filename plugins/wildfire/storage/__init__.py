"""Storage: Kafka -> PostgreSQL (or embedded SQLite), exactly one row per natural key.

- :mod:`wildfire.storage.schema`   tables (SQLAlchemy Core)
- :mod:`wildfire.storage.migrate`  Alembic upgrade, ``python -m wildfire.storage.migrate upgrade``
- :mod:`wildfire.storage.writer`   bulk upsert (PostgreSQL COPY + ON CONFLICT; SQLite executemany)
- :mod:`wildfire.storage.consumer` the consumer group that commits offsets after the DB commit
- :mod:`wildfire.storage.lag`      consumer lag from committed offsets vs high watermarks
"""

from __future__ import annotations
