"""deploy/: Kubernetes manifests validated offline against the Kubernetes schemas, and held to the
requirements no schema knows (probes, rollout strategy, slide 35 resources, HPA bounds, one source of
truth for config and topics, shards covering each source once). No cluster runs here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv

from wildfire.config import build_config, env_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
HELM_VALUES = ROOT / "deploy" / "helm" / "airflow-values.yaml"
# A recent release and the newest one the bundled schemas cover.
K8S_VERSIONS = ("1.33.0", "1.35.0")
SLIDE_35_RESOURCES = {"requests": {"cpu": "500m", "memory": "500Mi"}, "limits": {"cpu": "1000m", "memory": "1Gi"}}


def _render():
    spec = importlib.util.spec_from_file_location("deploy_render", ROOT / "deploy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def workers() -> list[dict]:
    """Every stream-worker workload: a Deployment per HTTP-polling shard, a StatefulSet for the IoT shard."""
    return [d for d in [*of_kind("Deployment"), *of_kind("StatefulSet")]
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "stream-worker"]


def consumer() -> dict:
    (dep,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "wildfire-storage-consumer"]
    return dep


def critical_lane() -> dict:
    (dep,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "wildfire-storage-critical"]
    return dep


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def container_env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# ------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,doc", manifests(), ids=[n for n, _ in manifests()])
def test_manifest_valid_against_kubernetes_schema(name, doc, version):
    # strict: unknown fields (typos such as `readinesProbe`) are errors, not silently ignored.
    kv.validate(doc, version, strict=True)


def test_validator_rejects_a_broken_manifest():
    # Guards the test above against passing vacuously (e.g. schemas missing, validator a no-op).
    bad = yaml.safe_load((K8S / "40-storage-consumer.yaml").read_text().split("\n---\n")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = {"nested": 1}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = yaml.safe_load((K8S / "40-storage-consumer.yaml").read_text().split("\n---\n")[0])
    bad["spec"]["strategy"]["rollingUpdat"] = bad["spec"]["strategy"].pop("rollingUpdate")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_every_object_is_namespaced_to_wildfire():
    for name, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "wildfire", name


def test_generated_files_are_current():
    render = _render()
    assert render.main(["--check"]) == 0, "run: .venv/bin/python deploy/render.py"


# ------------------------------------------------------------------ config: one source of truth


def test_configmap_embeds_the_shipped_config_verbatim():
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "wildfire-stream-config"]
    assert cm["data"]["stream_config.yaml"] == (ROOT / "config/stream_config.yaml").read_text()


def test_pods_mount_the_config_directory_and_point_at_it():
    (env_cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "wildfire-env"]
    assert env_cm["data"]["WILDFIRE_CONFIG"] == "/opt/wildfire/config/stream_config.yaml"
    assert env_cm["data"]["PYTHONPATH"] == "/opt/wildfire/plugins"
    for dep in [*workers(), consumer(), *of_kind("Job")]:
        spec = dep["spec"]["template"]["spec"]
        c = container(dep)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert mounts["stream-config"]["mountPath"] == "/opt/wildfire/config"
        # Not subPath: subPath mounts never see ConfigMap updates, and the worker reloads its config.
        assert "subPath" not in mounts["stream-config"]
        assert vols["stream-config"]["configMap"]["name"] == "wildfire-stream-config"
        assert {"configMapRef": {"name": "wildfire-env"}} in c["envFrom"]
        assert "/opt/wildfire/config/stream_config.yaml" in c["args"] or \
            "/opt/wildfire/config/stream_config.yaml" in " ".join(c["args"])


def test_env_overrides_in_manifests_are_valid_config():
    # Every WILDFIRE__ variable a pod gets must be accepted by the config loader (no typo'd key).
    (env_cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "wildfire-env"]
    for dep in [*workers(), consumer()]:
        env = {k: v for k, v in env_cm["data"].items() if k.startswith("WILDFIRE__")}
        env |= {k: (v if v is not None else "postgresql://u:p@db:5432/wildfire")
                for k, v in container_env(container(dep)).items() if k.startswith("WILDFIRE__")}
        load_config(ROOT / "config/stream_config.yaml", environ=env)


def test_topics_come_from_the_config_through_the_bootstrap_job():
    (job,) = of_kind("Job")
    script = " ".join(container(job)["args"])
    assert "python -m wildfire.topics --config /opt/wildfire/config/stream_config.yaml" in script
    # --check makes the Job fail when the broker disagrees with the configured partitions.
    assert "python -m wildfire.topics --config /opt/wildfire/config/stream_config.yaml --check" in script
    assert "python -m wildfire.storage.migrate upgrade" in script
    # Partitions are written nowhere else under deploy/k8s, so they cannot drift from the config.
    for p in K8S.glob("*.yaml"):
        if p.name != "10-stream-config.yaml":
            assert not re.search(r"\bpartitions\s*:", p.read_text()), p.name


# ------------------------------------------------------------------ stream workers


def test_worker_shards_cover_every_source_exactly_once():
    render = _render()
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    run_by = {}
    for dep in workers():
        env = {k: v for k, v in container_env(container(dep)).items() if v is not None}
        shard_cfg = build_config(yaml.safe_load((ROOT / "config/stream_config.yaml").read_text()), env_overrides(env))
        enabled = {n for n, s in shard_cfg.sources.items() if s.enabled}
        assert enabled == set(dep["metadata"]["annotations"]["wildfire.io/sources"].split(",")), dep["metadata"]["name"]
        for name in enabled:
            assert name not in run_by, f"{name} in two shards: {run_by[name]} and {dep['metadata']['name']}"
            run_by[name] = dep["metadata"]["name"]
    assert set(run_by) | set(render.AIRFLOW_ONLY) == set(cfg.sources)
    assert not set(run_by) & set(render.AIRFLOW_ONLY)


def test_worker_is_one_pod_per_spool_with_stop_then_start_rollout():
    pvcs = {d["metadata"]["name"]: d for d in of_kind("PersistentVolumeClaim")}
    claims = []
    for dep in workers():
        spec = dep["spec"]
        c = container(dep)
        assert c["command"] == ["python", "-m", "wildfire.worker"]
        assert c["args"][c["args"].index("--mode") + 1] == "continuous_streaming"
        (state,) = [m for m in c["volumeMounts"] if m["name"] == "state"]
        assert state["mountPath"] == "/opt/wildfire/.local"   # spool.path .local/spool/spool.db under it
        if dep["kind"] == "StatefulSet":
            # One claim per pod from the template (never a shared claim in the pod spec); kept on scale-down.
            assert not [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "state"]
            (tpl,) = [t for t in spec["volumeClaimTemplates"] if t["metadata"]["name"] == "state"]
            assert tpl["spec"]["accessModes"] == ["ReadWriteOncePod"]
            assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
            assert spec["updateStrategy"]["type"] == "RollingUpdate"
            claims.append(f"template:{dep['metadata']['name']}")
            continue
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
        (vol,) = [v for v in spec["template"]["spec"]["volumes"] if v["name"] == "state"]
        claim = vol["persistentVolumeClaim"]["claimName"]
        assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteOncePod"]
        claims.append(claim)
    assert len(claims) == len(set(claims)) == 4, "each shard needs its own spool volume"
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    assert cfg.spool.path.startswith(".local/"), "the spool must live on the mounted state volume"


def _iot_workload() -> dict:
    (iot,) = [d for d in workers() if d["metadata"]["labels"]["wildfire.io/shard"] == "iot"]
    return iot


def _shard_config(dep: dict):
    env = {k: v for k, v in container_env(container(dep)).items() if v is not None}
    return build_config(yaml.safe_load((ROOT / "config/stream_config.yaml").read_text()), env_overrides(env))


def test_iot_shard_runs_n_members_of_one_shared_subscription():
    from wildfire.connectors.mqtt_shared import ShareOptions

    render = _render()
    iot = _iot_workload()
    assert iot["kind"] == "StatefulSet"
    assert iot["spec"]["replicas"] == render.SHARD_REPLICAS["iot"] >= 2
    # The shard's own env turns the plain subscription into the shared one; the file's options survive the merge.
    src = _shard_config(iot).sources["iot_mqtt"]
    assert src.options["topic_filter"] == "wildfire/sensors/#" and src.options["qos"] == 1
    assert ShareOptions.from_options(src.options, "iot_mqtt").subscription(src.options["topic_filter"]) == \
        "$share/iot/wildfire/sensors/#"
    # A distinct, restart-stable MQTT client id per pod: its own pod name (StatefulSet: wildfire-worker-iot-<n>).
    (cid,) = [e for e in container(iot)["env"] if e["name"] == "WILDFIRE_MQTT_CLIENT_ID"]
    assert cid == {"name": "WILDFIRE_MQTT_CLIENT_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    # The local stack and every other shard keep the plain subscription and the worker's own client id.
    assert not load_config(ROOT / "config/stream_config.yaml", environ={}).sources["iot_mqtt"].options.get(
        "shared_group")
    for dep in workers():
        if dep["metadata"]["name"] != iot["metadata"]["name"]:
            assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] == 1, dep["metadata"]["name"]
            assert "WILDFIRE_MQTT_CLIENT_ID" not in container_env(container(dep))
            assert not any("SHARED_GROUP" in k for k in container_env(container(dep)))


def test_render_relaxes_one_pod_per_shard_only_for_shared_subscriptions(monkeypatch):
    render = _render()
    sources = render.configured_sources()
    assert render.shard_problems(render.WORKER_SHARDS, {"iot": 3}, sources, render.AIRFLOW_ONLY) == []
    monkeypatch.setattr(render, "SHARD_REPLICAS", {"iot": 3})
    docs = [d for d in yaml.safe_load_all(render.workers_text()) if d]
    (iot,) = [d for d in docs if d["metadata"]["name"] == "wildfire-worker-iot"]
    assert (iot["kind"], iot["spec"]["replicas"]) == ("StatefulSet", 3)
    kv.validate(iot, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("replicas,shards,expect", [
    ({"weather": 2}, None, ["'weather' cannot run 2 replicas", "nws_alerts (nws_alerts)",
                            "nws_observations (nws_observations)", "poll over HTTP"]),
    # A shard mixing MQTT with a poller: the poller alone is named, and the shard is refused.
    ({"mixed": 2}, {"mixed": ("iot_mqtt", "purpleair")}, ["'mixed' cannot run 2 replicas", "purpleair (purpleair)"]),
    ({"iot": 0}, None, ["SHARD_REPLICAS['iot'] must be a whole number >= 1 (got 0)"]),
    ({"nowhere": 2}, None, ["names shard 'nowhere', which is not in WORKER_SHARDS"]),
])
def test_render_refuses_replicas_of_an_http_polling_shard(monkeypatch, replicas, shards, expect):
    render = _render()
    if shards is not None:
        rest = {k: v for k, v in render.WORKER_SHARDS.items() if not set(v) & {s for g in shards.values() for s in g}}
        monkeypatch.setattr(render, "WORKER_SHARDS", {**rest, **shards})
    monkeypatch.setattr(render, "SHARD_REPLICAS", replicas)
    with pytest.raises(SystemExit) as exc:
        render.workers_text()
    msg = str(exc.value)
    for part in expect:
        assert part in msg, (part, msg)
    if "mixed" in replicas:
        assert "iot_mqtt (" not in msg


def test_a_source_in_two_shards_is_still_refused(monkeypatch):
    # Shared consumption is N pods of ONE shard; the same source in two shards would be two differently
    # configured members (and, for a poller, two fetchers): refused as before.
    render = _render()
    monkeypatch.setattr(render, "WORKER_SHARDS", {**render.WORKER_SHARDS, "iot-b": ("iot_mqtt",)})
    with pytest.raises(SystemExit, match=r"in two shards \['iot_mqtt'\]"):
        render.workers_text()


def test_no_autoscaler_targets_a_worker():
    worker_names = {d["metadata"]["name"] for d in workers()}
    for hpa in of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] not in worker_names


def test_worker_grace_period_covers_shutdown_flush():
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    for dep in workers():
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > cfg.worker.shutdown_flush_s


# ------------------------------------------------------------------ probes, resources, strategy


def _probe_port(dep: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (p,) = [p for p in container(dep)["ports"] if p["name"] == port]
    return p["containerPort"]


@pytest.mark.parametrize("which", ["worker", "consumer", "critical"])
def test_probes_use_the_process_own_health_endpoint(which):
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    deps = {"worker": workers, "consumer": lambda: [consumer()], "critical": lambda: [critical_lane()]}[which]()
    port = cfg.worker.metrics_port if which == "worker" else 9109
    for dep in deps:
        c = container(dep)
        for kind in ("livenessProbe", "readinessProbe"):
            assert c[kind]["httpGet"]["path"] == "/health", (dep["metadata"]["name"], kind)
            assert _probe_port(dep, c[kind]) == port
        assert c["startupProbe"]["httpGet"]["path"] == "/ready"
        assert _probe_port(dep, c["startupProbe"]) == port
        # slide 35: readiness every 5 s, liveness every 10 s
        assert c["readinessProbe"]["periodSeconds"] == 5
        assert c["livenessProbe"]["periodSeconds"] == 10
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/scrape"] == "true"
    if which != "worker":
        assert "--metrics-port" in container(deps[0])["args"]
        assert container(deps[0])["args"][container(deps[0])["args"].index("--metrics-port") + 1] == "9109"


def test_resources_are_slide_35():
    for dep in [*workers(), consumer()]:
        assert container(dep)["resources"] == SLIDE_35_RESOURCES, dep["metadata"]["name"]


def test_every_container_has_requests_and_limits():
    for name, doc in manifests():
        if doc["kind"] in ("Deployment", "Job", "StatefulSet"):
            res = container(doc)["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], name


def test_consumer_rolls_one_at_a_time():
    strategy = consumer()["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 1
    # The HPA owns the replica count; a fixed `replicas` would be reset on every `kubectl apply`.
    assert "replicas" not in consumer()["spec"]


def test_a_single_pod_mqtt_shard_has_a_stable_mqtt_client_id(monkeypatch):
    # A shard that also polls over HTTP runs one Deployment pod, whose name (the worker's default id) is new on
    # every restart: the shard's name is its MQTT client id, so a restarted worker resumes its session.
    render = _render()
    shards = {"mixed": ("iot_mqtt", "purpleair")}
    rest = {k: v for k, v in render.WORKER_SHARDS.items() if not set(v) & set(shards["mixed"])}
    monkeypatch.setattr(render, "WORKER_SHARDS", {**rest, **shards})
    monkeypatch.setattr(render, "SHARD_REPLICAS", {})
    docs = [d for d in yaml.safe_load_all(render.workers_text()) if d]
    (mixed,) = [d for d in docs if d["metadata"]["name"] == "wildfire-worker-mixed"]
    assert (mixed["kind"], mixed["spec"]["replicas"]) == ("Deployment", 1)  # two pods with one id would collide
    env = container_env(container(mixed))
    assert env["WILDFIRE_MQTT_CLIENT_ID"] == "wildfire-worker-mixed"
    assert "WILDFIRE__SOURCES__IOT_MQTT__OPTIONS__SHARED_GROUP" not in env
    for dep in docs:
        if dep.get("kind") in ("Deployment", "StatefulSet") and dep["metadata"]["name"] not in (
                "wildfire-worker-mixed",):
            assert "WILDFIRE_MQTT_CLIENT_ID" not in container_env(container(dep))


def test_critical_lane_runs_in_its_own_pods_beside_the_bulk_consumers():
    from wildfire.storage.consumer import split_topics

    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    bulk_args, lane_args = container(consumer())["args"], container(critical_lane())["args"]
    assert bulk_args[bulk_args.index("--role") + 1] == "bulk"
    assert lane_args[lane_args.index("--role") + 1] == "critical"
    # --role bulk leaves the lane's topics to the lane: the shipped config must have lane topics, or they
    # would be consumed by nobody.
    bulk, lane = split_topics(cfg, "bulk")[0], split_topics(cfg, "critical")[1]
    assert lane and not set(lane) & set(bulk)
    # No autoscaler resizes the lane; more pods than lane partitions would sit idle.
    assert all(h["spec"]["scaleTargetRef"]["name"] != "wildfire-storage-critical"
               for h in of_kind("HorizontalPodAutoscaler"))
    assert 1 <= critical_lane()["spec"]["replicas"] <= min(cfg.topics[t].partitions for t in lane)
    (pdb,) = [p for p in of_kind("PodDisruptionBudget") if p["metadata"]["name"] == "wildfire-storage-critical"]
    assert pdb["spec"]["selector"]["matchLabels"] == critical_lane()["spec"]["selector"]["matchLabels"]


def test_consumer_hpa_is_slide_35_and_bounded_by_partitions():
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wildfire-storage-consumer"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["averageUtilization"] == 70
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 180
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    consumed = [t for name, t in cfg.topics.items() if name != cfg.kafka.dlq_topic]
    # Consumers beyond the largest partition count would get no partition at all.
    assert spec["maxReplicas"] <= max(t.partitions for t in consumed)
    (pdb,) = [p for p in of_kind("PodDisruptionBudget") if p["metadata"]["name"] == "wildfire-storage-consumer"]
    assert pdb["spec"]["minAvailable"] < spec["minReplicas"]


def test_secrets_are_references_not_values():
    for name, doc in manifests():
        if doc["kind"] in ("Deployment", "Job"):
            for e in container(doc).get("env", []):
                if re.search(r"URL|KEY|PASSWORD|TOKEN", e["name"]) and e["name"] != "WILDFIRE__KAFKA__BOOTSTRAP_SERVERS":
                    assert "valueFrom" in e and "secretKeyRef" in e["valueFrom"], (name, e["name"])


# ------------------------------------------------------------------ Airflow Helm values, image


# Documented top-level keys of the official chart (parameters reference, chart 1.2x). An allow-list,
# not the chart's values.schema.json, which cannot be fetched here: it catches typos, not wrong nesting.
HELM_TOP_LEVEL_KEYS = {
    "airflowVersion", "images", "executor", "dags", "env", "secret", "extraEnv", "extraEnvFrom", "extraSecrets",
    "extraConfigMaps", "config", "postgresql", "data", "redis", "scheduler", "dagProcessor", "triggerer",
    "apiServer", "workers", "statsd", "pgbouncer", "logs", "defaultAirflowRepository", "defaultAirflowTag",
    "fernetKeySecretName", "migrateDatabaseJob", "createUserJob", "ingress", "airflowLocalSettings",
}


def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def test_helm_values_use_known_chart_keys():
    unknown = set(helm_values()) - HELM_TOP_LEVEL_KEYS
    assert not unknown, f"not a documented top-level key of the Airflow chart: {sorted(unknown)}"


def test_helm_values_pass_every_connection_from_a_secret():
    from wildfire.airflow.connections import CONNECTION_IDS

    local = {f"AIRFLOW_CONN_{c.upper()}" for c in CONNECTION_IDS}
    secret_env = {s["envName"] for s in helm_values()["secret"]}
    assert local and local <= secret_env, local - secret_env
    assert "WILDFIRE__STORAGE__DATABASE_URL" in secret_env
    for s in helm_values()["secret"]:
        assert set(s) == {"envName", "secretName", "secretKey"}, s


def test_helm_values_executor_image_and_dags():
    v = helm_values()
    assert v["executor"] in {"KubernetesExecutor", "CeleryExecutor", "LocalExecutor"}
    assert v["airflowVersion"] == "3.3.2"
    assert v["dags"]["gitSync"]["enabled"] is True and v["dags"]["gitSync"]["subPath"] == "dags"
    for component in ("scheduler", "dagProcessor", "triggerer", "apiServer", "workers"):
        res = v[component]["resources"]
        assert res["requests"] and res["limits"], component


def test_dockerfile_matches_the_manifest_paths():
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    assert "FROM python:3.11-slim AS worker" in text
    assert "PYTHONPATH=/opt/wildfire/plugins" in text
    assert "FROM apache/airflow:3.3.2-python3.11 AS airflow" in text
    images = {container(d)["image"] for d in [*workers(), consumer(), *of_kind("Job")]}
    assert images == {"wildfire-ingestion:0.1.0"}
    for dep in [*workers(), consumer(), *of_kind("Job")]:
        uid = dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        assert f"--uid {uid}" in text and f"USER {uid}" in text


# ------------------------------------------------------------------ pods reachable, hardened, isolated


def pod_templates() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"])
            for d in [*workers(), consumer(), critical_lane(), *of_kind("Job")]]


@pytest.mark.parametrize("module", ["wildfire.worker", "wildfire.storage.consumer"])
def test_probe_server_binds_every_interface_in_pods(module):
    # The kubelet probes the pod IP and Prometheus scrapes it: a server on 127.0.0.1 (both processes'
    # default) answers neither, so every probe fails and the pod crash-loops.
    import subprocess
    import sys

    deps = workers() if module == "wildfire.worker" else [consumer()]
    for dep in deps:
        c = container(dep)
        assert c["command"][-1] == module
        args = c["args"]
        assert "--metrics-host" in args, dep["metadata"]["name"]
        assert args[args.index("--metrics-host") + 1] == "0.0.0.0", dep["metadata"]["name"]
    # ... and the flag is the process's own (argparse would accept an unambiguous prefix, reject a typo).
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert re.search(r"--metrics-host\b", out.stdout)


def test_probe_server_on_all_interfaces_answers_metrics_without_a_token():
    # What a pod runs with --metrics-host 0.0.0.0, asked as Prometheus asks: no Authorization header.
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from wildfire.probes import ProbeServer

    registry = CollectorRegistry()
    Counter("wildfire_probe_test", "x", registry=registry).inc()
    server = ProbeServer(registry, lambda: (True, [], []), ready=lambda: True, host="0.0.0.0", port=0).start()
    try:
        assert server.host == "0.0.0.0"
        for path in ("/metrics", "/health", "/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                assert resp.status == 200, path
                if path == "/metrics":
                    assert b"wildfire_probe_test_total 1.0" in resp.read()
    finally:
        server.stop()


def test_prometheus_scrapes_no_route_that_needs_a_login():
    # Airflow's routes (the plugin's /wildfire/*) answer 401 without a Bearer JWT; a scrape job for one
    # must carry credentials, else its target is down for ever.
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        if path.startswith("/wildfire/") or any("8080" in t for sc in job.get("static_configs", [])
                                                 for t in sc["targets"]):
            assert "authorization" in job or "basic_auth" in job, job["job_name"]
    for name, tpl in pod_templates():
        ann = tpl["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            assert ann["prometheus.io/path"] == "/metrics", name   # the ProbeServer's open route


@pytest.mark.parametrize("name", [n for n, _ in pod_templates()])
def test_pods_meet_the_restricted_pod_security_standard(name):
    (tpl,) = [t for n, t in pod_templates() if n == name]
    spec = tpl["spec"]
    # No pod calls the Kubernetes API: a mounted token would only be something to steal.
    assert spec.get("automountServiceAccountToken") is False
    psc = spec["securityContext"]
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert (sc.get("seccompProfile") or psc.get("seccompProfile")) == {"type": "RuntimeDefault"}
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
        assert (sc.get("runAsUser") or psc.get("runAsUser", 0)) != 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
    (ns,) = of_kind("Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_only_the_bootstrap_job_migrates():
    # Replicas starting together would race on Alembic's version table; the Job runs once.
    for dep in of_kind("Deployment"):
        c = container(dep)
        words = " ".join(c.get("command", []) + c.get("args", []))
        assert "migrate" not in words, dep["metadata"]["name"]
    (job,) = of_kind("Job")
    assert "wildfire.storage.migrate upgrade" in " ".join(container(job)["args"])


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        op, key, values = expr["operator"], expr["key"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _allowed(labels: dict, direction: str) -> tuple[bool, set[tuple[str, int]]]:
    """(isolated in this direction, the (protocol, port) pairs any policy lets through) for a pod's labels."""
    isolated, ports = False, set()
    for pol in of_kind("NetworkPolicy"):
        spec = pol["spec"]
        if not _selects(spec["podSelector"], labels) or direction not in spec["policyTypes"]:
            continue
        isolated = True
        for rule in spec.get(direction.lower(), []):
            assert rule.get("ports"), f"{pol['metadata']['name']}: a {direction} rule without ports allows all"
            ports |= {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}
    return isolated, ports


