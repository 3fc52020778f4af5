"""JetStream streams, consumers, KV buckets and the object store FlowMesh uses.

`ensure(js)` creates whatever is missing; every component calls it on start, so the
first one up sets the bus up and none depends on start order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ServiceUnavailableError

from flowmesh.topics import subjects
from flowmesh.topics.config.settings import env_int

DAY = 24 * 3600.0

STREAM_SUBMIT = "FM_SUBMIT"
STREAM_READY = "FM_READY"
STREAM_ASSIGN = "FM_ASSIGN"
STREAM_DONE = "FM_DONE"
STREAM_DLQ = "FM_DLQ"

KV_OPS = "fm_ops"  # operator key -> OpState
KV_WF = "fm_wf"  # workflow id -> WorkflowStatus
KV_WORKERS = "fm_workers"  # worker id -> WorkerInfo (heartbeat)
KV_EXECUTORS = "fm_executors"  # executor id -> version advertised by workers
# "params.<executor id>" -> a transform's parameters {name: [type, required]} (JSON)
SIGNATURE_PREFIX = "params."
KV_MODELS = "fm_models"  # model name -> weights digest advertised by workers
KV_REQUESTS = "fm_requests"  # "<op key>.<workflow id>" -> OpRequest; "ran-…" -> RanRequests
KV_FABRIC = (
    "fm_fabric"  # "engine" -> FabricRecord: the CAS the fabric uses (topics/store/fabric.py)
)
# tenant -> TenantUse: its running workflows and bytes stored, shared by every gateway
# process (compare-and-set updates: engine/quota.py)
KV_TENANT_USE = "fm_tenant_use"
KV_GATEWAYS = "fm_gateways"  # gateway id -> "" (a heartbeat: the entry expires unrenewed)
GATEWAY_TTL_S = 15.0
OBJ_CAS = "fm_cas"  # object-store CAS backend

# Consumer names
PLANNER_DONE = "planner-done"
SCHEDULER = "scheduler"
WORKER_CONSUMER_PREFIX = "w-"

# Submissions are idempotent by Nats-Msg-Id within this window (and by workflow id
# in the planner after it).
DUPLICATE_WINDOW_S = 300.0
# How long a worker may hold an assignment without an in-progress ack.
ASSIGN_ACK_WAIT_S = 30.0
READY_ACK_WAIT_S = 10.0
DONE_ACK_WAIT_S = 30.0
# Largest message any component accepts; bigger ones go to the dead-letter stream.
MAX_MESSAGE_BYTES = 512 * 1024


@dataclass(frozen=True)
class Layout:
    """Stream sizes; tests shrink nothing but storage, which they keep on a temp dir."""

    storage: StorageType = StorageType.FILE
    replicas: int = 1  # 3 on a NATS cluster (deploy/)
    submit_max_age_s: float = 30 * DAY
    done_max_age_s: float = 7 * DAY

    @classmethod
    def from_env(cls) -> Layout:
        """The layout a deployment asks for: FLOWMESH_REPLICAS=3 on a 3-server NATS cluster
        (deploy/k8s/config.yaml sets it). Whichever component starts first creates the
        streams, so every component must see the same value."""
        replicas = env_int("FLOWMESH_REPLICAS", 1, 1, 5)
        return cls(replicas=replicas)


def stream_configs(layout: Layout) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=STREAM_SUBMIT,
            subjects=[subjects.SUBMIT],
            retention=RetentionPolicy.LIMITS,
            max_age=layout.submit_max_age_s,
            duplicate_window=DUPLICATE_WINDOW_S,
            storage=layout.storage,
            num_replicas=layout.replicas,
        ),
        StreamConfig(
            name=STREAM_READY,
            subjects=[subjects.READY_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=DUPLICATE_WINDOW_S,
            storage=layout.storage,
            num_replicas=layout.replicas,
        ),
        StreamConfig(
            name=STREAM_ASSIGN,
            subjects=[subjects.ASSIGN_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=DUPLICATE_WINDOW_S,
            storage=layout.storage,
            num_replicas=layout.replicas,
        ),
        StreamConfig(
            name=STREAM_DONE,
            subjects=[subjects.DONE],
            retention=RetentionPolicy.LIMITS,
            max_age=layout.done_max_age_s,
            duplicate_window=DUPLICATE_WINDOW_S,
            storage=layout.storage,
            num_replicas=layout.replicas,
        ),
        StreamConfig(
            name=STREAM_DLQ,
            subjects=[subjects.DLQ_ALL],
            retention=RetentionPolicy.LIMITS,
            max_age=layout.submit_max_age_s,
            storage=layout.storage,
            num_replicas=layout.replicas,
        ),
    ]


def planner_done_consumer() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=PLANNER_DONE,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=DONE_ACK_WAIT_S,
        deliver_policy=DeliverPolicy.ALL,
        max_ack_pending=10_000,
    )


def scheduler_consumer() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=SCHEDULER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=READY_ACK_WAIT_S,
        filter_subject=subjects.READY_ALL,
        max_ack_pending=50_000,
    )


def worker_consumer_name(worker: str) -> str:
    return WORKER_CONSUMER_PREFIX + subjects.check_token(worker, "worker id")


def worker_consumer(worker: str, slots: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=worker_consumer_name(worker),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ASSIGN_ACK_WAIT_S,
        filter_subject=subjects.assign(worker),
        max_ack_pending=max(1, slots),
        # a worker that vanished without a goodbye leaves no consumer behind for long;
        # the scheduler reclaims its assignments well before this
        inactive_threshold=3600.0,
    )


log = structlog.get_logger("flowmesh.streams")

# How long a create waits out a cluster that cannot place its replicas yet: a peer the
# meta leader counts as offline for a moment (a restart, a loaded box missing a route
# heartbeat) answers "no suitable peers for placement" (err_code 10005) or 503, or
# lets the request time out.
PLACEMENT_WAIT_S = 30.0
NO_PEERS_FOR_PLACEMENT = 10005
T = TypeVar("T")


async def _placed(create: Callable[[], Awaitable[T]], what: str) -> T:
    """`create()`, asked again while the cluster cannot place the replicas yet, up to
    PLACEMENT_WAIT_S; any other refusal, or one that outlasts the wait, is raised."""
    deadline = time.monotonic() + PLACEMENT_WAIT_S
    while True:
        try:
            return await create()
        except (APIError, nats.errors.TimeoutError) as exc:
            # a create that timed out may have been applied: asked again with the same
            # config, the server answers with the stream it made
            transient = (
                not isinstance(exc, APIError)
                or isinstance(exc, ServiceUnavailableError)
                or exc.err_code == NO_PEERS_FOR_PLACEMENT
            )
            if not transient or time.monotonic() > deadline:
                raise
            log.warning("cannot place replicas yet; trying again", what=what, error=str(exc))
            await asyncio.sleep(0.5)


async def ensure(js: JetStreamContext, layout: Layout | None = None) -> None:
    layout = layout or Layout.from_env()
    for cfg in stream_configs(layout):
        try:
            await js.stream_info(cfg.name or "")
        except NotFoundError:
            await _placed(partial(js.add_stream, cfg), cfg.name or "")
    kv_buckets = {
        KV_OPS: KeyValueConfig(
            bucket=KV_OPS, history=1, storage=layout.storage, replicas=layout.replicas
        ),
        KV_WF: KeyValueConfig(
            bucket=KV_WF, history=1, storage=layout.storage, replicas=layout.replicas
        ),
        KV_WORKERS: KeyValueConfig(
            bucket=KV_WORKERS,
            history=1,
            ttl=3600.0,
            storage=layout.storage,
            replicas=layout.replicas,
        ),
        KV_EXECUTORS: KeyValueConfig(
            bucket=KV_EXECUTORS, history=1, storage=layout.storage, replicas=layout.replicas
        ),
        KV_REQUESTS: KeyValueConfig(
            bucket=KV_REQUESTS, history=1, storage=layout.storage, replicas=layout.replicas
        ),
        KV_MODELS: KeyValueConfig(
            bucket=KV_MODELS, history=1, storage=layout.storage, replicas=layout.replicas
        ),
        KV_FABRIC: KeyValueConfig(
            bucket=KV_FABRIC, history=1, storage=layout.storage, replicas=layout.replicas
        ),
        KV_TENANT_USE: KeyValueConfig(
            bucket=KV_TENANT_USE,
            history=1,
            max_value_size=256 * 1024,  # bounded: a tenant's running workflows are capped
            storage=layout.storage,
            replicas=layout.replicas,
        ),
        KV_GATEWAYS: KeyValueConfig(
            bucket=KV_GATEWAYS,
            history=1,
            ttl=GATEWAY_TTL_S,
            storage=layout.storage,
            replicas=layout.replicas,
        ),
    }
    for name, kv_cfg in kv_buckets.items():
        try:
            await js.key_value(name)
        except BucketNotFoundError:
            await _placed(partial(js.create_key_value, kv_cfg), name)
    try:
        await js.object_store(OBJ_CAS)
    except (BucketNotFoundError, NotFoundError):
        await _placed(
            lambda: js.create_object_store(
                OBJ_CAS, ObjectStoreConfig(storage=layout.storage, replicas=layout.replicas)
            ),
            OBJ_CAS,
        )
