"""The Kubernetes actuator against an HTTP server that implements the scale subresource as the API defines it.

Endpoints (apps/v1): GET and PATCH ``/apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale``,
answering an ``autoscaling/v1`` Scale; PATCH accepts ``application/merge-patch+json`` (415 for a content
type the server does not support, 404 with a Status for an unknown workload). Every request is recorded
and the test asserts them exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from prometheus_client import generate_latest

from services.autoscaler.decision import Decision
from services.autoscaler.kubernetes_scale import KubernetesScale
from services.autoscaler.service import Autoscaler, DryRun
from shared.bus.connection import connect, ensure_streams
from shared.bus.consumer_group import AllPartitions, PartitionedConsumer
from shared.bus.partitioning import partition_of
from shared.config import Config
from tests.helpers import make_config

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>deployments|statefulsets)/(?P<name>[^/?]+)/scale$")


class FakeScaleAPI:
    """The scale subresource of a few workloads, served over HTTP on a free loopback port."""

    def __init__(self, workloads: dict[tuple[str, str, str], int]):
        self.replicas = dict(workloads)  # (namespace, kind, name) -> spec.replicas
        self.requests: list[tuple[str, str, str | None, str | None, dict | None]] = []
        self.version = 100
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((method, self.path, self.headers.get("Content-Type"),
                                     self.headers.get("Authorization"), body))
                m = SCALE_PATH.match(self.path)
                if not m:
                    return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
                key = (m["ns"], m["kind"], m["name"])
                if key not in api.replicas:
                    return self._send(404, _status(404, "NotFound", f'{m["kind"]}.apps "{m["name"]}" not found'))
                if method == "PATCH":
                    if self.headers.get("Content-Type") != "application/merge-patch+json":
                        return self._send(415, _status(415, "UnsupportedMediaType", "unsupported patch type"))
                    api.replicas[key] = int(body["spec"]["replicas"])
                    api.version += 1
                self._send(200, api.scale(*key))

            def do_GET(self):
                self._handle("GET")

            def do_PATCH(self):
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def scale(self, ns: str, kind: str, name: str) -> dict:
        n = self.replicas[(ns, kind, name)]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": str(self.version),
                             "creationTimestamp": "2026-11-23T10:00:00Z"},
                "spec": {"replicas": n}, "status": {"replicas": n, "selector": f"app={name}"}}

    def __enter__(self) -> FakeScaleAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _api_client(url: str) -> client.ApiClient:
    conf = client.Configuration(host=url, api_key={"BearerToken": "sa-token"}, api_key_prefix={"BearerToken": "Bearer"})
    return client.ApiClient(conf)


def _config(tmp_path, nats_url: str = "") -> Config:
    tree = make_config(tmp_path, nats_url)
    tree["autoscaler"] = {"interval_s": 1, "groups": {
        "store": {"target_lag": 100, "max_replicas": 8},
        "router": {"enabled": False, "k8s_kind": "statefulset", "k8s_name": "router-sts", "max_replicas": 4}}}
    return Config.model_validate(tree)


DEPLOY = "/apis/apps/v1/namespaces/dicom/deployments/dicomflow-store/scale"
STS = "/apis/apps/v1/namespaces/dicom/statefulsets/router-sts/scale"


def test_reads_and_patches_the_scale_subresource(tmp_path):
    with FakeScaleAPI({("dicom", "deployments", "dicomflow-store"): 2,
                       ("dicom", "statefulsets", "router-sts"): 1}) as api:
        k8s = KubernetesScale(_config(tmp_path).autoscaler, _api_client(api.url), namespace="dicom")
        assert k8s.current("store") == 2
        k8s.scale_to("store", 5)
        assert k8s.current("store") == 5
        assert k8s.current("router") == 1
        k8s.scale_to("router", 3)
        k8s.close()
    auth = "Bearer sa-token"
    assert api.requests == [
        ("GET", DEPLOY, None, auth, None),
        ("PATCH", DEPLOY, "application/merge-patch+json", auth, {"spec": {"replicas": 5}}),
        ("GET", DEPLOY, None, auth, None),
        ("GET", STS, None, auth, None),
        ("PATCH", STS, "application/merge-patch+json", auth, {"spec": {"replicas": 3}}),
    ]
    assert api.replicas == {("dicom", "deployments", "dicomflow-store"): 5, ("dicom", "statefulsets", "router-sts"): 3}


def test_unknown_workload_is_an_error(tmp_path):
    with FakeScaleAPI({}) as api:
        k8s = KubernetesScale(_config(tmp_path).autoscaler, _api_client(api.url), namespace="dicom")
        with pytest.raises(client.ApiException) as exc:
            k8s.current("store")
        assert exc.value.status == 404
        k8s.close()


async def _lagging_stream(config: Config, per_study: dict[str, int]) -> None:
    """Create the stream and the store group's consumers, then publish events nobody consumes."""
    nc = await connect(config, "test")
    try:
        await ensure_streams(nc, config)
        await PartitionedConsumer(nc, config.stream.name, "store", config.stream.partitions, None, config.store.group,
                                  AllPartitions(config.stream.partitions), "none").ensure_consumers()
        js = nc.jetstream()
        for study, n in per_study.items():
            for i in range(n):
                await js.publish(f"dicom.in.{study}.9_{i}", b"{}")
    finally:
        await nc.close()


