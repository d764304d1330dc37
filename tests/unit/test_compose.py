"""docker-compose.yaml proven without a Docker engine (none runs here): every Airflow service runs the image
built from deploy/docker/Dockerfile; every import of dags/ and plugins/ is satisfied by the requirement set
that Dockerfile installs (resolved through the installed packages' metadata); every file compose or the
Dockerfile references exists; no secret is written in the file (each is a required ${VAR} that
`make compose-env` generates); host ports bind 127.0.0.1; it stays consistent with the local stack."""

from __future__ import annotations

import ast
import base64
import importlib.metadata as md
import re
import stat
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer")
LONG_RUNNING = [s for s in AIRFLOW_SERVICES if s != "airflow-init"]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


# ------------------------------------------------------------------ the image every Airflow service runs


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_every_airflow_service_runs_the_project_image(name):
    svc = services()[name]
    assert svc["build"] == {"context": ".", "dockerfile": "deploy/docker/Dockerfile", "target": "airflow"}, name
    assert svc["image"] == "wildfire-airflow:0.1.0"
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in svc.get("environment", {})   # nothing installed at start
    if name == "airflow-init":
        assert svc["user"] == "0:0"          # for the chown of the volumes only
        script = " ".join(svc["command"])
        assert 'chown -R "${AIRFLOW_UID:-50000}:0" /opt/airflow/logs /opt/airflow/.local' in script
        for step in ("airflow db migrate", "python -m wildfire.topics", "python -m wildfire.storage.migrate upgrade"):
            assert step in script
    else:
        assert svc["user"] == "${AIRFLOW_UID:-50000}:0"
        assert svc["restart"] == "unless-stopped"
        assert svc["healthcheck"]["test"] and svc["healthcheck"]["retries"] >= 3
        assert svc["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}


def test_official_healthchecks():
    s = services()
    assert "http://localhost:8080/api/v2/version" in s["airflow-apiserver"]["healthcheck"]["test"]
    assert "http://localhost:8974/health" in s["airflow-scheduler"]["healthcheck"]["test"]
    assert s["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    assert "DagProcessorJob" in " ".join(s["airflow-dag-processor"]["healthcheck"]["test"])
    assert "TriggererJob" in " ".join(s["airflow-triggerer"]["healthcheck"]["test"])
    for name, svc in s.items():
        if name != "airflow-init" and name not in ("prometheus", "grafana"):
            assert "healthcheck" in svc, name
        if name != "airflow-init":
            assert svc.get("restart") == "unless-stopped", name


def test_host_ports_bind_loopback_only():
    seen = 0
    for name, svc in services().items():
        for port in svc.get("ports", []):
            seen += 1
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert seen >= 6


def test_scale_out_processes_serve_metrics_inside_the_compose_network():
    s = services()
    for name, port in (("stream-worker", 9108), ("storage-consumer", 9109), ("storage-critical", 9109)):
        cmd = s[name]["command"]
        assert cmd[cmd.index("--metrics-host") + 1] == "0.0.0.0", name
        assert "ports" not in s[name], name
        assert str(port) in " ".join(s[name]["healthcheck"]["test"])
        assert "--migrate" not in cmd
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"stream-worker:9108", "storage-consumer:9109", "storage-critical:9109"} <= targets


def test_scale_out_runs_the_critical_lane_as_its_own_process():
    s = services()
    bulk, lane = s["storage-consumer"]["command"], s["storage-critical"]["command"]
    assert bulk[bulk.index("--role") + 1] == "bulk" and lane[lane.index("--role") + 1] == "critical"
    assert s["storage-critical"]["profiles"] == s["storage-consumer"]["profiles"] == ["scale-out"]
    assert s["storage-critical"]["image"] == s["storage-consumer"]["image"]


# ------------------------------------------------------------------ secrets


_CREDENTIAL = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|_KEY$|TOKEN", re.I)
_REQUIRED = re.compile(r"^\$\{[A-Z_]+:\?[^}]*\}$")
_OPTIONAL = re.compile(r"^\$\{[A-Z_]+:-\}$")
_OPTIONAL_USER_KEYS = ("WILDFIRE_FIRMS_MAP_KEY", "WILDFIRE_PURPLEAIR_KEY", "WILDFIRE_CDS_KEY")


def _env_items():
    for name, svc in services().items():
        env = svc.get("environment") or {}
        for key, value in (env.items() if isinstance(env, dict) else []):
            yield name, key, "" if value is None else str(value)


def test_no_secret_literal_in_the_compose_file():
    checked = 0
    for svc, key, value in _env_items():
        # No Connection is defined here (they are seeded into the metastore, editable in the UI).
        assert not key.startswith("AIRFLOW_CONN_"), f"{svc}.{key}: an AIRFLOW_CONN_* would win over the UI"
        for password in _CREDENTIAL.findall(value):
            checked += 1
            assert _REQUIRED.match(password), f"{svc}.{key}: password in a URL is a literal"
        if key in _OPTIONAL_USER_KEYS:
            # A user's own upstream key: from .env when set, else empty (the demo needs none).
            checked += 1
            assert _OPTIONAL.match(value), f"{svc}.{key} = a literal, not ${{VAR:-}} from .env"
        elif _SECRET_NAME.search(key):
            checked += 1
            assert _REQUIRED.match(value), f"{svc}.{key} = a literal, not a required ${{VAR}} from .env"
    assert checked >= 8
    text = (ROOT / "docker-compose.yaml").read_text()
    for weak in ("change-me", "POSTGRES_PASSWORD: postgres", "GRAFANA_ADMIN_PASSWORD:-admin"):
        assert weak not in text, weak
    for path in ("deploy/docker/postgres-init.sh",):
        assert not re.search(r"PASSWORD\s+'[^']+'", (ROOT / path).read_text()), path


def test_compose_env_generates_every_required_variable(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compose_env", ROOT / "deploy/docker/compose_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    env = tmp_path / ".env"
    assert mod.main(["--path", str(env), "--uid", "1234"]) == 0
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env.read_text().splitlines() if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{([A-Z_]+):\?", (ROOT / "docker-compose.yaml").read_text()))
    assert required and required <= {k for k, v in values.items() if v}, required - set(values)
    assert values["AIRFLOW_UID"] == "1234"
    assert len(base64.urlsafe_b64decode(values["AIRFLOW_FERNET_KEY"])) == 32
    from cryptography.fernet import Fernet

    assert Fernet(values["AIRFLOW_FERNET_KEY"].encode()).decrypt(
        Fernet(values["AIRFLOW_FERNET_KEY"].encode()).encrypt(b"x")) == b"x"
    secrets = [values[k] for k in mod.SECRETS]
    assert len(set(secrets)) == len(secrets) and all(len(s) >= 32 for s in secrets)
    # Kept on a second run: new secrets would lock the stack out of what the first start created.
    before = env.read_text()
    assert mod.main(["--path", str(env)]) == 0 and env.read_text() == before
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# ------------------------------------------------------------------ files referenced


def _dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    text = (DOCKERFILE.read_text()).replace("\\\n", " ")
    for line in text.splitlines():
        m = re.match(r"FROM \S+ AS (\S+)", line)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current and line.strip() and not line.startswith("#"):
            stages[current].append(line.strip())
    return stages


def test_every_referenced_file_exists():
    for name, svc in services().items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
            assert build["target"] in _dockerfile_stages(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src}"
    for stage, lines in _dockerfile_stages().items():
        for line in lines:
            if line.startswith("COPY") and "--from=" not in line:
                for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                    assert (ROOT / src).exists(), f"{stage}: COPY {src}"
    script = ROOT / "deploy/docker/postgres-init.sh"
    assert script.stat().st_mode & stat.S_IXUSR


# ------------------------------------------------------------------ imports vs the image's requirement set


def _installed_requirements(stage: str) -> list[Requirement]:
    """The requirements ``pip install -r`` installs in a Dockerfile stage, with its grep filter applied."""
    reqs: list[Requirement] = []
    lines = _dockerfile_stages()[stage]
    copied = [w for ln in lines if ln.startswith("COPY") and "--from=" not in ln
              for w in ln.split()[1:-1] if not w.startswith("--")]
    for line in lines:
        if "pip install" not in line:
            continue
        drop = re.findall(r"grep -v '\^([^']+)'", line)
        # A file written by the same RUN (`grep -v ... requirements.txt > /tmp/x.txt`) stands for its input.
        derived = {out: inp for inp, out in re.findall(r"(\S+\.txt) > (\S+\.txt)", line)}
        for ref in re.findall(r"-r (\S+)", line):
            base = Path(derived.get(ref, ref)).name
            (source,) = [ROOT / c for c in copied if Path(c).name == base]
            for raw in source.read_text().splitlines():
                raw = raw.split("#", 1)[0].strip()
                if raw and not any(raw.startswith(d) for d in drop):
                    reqs.append(Requirement(raw))
    assert reqs, f"stage {stage} installs no requirement file"
    return reqs


def _closure(roots: list[Requirement]) -> set[str]:
    """Distribution names pip would install for ``roots``, resolved through the installed metadata."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    base_env = default_environment()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker and not any(sub.marker.evaluate({**base_env, "extra": e}) for e in (extras or {""})):
                continue
            todo.append((sub, frozenset(sub.extras)))
    return {s for s in seen if "[" not in s}


def _imports(paths: list[Path]) -> dict[str, str]:
    """Top-level module -> first file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return found


_LOCAL = {"wildfire", "tests"}
# Built from native/firms_fast in the Dockerfile's firms-build stage and installed from its wheel.
_FROM_BUILD_STAGE = {"wildfire_firms_fast"}


def _unsatisfied(files: list[Path], provided: set[str]) -> dict[str, str]:
    dists = md.packages_distributions()
    missing = {}
    for module, where in _imports(files).items():
        if module in sys.stdlib_module_names or module in _LOCAL or module in _FROM_BUILD_STAGE:
            continue
        owners = {canonicalize_name(d) for d in dists.get(module, [])}
        if not owners & provided:
            missing[module] = where
    return missing


def test_airflow_image_satisfies_every_import_of_dags_and_plugins():
    provided = _closure([*_installed_requirements("airflow"), Requirement("apache-airflow==3.3.2")])
    files = [*ROOT.glob("dags/**/*.py"), *ROOT.glob("plugins/**/*.py")]
    assert len(files) > 20
    missing = _unsatisfied(files, provided)
    assert not missing, f"imported but not installed by the airflow stage: {missing}"
    from_image = re.search(r"FROM apache/airflow:([\d.]+)-python", DOCKERFILE.read_text()).group(1)
    assert f"apache-airflow=={from_image}" in (ROOT / "constraints.txt").read_text().split()


def test_worker_image_satisfies_every_import_of_the_processes_it_runs():
    reqs = _installed_requirements("worker")
    assert not [r for r in reqs if canonicalize_name(r.name).startswith("apache-airflow")]
    provided = _closure(reqs)
    assert "apache-airflow" not in provided, "the worker image would pull in Airflow"
    files = [p for p in ROOT.glob("plugins/wildfire/**/*.py") if "airflow" not in p.relative_to(ROOT).parts[2:]]
    missing = _unsatisfied(files, provided)
    # Modules of plugins/wildfire that may import Airflow lazily, only when run inside it.
    assert not missing, f"imported by the worker's code but not installed by the worker stage: {missing}"


def test_import_check_is_not_vacuous():
    # A requirement set without polars must be reported as missing polars.
    provided = _closure([Requirement("httpx==0.28.1")])
    assert "polars" in _unsatisfied([ROOT / "plugins/wildfire/connectors/firms.py"], provided)


# ------------------------------------------------------------------ consistency with the local stack


def test_services_and_ports_match_local_stack():
    c = compose()
    for name in ("postgres", "kafka", "mosquitto", *AIRFLOW_SERVICES):
        assert name in c["services"], name
    ports = {p for s in c["services"].values() for p in s.get("ports", [])}
    assert {"127.0.0.1:5432:5432", "127.0.0.1:9092:9092", "127.0.0.1:1883:1883", "127.0.0.1:8080:8080"} <= ports
    assert "3.3" in DOCKERFILE.read_text().split("AS airflow")[0].rsplit("FROM", 1)[1]


def test_connections_are_seeded_into_the_metastore_like_the_local_stack():
    # An AIRFLOW_CONN_* variable would win over the Connection a user edits in the UI.
    env = compose()["services"]["airflow-scheduler"]["environment"]
    assert not [k for k in env if k.startswith("AIRFLOW_CONN_")]
    init = " ".join(compose()["services"]["airflow-init"]["command"])
    assert "python -m wildfire.airflow.connections write" in init and "airflow connections import" in init
    assert "WILDFIRE__STORAGE__DATABASE_URL" in env and "WILDFIRE__KAFKA__BOOTSTRAP_SERVERS" in env
    assert not re.findall(r"export AIRFLOW_CONN_", (ROOT / "scripts/airflow_env.sh").read_text())


def test_mounts_project_folders_and_creates_topics_from_config():
    svc = compose()["services"]["airflow-init"]
    mounts = {v.split(":")[1] for v in svc["volumes"] if ":" in v}
    assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/include", "/opt/airflow/config"} <= mounts
    assert "python -m wildfire.topics" in " ".join(svc["command"])


def test_monitoring_services_mount_the_deploy_configs():
    c = compose()
    prom, graf = c["services"]["prometheus"], c["services"]["grafana"]
    assert "127.0.0.1:9090:9090" in prom["ports"] and "127.0.0.1:3000:3000" in graf["ports"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    for path in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/alerts.yml",
                 "deploy/grafana/dashboards/wildfire.json"):
        assert (ROOT / path).is_file(), path
    assert any(v.startswith("./deploy/grafana/provisioning:/etc/grafana/provisioning") for v in graf["volumes"])
    # Pinned images: a moving `latest` would change dashboards and rule syntax under users' feet.
    for svc in (prom, graf):
        assert ":" in svc["image"] and not svc["image"].endswith(":latest")


def test_scale_out_services_are_opt_in_and_keep_their_own_spool():
    c = compose()
    worker, consumer = c["services"]["stream-worker"], c["services"]["storage-consumer"]
    # Opt-in: by default the stream worker runs inside Airflow; two workers would publish twice.
    assert worker["profiles"] == ["scale-out"] and consumer["profiles"] == ["scale-out"]
    assert "wildfire.worker" in worker["command"] and "--metrics-port" in consumer["command"]
    worker_mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    airflow_mounts = {v.split(":")[1]: v.split(":")[0] for v in c["services"]["airflow-scheduler"]["volumes"]}
    assert worker_mounts["/opt/wildfire/.local"] not in airflow_mounts.values()
    assert worker["environment"]["WILDFIRE__KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
