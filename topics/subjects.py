"""Subject names: the only place they are spelled out."""

from __future__ import annotations

import re

SUBMIT = "fm.wf.submit"
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
