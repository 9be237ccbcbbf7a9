"""compose/ and the Dockerfile: the compose file validates with docker-compose, its commands are dicomflow's,
its configuration files are valid dicomflow configurations, and the graceful-stop budget holds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from nats.aio.client import DEFAULT_DRAIN_TIMEOUT

from dicomflow.cli import build_parser
from shared.config import load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose"
CONFIGS = ("dicomflow.yaml", "dicomflow-ceph.yaml")


def compose_config(config_file: str = "dicomflow.yaml", *extra: str) -> dict:
    exe = shutil.which("docker-compose")
    if not exe:
        pytest.fail("docker-compose is missing: `make test` installs it (Debian package docker-compose)")
    env = {**os.environ, "DICOMFLOW_COMPOSE_CONFIG": config_file}
    out = subprocess.run([exe, "-f", str(COMPOSE / "docker-compose.yml"), *extra, "config"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode == 0, f"docker-compose config failed: {out.stderr}"
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "m" else 1)


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (docker-compose prints the short or the long form)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        out[target] = source
    return out


def dicomflow_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == "dicomflow:latest" and "entrypoint" not in s}


def test_layout_three_nats_two_routers_two_stores(compose):
    services = compose["services"]
    nats = [n for n, s in services.items() if s.get("entrypoint", [None])[0] == "nats-server"]
    assert sorted(nats) == ["nats-1", "nats-2", "nats-3"]
    cmds = [s["command"][0] for s in dicomflow_services(compose).values()]
    assert sorted(cmds) == ["autoscaler", "ingest", "releaser", "router", "router", "store", "store", "web"]
    assert {"prometheus", "grafana", "postgres"} <= set(services)
    assert services["ingest"]["ports"][0]["target"] == 11112
    assert services["web"]["ports"][0]["target"] == load_config(COMPOSE / "dicomflow.yaml", environ={}).web.port
    # The filesystem store on one volume shared by every dicomflow container; the catalogue in PostgreSQL,
    # which every one of them waits for.
    for name, s in dicomflow_services(compose).items():
        assert mounts(s)["/var/lib/dicomflow"] == "data", name
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert mounts(services["postgres"])["/var/lib/postgresql/data"] == "postgres"


def test_ceph_is_an_optional_profile():
    plain = compose_config()
    with_ceph = compose_config("dicomflow-ceph.yaml", "--profile", "ceph")
    assert with_ceph["services"]["ceph"]["profiles"] == ["ceph"]
    for s in dicomflow_services(with_ceph).values():
        assert mounts(s)["/etc/dicomflow/dicomflow.yaml"].endswith("compose/dicomflow-ceph.yaml")
        assert mounts(s)["/etc/ceph"] == "ceph-etc"
    assert plain["services"]["ceph"]["profiles"] == ["ceph"]  # not started without --profile ceph
    out = subprocess.run(["sh", "-n", str(COMPOSE / "ceph" / "bootstrap.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_commands_are_dicomflow_subcommands(compose):
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "dicomflow"]' in dockerfile
    for name, s in dicomflow_services(compose).items():
        assert s["command"][0] in subcommands, f"{name}: {s['command']}"
        parser.parse_args(s["command"])  # exits (fails the test) on an unknown option


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_files_are_valid_and_match_the_deployment(compose, config_file):
    cfg = load_config(COMPOSE / config_file, environ={})
    nats = [n for n, s in compose["services"].items() if s.get("entrypoint", [None])[0] == "nats-server"]
    assert sorted(u.split("//")[1].split(":")[0] for u in cfg.nats_servers()) == sorted(nats)
    assert cfg.stream.replicas == 3 and cfg.telemetry.metrics_host == "0.0.0.0" and cfg.ingest.host == "0.0.0.0"
    # one catalogue for all, on the postgres service with its credentials; no anonymous HTTP access
    pg = compose["services"]["postgres"]["environment"]
    assert cfg.catalogue.url == (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                                 f"{pg['POSTGRES_DB']}")
    assert cfg.access.anonymous_tenant is None and cfg.web.host == "0.0.0.0"
    routes = re.findall(r"nats-route://([\w-]+):6222", (COMPOSE / "nats" / "nats.conf").read_text())
    assert sorted(routes) == sorted(nats)
    # Prometheus scrapes every dicomflow container on the configured metrics port.
    prom = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    targets = {t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]}
    assert targets == {f"{n}:{cfg.telemetry.metrics_port}" for n in dicomflow_services(compose)}
    for name, s in dicomflow_services(compose).items():
        assert f"127.0.0.1:{cfg.telemetry.metrics_port}/readyz" in " ".join(s["healthcheck"]["test"]), name
        if s["command"][0] in ("store", "router"):
            group = cfg.store.group if s["command"][0] == "store" else cfg.router.group
            assert seconds(s["stop_grace_period"]) > group.ack_wait_s + DEFAULT_DRAIN_TIMEOUT, name
        if s["command"][0] == "ingest":  # its storage commitment reports still due go out, then NATS drains
            assert seconds(s["stop_grace_period"]) > cfg.ingest.stop_drain_s() + 10, name
    if cfg.storage.backends[cfg.storage.staging].kind == "rados":
        bootstrap = (COMPOSE / "ceph" / "bootstrap.sh").read_text()
        for b in cfg.storage.backends.values():
            assert b.pool in bootstrap, f"the ceph profile does not create pool {b.pool}"


def test_dockerfile_copies_the_packages_the_image_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    ignore = (REPO / ".dockerignore").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    for pkg in re.findall(r'"(\w+)\*"', pyproject.split("[tool.setuptools.packages.find]")[1].split("\n\n")[0]):
        assert f"COPY {pkg} ./{pkg}" in dockerfile and f"!{pkg}/" in ignore, pkg
    grafana = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "dashboards" / "dicomflow.yaml").read_text())
    assert grafana["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (COMPOSE / "grafana" / "dashboards" / "dicomflow.json").exists()


def test_image_installs_dcmtk_for_the_routers_dicom_targets():
    from services.router.targets.dicom import PROGRAM

    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [ln for ln in dockerfile.splitlines() if ln.startswith("RUN ") and "apt-get install" in ln]
    packages = {w for ln in installs for w in ln.split("apt-get install", 1)[1].split("&&")[0].split()
                if not w.startswith("-")}
    assert "dcmtk" in packages, f"the router sends C-STORE with dcmtk's {PROGRAM}; the image installs {packages}"
