"""Wildfire data ingestion: connectors, streaming layers, storage and the Airflow plugin.

Everything the project runs lives in this one package. Airflow imports it because the
plugins folder is on ``sys.path``; pytest puts ``plugins`` on its path the same way.
"""

from __future__ import annotations

# Bind Python's sqlite3 to the system SQLite before anything this package imports can load another
# copy: the eccodes wheels behind cfgrib bundle SQLite 3.26 (eckitlib.libs), and whichever
# libsqlite3 a process loads first serves every later `import sqlite3`. The spool needs 3.35+
# (RETURNING); with 3.26 every spool write failed with 'near "RETURNING": syntax error' in a process
# that had decoded GRIB before touching the spool (an ERA5 backfill task, for one).
import sqlite3  # noqa: F401  (imported for its side effect on the process; see above)

__version__ = "0.1.0"
