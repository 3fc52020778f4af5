"""Workers as a Kubernetes Deployment per device class, scaled through the Deployment's
`scale` subresource with the official client (`pip install 'flowmesh[kubernetes]'`).

A Deployment cannot be told which pod to remove, so `retire` is only advice here: the
count goes down and Kubernetes picks the pods. Nothing is lost either way: a pod gets
SIGTERM, finishes the batch in hand within terminationGracePeriodSeconds (the worker
manifests in deploy/ allow for the worker's stop grace), and whatever it still held is
reclaimed by the scheduler and replayed elsewhere.

Where KEDA runs (deploy/k8s/keda.yaml) it owns the replica count; use this
provider instead of KEDA, not beside it, or the two will fight over `replicas`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

log = structlog.get_logger("flowmesh.autoscaler.kubernetes")


class KubernetesProvider:
    def __init__(self, apps_api: Any, namespace: str, deployments: Mapping[str, str]) -> None:
        """apps_api: a kubernetes.client.AppsV1Api; deployments: device class ->
        Deployment name (e.g. {"cpu": "flowmesh-worker", "h100": "flowmesh-worker-gpu"})."""
        self.api = apps_api
        self.namespace = namespace
        self.deployments = dict(deployments)

    @classmethod
    def from_environment(
        cls, namespace: str, deployments: Mapping[str, str], host: str | None = None
    ) -> KubernetesProvider:
        """In a pod: its service account; elsewhere: ~/.kube/config; or an explicit
        API server URL (`host`, no auth: a `kubectl proxy`)."""
        try:
            from kubernetes import client, config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the Kubernetes provider needs the client: pip install 'flowmesh[kubernetes]'"
            ) from exc
        if host is not None:
            configuration = client.Configuration()
            configuration.host = host
            return cls(client.AppsV1Api(client.ApiClient(configuration)), namespace, deployments)
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.AppsV1Api(), namespace, deployments)

    def _name(self, device_class: str) -> str:
        try:
            return self.deployments[device_class]
        except KeyError:
            raise ValueError(f"no Deployment for device class {device_class!r}") from None

    async def replicas(self, device_class: str) -> int:
        scale = await asyncio.to_thread(
            self.api.read_namespaced_deployment_scale, self._name(device_class), self.namespace
        )
        return int(scale.spec.replicas or 0)

    async def scale(self, device_class: str, replicas: int, retire: Sequence[str] = ()) -> None:
        name = self._name(device_class)
        await asyncio.to_thread(
            self.api.patch_namespaced_deployment_scale,
            name,
            self.namespace,
            {"spec": {"replicas": max(0, int(replicas))}},
        )
        log.info("deployment scaled", deployment=name, replicas=replicas, advised=list(retire))