async def _one_round(config: Config, actuator) -> list[Decision]:
    nc = await connect(config, "test-autoscaler")
    try:
        return await Autoscaler(config, actuator).tick(nc)
    finally:
        await nc.close()


def test_autoscaler_round_patches_the_deployment(tmp_path, nats_server):
    """Real lag on JetStream -> one decision -> exactly one PATCH; in dry-run mode only the read."""
    config = _config(tmp_path, nats_server.url)
    # 3 studies on 3 distinct partitions (checked below), 150 events each: metric ceil(450/100) = 5, clamped to 3.
    studies = {"1_2_3": 150, "1_2_4": 150, "1_2_7": 150}
    assert len({partition_of(s.replace("_", "."), 8) for s in studies}) == 3
    asyncio.run(_lagging_stream(config, studies))
    with FakeScaleAPI({("dicom", "deployments", "dicomflow-store"): 1,
                       ("dicom", "statefulsets", "router-sts"): 1}) as api:
        k8s = KubernetesScale(config.autoscaler, _api_client(api.url), namespace="dicom")
        (d,) = asyncio.run(_one_round(config, DryRun(k8s)))
        assert (d.lag, d.backlog_partitions, d.metric_proposal, d.clamp, d.desired) == (450, 3, 5, "BacklogPartitions", 3)
        assert [r[0] for r in api.requests] == ["GET"]
        assert api.replicas[("dicom", "deployments", "dicomflow-store")] == 1
        (d,) = asyncio.run(_one_round(config, k8s))
        assert d.desired == 3
        k8s.close()
    # The lag in Prometheus format, for dashboards and for a KEDA ScaledObject (Prometheus trigger) instead of
    # this actuator: affinity_lag = min(lag, backlog partitions x target) = min(450, 3 x 100).
    exposition = generate_latest().decode()
    for line in ('dicomflow_autoscaler_lag{group="store"} 450.0', 'dicomflow_autoscaler_affinity_lag{group="store"} 300.0',
                 'dicomflow_autoscaler_backlog_partitions{group="store"} 3.0',
                 'dicomflow_autoscaler_desired_replicas{group="store"} 3.0'):
        assert line in exposition, line
    assert api.requests[1:] == [("GET", DEPLOY, None, "Bearer sa-token", None),
                                ("PATCH", DEPLOY, "application/merge-patch+json", "Bearer sa-token",
                                 {"spec": {"replicas": 3}})]
