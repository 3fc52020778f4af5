"""Subject names: the only place they are spelled out."""

from __future__ import annotations

import re

SUBMIT = "fm.wf.submit"
# a CancelWorkflow, core NATS to every planner shard; the one running it stops it
CANCEL = "fm.wf.cancel"
READY_PREFIX = "fm.op.ready"
READY_ALL = "fm.op.ready.>"
ASSIGN_PREFIX = "fm.assign"
ASSIGN_ALL = "fm.assign.>"
DONE = "fm.op.done"
DLQ_PREFIX = "fm.dlq"
DLQ_ALL = "fm.dlq.>"

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str, what: str) -> str:
    """A value placed in a subject must be one plain token: no dots, wildcards or spaces."""
    if not _TOKEN_RE.match(value):
        raise ValueError(f"{what} {value!r} must match {_TOKEN_RE.pattern}")
    return value


def is_token(value: str) -> bool:
    return bool(_TOKEN_RE.match(value))


def ready(pool: str) -> str:
    return f"{READY_PREFIX}.{check_token(pool, 'pool')}"


def assign(worker: str) -> str:
    return f"{ASSIGN_PREFIX}.{check_token(worker, 'worker id')}"


def worker_of_assign_subject(subject: str) -> str:
    return subject[len(ASSIGN_PREFIX) + 1 :]


def dlq(component: str) -> str:
    return f"{DLQ_PREFIX}.{check_token(component, 'component')}"


# --- the tenant-facing gateway (engine/gateway.py) ---------------------------------------
# Core NATS request/reply, no JetStream: a tenant's credentials allow publishing under
# its own fm.api.<tenant>.> and reading its own inbox, nothing else, so the subject's
# tenant token is an identity the server vouches for.
API_PREFIX = "fm.api"
API_ALL = f"{API_PREFIX}.*.*"  # what the gateway serves: fm.api.<tenant>.<verb>
API_VERBS = ("submit", "status", "list", "result", "lineage", "cost", "cancel")
INBOX_PREFIX = "_INBOX"
# Tenant names on the gateway: a subject token without "_", which separates the tenant
# from its own id in a gateway workflow id ("<tenant>_<id>").
_TENANT_RE = re.compile(r"^[A-Za-z0-9-]{1,32}$")


def check_tenant(value: str) -> str:
    if not _TENANT_RE.match(value):
        raise ValueError(f"tenant {value!r} must match {_TENANT_RE.pattern}")
    return value


def api(tenant: str, verb: str) -> str:
    if verb not in API_VERBS:
        raise ValueError(f"unknown API verb {verb!r} (one of {', '.join(API_VERBS)})")
    return f"{API_PREFIX}.{check_tenant(tenant)}.{verb}"


def api_of_tenant(tenant: str) -> str:
    """Every API subject of one tenant: what its credentials may publish to."""
    return f"{API_PREFIX}.{check_tenant(tenant)}.>"


def parse_api(subject: str) -> tuple[str, str] | None:
    """(tenant, verb) of an API subject, None for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != API_PREFIX:
        return None
    return parts[2], parts[3]


def tenant_inbox_prefix(tenant: str) -> str:
    """The reply-subject prefix a tenant's client uses, and the only one it may read."""
    return f"{INBOX_PREFIX}.{check_tenant(tenant)}"
