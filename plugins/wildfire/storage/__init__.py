"""Storage: Kafka -> PostgreSQL (or embedded SQLite), exactly one row per natural key.

- :mod:`wildfire.storage.schema`   tables (SQLAlchemy Core)
- :mod:`wildfire.storage.migrate`  Alembic upgrade, ``python -m wildfire.storage.migrate upgrade``
- :mod:`wildfire.storage.rows`     message values -> rows (decode_row; decode_batch with a msgspec fast path)
- :mod:`wildfire.storage.writer`   bulk upsert (PostgreSQL: COPY, or COPY to staging + ON CONFLICT when a key
                                   exists; SQLite: INSERT ... ON CONFLICT)
- :mod:`wildfire.storage.consumer` the consumer group (writer thread overlapping decode) that commits
                                   offsets after the DB commit
- :mod:`wildfire.storage.lag`      consumer lag from committed offsets vs high watermarks
"""

from __future__ import annotations
