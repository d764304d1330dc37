"""Wildfire data ingestion: connectors, streaming layers, storage and the Airflow plugin.

Everything the project runs lives in this one package. Airflow imports it because the
plugins folder is on ``sys.path``; pytest puts ``plugins`` on its path the same way.
"""

from __future__ import annotations

__version__ = "0.1.0"
