"""The bus client: submit workflows, watch them, read results, straight on JetStream.
The public API is `flowmesh.Client` (sdk/client.py), which uses this one when it talks to
the bus directly (the engine's gateway and tools use it too).

A submission is validated here first (nothing is published for an invalid spec), its
datasets are uploaded to the CAS as Arrow IPC, and only their digests go on the bus. It is
idempotent by workflow id: submitting the same id twice runs the workflow once.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow.parquet as pq
from nats.js.errors import KeyNotFoundError

from flowmesh.engine.spec import (
    MAX_DATASET_BYTES,
    Catalog,
    SpecError,
    check_datasets,
    check_records,
    validate,
)
from flowmesh.topics import Bus, codec, streams, subjects
from flowmesh.topics.config.settings import Settings
from flowmesh.topics.errors import NotComplete, NotFound, WaitTimeout, WorkflowFailed
from flowmesh.topics.messages import (
    CancelWorkflow,
    DatasetSpec,
    SubmitWorkflow,
    WorkerInfo,
    WorkflowSpec,
    WorkflowStatus,
)
from flowmesh.topics.store.cas import CAS, Record, open_cas
from flowmesh.topics.store.fabric import agree, read_fabric

# WorkflowFailed: the name tests and older callers import from here
__all__ = ["FlowMesh", "WorkflowFailed", "read_records"]


# dataset files whose size on disk is close to their size as JSON records
TEXT_DATASETS = (".jsonl", ".json", ".csv")


def read_records(path: str | Path) -> list[Record]:
    """Records from .jsonl, .json (a list), .csv or .parquet."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open() as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise SpecError([f"{path}: a .json dataset must be a list of records"])
            return data
        if suffix == ".csv":
            with path.open(newline="") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".parquet":
            rows: list[Record] = pq.read_table(path).to_pylist()
            return rows
    except (OSError, ValueError) as exc:
        raise SpecError([f"cannot read dataset {path}: {exc}"]) from exc
    raise SpecError([f"dataset {path}: unsupported format {suffix!r} (jsonl, json, csv, parquet)"])


