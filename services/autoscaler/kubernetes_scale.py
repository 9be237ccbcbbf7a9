"""The Kubernetes actuator: read and patch the ``scale`` subresource of each group's Deployment/StatefulSet.

Only ``get`` and ``patch`` on ``deployments/scale`` (or ``statefulsets/scale``) are needed, which is
all the Role in k8s/ grants. The patch is a JSON merge patch of ``spec.replicas``; the current count
is ``spec.replicas`` of the scale, as the HPA controller reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kubernetes import client
from kubernetes import config as kube_config

from shared.config import AutoscalerConfig

log = logging.getLogger("dicomflow.autoscaler")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def workload_name(group: str, name: str) -> str:
    """The workload of a group: the configured name, else ``dicomflow-<group>``."""
    return name or f"dicomflow-{group}"


class KubernetesScale:
    """Scale subresources of the groups' workloads through the official client."""

    def __init__(self, cfg: AutoscalerConfig, api_client: client.ApiClient | None = None, namespace: str = ""):
        if api_client is None:
            kube_config.load_incluster_config()
            api_client = client.ApiClient()
        self.apps = client.AppsV1Api(api_client)
        self.namespace = namespace or cfg.namespace or SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        self.targets = {g: (p.k8s_kind, workload_name(g, p.k8s_name)) for g, p in cfg.groups.items()}

    def current(self, group: str) -> int:
        """``spec.replicas`` of the workload's scale."""
        kind, name = self.targets[group]
        read = (self.apps.read_namespaced_deployment_scale if kind == "deployment"
                else self.apps.read_namespaced_stateful_set_scale)
        scale = read(name, self.namespace)
        return int(scale.spec.replicas or 0) if scale.spec else 0

    def scale_to(self, group: str, replicas: int) -> None:
        """Merge-patch ``spec.replicas``; the workload controller does the rest (SIGTERM + grace period on pods)."""
        kind, name = self.targets[group]
        patch = (self.apps.patch_namespaced_deployment_scale if kind == "deployment"
                 else self.apps.patch_namespaced_stateful_set_scale)
        patch(name, self.namespace, {"spec": {"replicas": replicas}}, _content_type="application/merge-patch+json")
        log.info("%s: %s/%s scaled to %d", group, kind, name, replicas)

    def reconcile(self) -> int:
        """Nothing to supervise: the workload controller restarts pods."""
        return 0

    def close(self) -> None:
        self.apps.api_client.close()
