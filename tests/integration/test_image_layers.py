"""The images' Python layers, built here the way deploy/docker/Dockerfile builds them, run the project.

No Docker engine runs on this machine, so the images themselves cannot be built. What can be: each stage's
``pip install`` line, run into a fresh virtual environment with the same requirement files and constraints
(no dev tools, nothing else installed), and then the project imported with it:

- ``worker`` stage: requirements.txt without the ``apache-airflow*`` lines (the Dockerfile's ``grep -v``), then
  the stream worker, storage consumer, topic creation and migrations are imported and ``--help`` runs;
- ``airflow`` stage: Airflow (``requirements-airflow.txt``, the version of the stage's base image) plus
  requirements.txt, then every DAG of ``dags/`` is parsed by Airflow's DagBag with no import error and every
  module of the ``wildfire`` package (what the tasks import) imports.

The environments are cached under ``.local/image-layers/`` by a hash of the files that define them, so a
second run reuses them; the first build takes a few minutes (pip's cache serves the wheels ``make venv``
fetched). The compiled FIRMS wheel of the build stage is not installed here (it is built and tested by
``make test`` itself); without it the project uses the polars parser, as an image whose build stage failed
would.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".local" / "image-layers"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
pytestmark = [pytest.mark.slow]


def _layer(name: str, requirement_lines: list[str]) -> Path:
    """A venv with ``pip install -c constraints.txt -r <requirement_lines>``, cached by content."""
    constraints = (ROOT / "constraints.txt").read_text()
    text = "\n".join(requirement_lines) + "\n"
    key = hashlib.sha256((constraints + "\0" + text + "\0" + sys.version).encode()).hexdigest()[:16]
    venv = CACHE / f"{name}-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        reqs = venv / "requirements.txt"
        reqs.write_text(text)
        out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "-c", str(ROOT / "constraints.txt"), "-r", str(reqs)],
                             capture_output=True, text=True, timeout=1500)
        assert out.returncode == 0, f"pip install of the {name} layer failed:\n{out.stderr[-4000:]}"
        (venv / ".complete").touch()
    return python


def _requirements(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON"))}
    env.update({"PYTHONPATH": str(ROOT / "plugins"), "AIRFLOW_HOME": str(tmp_path / "airflow"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "WILDFIRE_CONFIG":
                str(ROOT / "config" / "stream_config.yaml")})
    return env


# The work a task or the worker does, with every runtime library it needs (the package imports its heavy
# libraries lazily, so importing modules alone would not notice a missing one): parse the real FIRMS sample
# (polars: no compiled extension in these layers), decode the real ERA5 GRIB (cfgrib, eccodes, xarray), and
# the clients of Kafka, MQTT and the databases.
SMOKE = """
import shutil, sys
from pathlib import Path
root, tmp = Path(sys.argv[1]), Path(sys.argv[2])
from wildfire.connectors.firms import parse_firms_csv
firms = parse_firms_csv((root / "include/samples/firms/NOAA-21_FDDC_2025-04-07.csv").read_bytes(), "nasa_firms",
                        "VIIRS_NOAA21_NRT")
assert len(firms.batch) > 2000, len(firms.batch)
grib = tmp / "era5.grib"
shutil.copy(root / "include/samples/era5/era5-single-level-scalar-time.grib", grib)
from wildfire.connectors.era5 import load_era5_file
era5 = load_era5_file(grib, "era5")
assert len(era5.batch) > 0
import alembic, confluent_kafka, httpx, msgspec, orjson, paho.mqtt.client, prometheus_client, psycopg, sqlalchemy
from wildfire.storage.rows import decode_batch
print("ok", len(firms.batch), len(era5.batch), flush=True)
import os
os._exit(0)  # native libraries (eccodes, librdkafka) can crash in interpreter teardown; the work is done
"""


def _smoke(python: Path, tmp_path: Path) -> None:
    out = subprocess.run([str(python), "-c", SMOKE, str(ROOT), str(tmp_path)], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-4000:]


def test_the_dockerfile_installs_what_this_test_installs() -> None:
    """The test mirrors the Dockerfile's install lines: if those change, this test must change with them."""
    text = DOCKERFILE.read_text()
    assert "grep -v '^apache-airflow' requirements.txt > /tmp/requirements-worker.txt" in text
    assert "pip install --no-cache-dir -c constraints.txt -r /tmp/requirements-worker.txt" in text
    assert "pip install --no-cache-dir -c /tmp/wildfire/constraints.txt -r /tmp/wildfire/requirements.txt" in text
    base = re.search(r"FROM apache/airflow:(\S+)-python3\.11 AS airflow", text)
    assert base, "the airflow stage's base image is not apache/airflow:<version>-python3.11"
    pinned = [ln for ln in _requirements(ROOT / "requirements-airflow.txt") if ln.startswith("apache-airflow==")]
    assert pinned == [f"apache-airflow=={base.group(1)}"], "requirements-airflow.txt pins another Airflow"


def test_worker_layer_runs_the_worker_and_the_consumer(tmp_path: Path) -> None:
    lines = [ln for ln in _requirements(ROOT / "requirements.txt") if not ln.startswith("apache-airflow")]
    python = _layer("worker", lines)
    airflow = subprocess.run([str(python), "-c", "import airflow"], capture_output=True, text=True)
    assert airflow.returncode != 0, "the worker layer must not contain Airflow"
    code = ("import wildfire.worker, wildfire.storage.consumer, wildfire.topics, wildfire.storage.migrate, "
            "wildfire.spool, wildfire.publish, wildfire.connectors.firms, wildfire.connectors.era5, "
            "wildfire.connectors.mqtt; print('ok')")
    out = subprocess.run([str(python), "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-4000:]
    _smoke(python, tmp_path)
    for module in ("wildfire.worker", "wildfire.storage.consumer"):
        helped = subprocess.run([str(python), "-m", module, "--help"], env=_env(tmp_path), capture_output=True,
                                text=True, timeout=300)
        assert helped.returncode == 0 and "usage" in helped.stdout, (module, helped.stderr[-4000:])


def test_airflow_layer_parses_every_dag(tmp_path: Path) -> None:
    lines = _requirements(ROOT / "requirements-airflow.txt") + _requirements(ROOT / "requirements.txt")
    python = _layer("airflow", lines)
    _smoke(python, tmp_path)
    dag_files = sorted(p.name for p in (ROOT / "dags").glob("*.py"))
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "import importlib, pkgutil, wildfire\n"
        "failed = {}\n"
        "for m in pkgutil.walk_packages(wildfire.__path__, 'wildfire.'):\n"
        "    if '.migrations' in m.name or m.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as exc:\n"
        "        failed[m.name] = repr(exc)[-500:]\n"
        "print(json.dumps({'errors': {k: str(v)[-2000:] for k, v in bag.import_errors.items()},\n"
        "                  'files': sorted({d.fileloc.rsplit('/', 1)[-1] for d in bag.dags.values()}),\n"
        "                  'dags': len(bag.dags), 'modules_failed': failed}))\n"
    )
    out = subprocess.run([str(python), "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}, result["errors"]
    assert result["files"] == dag_files and result["dags"] >= len(dag_files)
    # every module of the package a task may import (operators, connectors, storage, the plugin) imports too
    assert result["modules_failed"] == {}, result["modules_failed"]