class FlowMesh:
    def __init__(self, bus: Bus, cas: CAS) -> None:
        self.bus = bus
        self.cas = cas

    @classmethod
    async def connect(
        cls,
        nats_url: str | None = None,
        cas_url: str | None = None,
        *,
        settings: Settings | None = None,
        kafka: str | None = None,
        kv: str | None = None,
    ) -> FlowMesh:
        """Connect to the fabric at `nats_url` (default: the settings', i.e. $FLOWMESH_NATS)
        and open its CAS: `cas_url` if given (it must be the one the fabric recorded), else
        the fabric's own (topics/store/fabric.py), else the settings'. Unavailable when no NATS
        server answers within the settings' connect_timeout. `kafka`: the bootstrap servers
        its streams run on ("" for NATS); None takes the settings' bus. `kv`: where its
        KV buckets live ("nats", "kafka"); None takes the settings'."""
        settings = settings or Settings.load()
        url = nats_url or settings.nats
        if kafka is None:
            kafka = settings.kafka if settings.bus == "kafka" else ""
        bus = await Bus.connect(
            url,
            name="flowmesh-client",
            give_up_after=settings.connect_timeout,
            kafka=kafka,
            kv=kv or settings.kv,
        )
        try:
            mine = cas_url if cas_url is not None else settings.chosen_cas
            # told no CAS: the fabric's, once its engine has recorded it (a client may
            # connect while the engine is still starting)
            record = await read_fabric(bus, wait_s=settings.connect_timeout if mine is None else 0)
            cas = await open_cas(agree(record, mine, settings.cas_url, url), bus.js)
        except BaseException:
            await bus.close()
            raise
        return cls(bus, cas)

    async def close(self) -> None:
        await self.bus.close()

    async def __aenter__(self) -> FlowMesh:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- submit ---------------------------------------------------------------------

    async def submit(
        self,
        spec: WorkflowSpec,
        workflow_id: str | None = None,
        *,
        tenant: str | None = None,
        check_executors: bool = True,
    ) -> str:
        if tenant is not None:
            spec = WorkflowSpec(
                name=spec.name,
                nodes=spec.nodes,
                datasets=spec.datasets,
                tenant=tenant,
                dedup_scope=spec.dedup_scope,
            )
        # one validation with the workers' catalog: every problem in one answer
        # the records a chunk at a time between other tasks (60k records take ~0.1-0.4 s
        # to check, and the gateway's event loop serves every tenant), then the rest at
        # once: every problem in one answer
        await check_datasets(spec)
        validate(spec, await self.catalog() if check_executors else None, check_data=False)
        wf_id = workflow_id or f"wf-{uuid.uuid4().hex[:16]}"
        if not subjects.is_token(wf_id):
            raise SpecError([f"workflow id {wf_id!r} must match [A-Za-z0-9_-]{{1,64}}"])
        datasets = {}
        for name, ds in spec.datasets.items():
            if ds.digest is not None:
                if not await self.cas.exists(ds.digest):
                    raise SpecError([f"dataset {name!r}: digest {ds.digest[:12]} not in the CAS"])
                datasets[name] = ds
                continue
            if ds.records is not None:
                records = ds.records  # validate() held them to the limits
            else:
                # a file is held to the same documented limits as inline records
                # (engine/spec.py: MAX_DATASET_BYTES, MAX_DATASET_RECORDS, MAX_RECORD_BYTES):
                # a text file far past them is refused before it is read into memory
                path = Path(ds.path or "")
                size = path.stat().st_size if path.is_file() else 0
                if path.suffix.lower() in TEXT_DATASETS and size > 2 * MAX_DATASET_BYTES:
                    raise SpecError(
                        [
                            f"dataset {name!r}: {path} is {size} bytes; the limit is "
                            f"{MAX_DATASET_BYTES} bytes per dataset: split it into several "
                            "workflows"
                        ]
                    )
                records = read_records(path)
                if problems := check_records(name, records):
                    raise SpecError([*problems, "split the dataset into several workflows"])
            if not all(isinstance(r, dict) for r in records):
                raise SpecError([f"dataset {name!r}: every record must be a mapping"])
            datasets[name] = DatasetSpec(digest=await self.cas.put_table(records))
        resolved = WorkflowSpec(
            name=spec.name,
            nodes=spec.nodes,
            datasets=datasets,
            tenant=spec.tenant,
            dedup_scope=spec.dedup_scope,
        )
        msg = SubmitWorkflow(workflow_id=wf_id, spec=resolved, submitted_at=time.time())
        if len(codec.encode(msg)) > streams.MAX_MESSAGE_BYTES:
            raise SpecError(["the workflow spec is too large to submit; move data into datasets"])
        await self.bus.publish(subjects.SUBMIT, msg, msg_id=wf_id)
        return wf_id

    async def catalog(self) -> Catalog | None:
        """What workers advertise (executors, models, transform signatures), to reject
        unknown transforms, models and bad transform params up front; None with no worker
        registered yet (the planner then waits for one)."""
        kv_exec = await self.bus.kv(streams.KV_EXECUTORS)
        keys = set(await self.bus.kv_keys(streams.KV_EXECUTORS))
        if not keys:
            return None
        models = set(await self.bus.kv_keys(streams.KV_MODELS))
        # the signature entries (one per transform, ~25) read at once: the gateway
        # validates every tenant's submission on a loop it shares with the planner, where
        # each read in turn waited its turn behind a large submission's work
        named = sorted(k for k in keys if k.startswith(streams.SIGNATURE_PREFIX))
        entries = await asyncio.gather(*(kv_exec.get(k) for k in named), return_exceptions=True)
        signatures: dict[str, dict[str, tuple[str, bool]]] = {}
        for key, entry in zip(named, entries, strict=True):
            if isinstance(entry, KeyNotFoundError):
                continue  # not checked here; the worker still checks at run time
            if isinstance(entry, BaseException):
                raise entry
            try:
                raw = codec.decode(entry.value or b"", dict[str, tuple[str, bool]])
            except codec.DecodeError:
                continue
            signatures[key.removeprefix(streams.SIGNATURE_PREFIX)] = raw
        executors = frozenset(k for k in keys if not k.startswith(streams.SIGNATURE_PREFIX))
        return Catalog(executors, frozenset(models), signatures)

    # --- observe --------------------------------------------------------------------

    async def status(self, workflow_id: str) -> WorkflowStatus | None:
        kv = await self.bus.kv(streams.KV_WF)
        try:
            entry = await kv.get(workflow_id)
        except KeyNotFoundError:
            return None
        return codec.decode(entry.value, WorkflowStatus) if entry.value else None

    async def workflows(self) -> list[WorkflowStatus]:
        out = [
            codec.decode(value, WorkflowStatus)
            for _, value, _ in await self.bus.kv_items(streams.KV_WF)
        ]
        return sorted(out, key=lambda s: s.submitted_at)

    async def workers(self) -> list[WorkerInfo]:
        infos = []
        for _, value, _ in await self.bus.kv_items(streams.KV_WORKERS):
            try:
                infos.append(codec.decode(value, WorkerInfo))
            except codec.DecodeError:
                continue  # not a worker's heartbeat (the scheduler dead-letters it)
        return infos

    async def wait(
        self,
        workflow_id: str,
        timeout: float | None = None,
        on_update: Callable[[WorkflowStatus], Any] | None = None,
        raise_on_failure: bool = True,
    ) -> WorkflowStatus:
        """Wait until the workflow completes or fails, calling on_update on progress."""
        kv = await self.bus.kv(streams.KV_WF)
        seen = self.bus.reconnects
        # through a nats restart too: JetStream answers again only once its store is back
        watcher = await self.bus.retrying("watch", lambda: kv.watch(workflow_id))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout(f"workflow {workflow_id} still running after {timeout}s")
                if self.bus.reconnects != seen:
                    # a nats restart took the watcher's consumer with it: watch again
                    # (the new one starts with the latest status)
                    seen = self.bus.reconnects
                    with contextlib.suppress(Exception):
                        await watcher.stop()
                    watcher = await self.bus.retrying("watch", lambda: kv.watch(workflow_id))
                try:
                    entry = await watcher.updates(timeout=min(left or 1.0, 1.0))
                except TimeoutError:
                    continue
                if entry is None or not entry.value:
                    continue
                status = codec.decode(entry.value, WorkflowStatus)
                if on_update is not None:
                    on_update(status)
                if status.state == "failed" and raise_on_failure:
                    raise WorkflowFailed(status)
                if status.state != "running":
                    return status
        finally:
            await watcher.stop()

    async def cancel(self, workflow_id: str, timeout: float = 5.0) -> str:
        """Ask the planners to cancel a running workflow; its state after up to `timeout`
        seconds (`cancelled`, or the state it finished in)."""
        status = await self.status(workflow_id)
        if status is None:
            raise KeyError(f"no workflow {workflow_id!r}")
        if status.state == "running":
            await self.bus.transport.broadcast(
                subjects.CANCEL, codec.encode(CancelWorkflow(workflow_id, "cancelled"))
            )
            deadline = time.monotonic() + timeout
            while status is not None and status.state == "running":
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
                status = await self.status(workflow_id)
        return status.state if status is not None else "unknown"

    async def result(self, workflow_id: str, node: str) -> list[Record]:
        status = await self.status(workflow_id)
        if status is None:
            raise NotFound(f"no workflow {workflow_id!r}")
        ns = status.nodes.get(node)
        if ns is None:
            raise NotFound(
                f"workflow {workflow_id} has no node {node!r} (nodes: {', '.join(status.nodes)})"
            )
        if not ns.complete or ns.output is None:
            raise NotComplete(
                f"node {node!r} of {workflow_id} is not complete ({ns.done}/{ns.total})"
            )
        return await self.cas.get_records(await self.cas.get_manifest(ns.output))
