"""deploy/ is checked here since no cluster runs in CI: every Kubernetes manifest against
the official schemas (kubernetes-validate bundles them), the KEDA ScaledObjects and the
NATS Helm values against schemas derived from their CRD / chart (deploy/schemas/, each
says where it came from), and the names that tie the pieces together."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from flowmesh.topics import streams
from flowmesh.workers.runtime import WorkerConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json"}


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}#{i}", doc


DOCS = list(documents())


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "schemas" / name).read_text())
    return loaded


def kinds(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return out


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_manifest_is_valid(where: str, doc: dict[str, Any]) -> None:
    crd = CRD_SCHEMAS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if crd is not None:
        jsonschema.validate(doc, schema(crd))
    else:
        # strict: fields the API would drop silently (a typo) are errors too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "flowmesh") == "flowmesh" or doc["kind"] == "Namespace"


def test_the_validators_catch_mistakes() -> None:
    worker = kinds("Deployment")["flowmesh-worker"]
    typo = json.loads(json.dumps(worker))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    so = json.loads(json.dumps(kinds("ScaledObject")["flowmesh-worker"]))
    del so["spec"]["triggers"][0]["metadata"]["consumer"]
    with pytest.raises(jsonschema.ValidationError, match="consumer"):
        jsonschema.validate(so, schema("keda-scaledobject.schema.json"))
    values = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())
    values["config"]["cluster"]["replicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, schema("nats-values.schema.json"))


def test_nats_values_give_a_jetstream_cluster_of_three() -> None:
    values = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())
    jsonschema.validate(values, schema("nats-values.schema.json"))
    assert values["config"]["cluster"]["replicas"] == 3


def test_keda_scales_the_worker_deployments_on_the_schedulers_lag() -> None:
    deployments = kinds("Deployment")
    scaled = kinds("ScaledObject")
    monitor_port = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())["config"]["monitor"][
        "port"
    ]
    targets = set()
    for so in scaled.values():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in deployments, f"{so['metadata']['name']} scales a missing {target}"
        targets.add(target)
        for trig in so["spec"]["triggers"]:
            meta = trig["metadata"]
            assert trig["type"] == "nats-jetstream"
            # the consumer whose lag is the ready backlog (topics/streams.py)
            assert meta["stream"] == streams.STREAM_READY
            assert meta["consumer"] == streams.SCHEDULER
            assert meta["natsServerMonitoringEndpoint"].endswith(f":{monitor_port}")
    workers = {n for n, d in deployments.items() if "flowmesh-worker" in containers(d)[0]["args"]}
    assert targets == workers == {"flowmesh-worker", "flowmesh-worker-gpu"}


def test_images_ports_secrets_and_grace_are_consistent() -> None:
    deployments = {**kinds("Deployment"), **kinds("StatefulSet")}
    images = {c["image"] for d in deployments.values() for c in containers(d)}
    assert len(images) == 1, f"one image for engine and workers, not {images}"
    secrets = {n: set(s["stringData"]) for n, s in kinds("Secret").items()}
    configmaps = set(kinds("ConfigMap"))
    for name, d in deployments.items():
        for c in containers(d):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), (name, ref)
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
    # the gateway Service reaches the ports the gateway (and its console) listens on
    engine = containers(deployments["flowmesh-gateway"])[0]
    listening = {p["name"]: p["containerPort"] for p in engine["ports"]}
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert {int(env["FLOWMESH_METRICS_PORT"]), int(env["FLOWMESH_CONSOLE_PORT"])} == set(
        listening.values()
    )
    service = kinds("Service")["flowmesh-gateway"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(listening)
    labels = deployments["flowmesh-gateway"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # a worker scaled away must get time to finish its batch (its stop grace) and leave
    for name in ("flowmesh-worker", "flowmesh-worker-gpu"):
        grace = deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > WorkerConfig().stop_grace_s, name


def test_gpu_workers_request_a_gpu_and_tolerate_gpu_nodes() -> None:
    gpu = kinds("Deployment")["flowmesh-worker-gpu"]
    c = containers(gpu)[0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["spec"]["template"]["spec"]["tolerations"])
    args = c["args"]
    device_class = args[args.index("--device-class") + 1]
    fleet = yaml.safe_load((DEPLOY.parent / "configs" / "fleet" / "default.yaml").read_text())
    assert fleet["classes"][device_class]["kind"] == "gpu"
    price = float(args[args.index("--price-per-hour") + 1])
    assert price == fleet["classes"][device_class]["price_per_hour"]


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on a missing {dep}"
    assert services["nats"]["command"][:1] == ["-js"]
    for name in ("engine", "worker"):
        assert services[name]["environment"]["FLOWMESH_NATS"] == "nats://nats:4222"


def test_streams_are_created_with_the_clusters_replica_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())
    config = kinds("ConfigMap")["flowmesh-config"]["data"]
    # every pod reads the same ConfigMap; the first one up creates the streams with it
    monkeypatch.setenv("FLOWMESH_REPLICAS", config["FLOWMESH_REPLICAS"])
    assert streams.Layout.from_env().replicas == 3 <= values["config"]["cluster"]["replicas"]
    monkeypatch.delenv("FLOWMESH_REPLICAS")
    assert streams.Layout.from_env().replicas == 1
    for bad in ["three", "0", "7"]:
        monkeypatch.setenv("FLOWMESH_REPLICAS", bad)
        with pytest.raises(ValueError, match="FLOWMESH_REPLICAS"):
            streams.Layout.from_env()


def test_planner_shards_take_their_index_from_the_pod_ordinal() -> None:
    planner = kinds("StatefulSet")["flowmesh-planner"]
    c = containers(planner)[0]
    assert c["args"] == ["flowmesh", "planner"]
    env = {e["name"]: e for e in c["env"]}
    # every shard is told how many there are: exactly the StatefulSet's replicas
    assert int(env["FLOWMESH_PLANNER_SHARDS"]["value"]) == planner["spec"]["replicas"] >= 2
    field = env["FLOWMESH_PLANNER_SHARD"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['apps.kubernetes.io/pod-index']"
    service = kinds("Service")[planner["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    # one scheduler; the rest of the engine runs in its own Deployments
    deployments = kinds("Deployment")
    assert deployments["flowmesh-scheduler"]["spec"]["replicas"] == 1
    assert containers(deployments["flowmesh-scheduler"])[0]["args"] == ["flowmesh", "scheduler"]
    assert containers(deployments["flowmesh-gateway"])[0]["args"] == ["flowmesh", "gateway"]