def _port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def test_network_policies_allow_each_pod_only_what_it_needs():
    (env_cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "wildfire-env"]
    kafka = {("TCP", _port_of(h)) for h in env_cm["data"]["WILDFIRE__KAFKA__BOOTSTRAP_SERVERS"].split(",")}
    mqtt = ("TCP", int(env_cm["data"]["WILDFIRE_MQTT_PORT"]))
    (secret,) = of_kind("Secret")
    pg = ("TCP", _port_of(secret["stringData"]["database-url"].split("@", 1)[1].split("/", 1)[0]))
    dns = {("UDP", 53), ("TCP", 53)}
    https = ("TCP", 443)
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    for name, tpl in pod_templates():
        labels = tpl["metadata"]["labels"]
        in_iso, ingress = _allowed(labels, "Ingress")
        out_iso, egress = _allowed(labels, "Egress")
        assert in_iso and out_iso, f"{name} is not isolated by any NetworkPolicy"
        assert dns | kafka | {pg} <= egress, name
        metrics = {("TCP", p["containerPort"]) for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
        assert ingress == metrics, name      # the metrics port and nothing else; none for the Job
        dep = next(d for d in [*workers(), consumer(), critical_lane(), *of_kind("Job")]
                   if d["metadata"]["name"] == name)
        sources = dep["metadata"].get("annotations", {}).get("wildfire.io/sources", "")
        types = {cfg.sources[s].source_type for s in sources.split(",") if s}
        # HTTPS only for shards polling public APIs, MQTT only for the IoT shard; the consumer and the Job
        # reach neither.
        assert (https in egress) == bool(types - {"iot_mqtt"}), name
        assert (mqtt in egress) == ("iot_mqtt" in types), name


def test_network_policy_evaluator_is_not_vacuous():
    # A pod no policy selects must come out as not isolated, else the test above proves nothing.
    assert _allowed({"app.kubernetes.io/name": "something-else"}, "Egress") == (False, set())
    assert _selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}, {"a": "y"}) is False
