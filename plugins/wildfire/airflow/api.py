"""Operations API and page (mounted by the Airflow plugin under /wildfire).

State comes from the stores (database, spool file) and the worker's metrics endpoint, never from
module-level objects: each Airflow component runs in its own process.
"""

from __future__ import annotations

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI(title="Wildfire operations", version="0.1.0")

    @app.get("/health")
    def health() -> dict:
        return {"status": "starting"}

    return app
