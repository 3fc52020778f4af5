"""A FlowMesh process started by another one stops when that one is gone.

`flowmesh up` (engine/local.py) starts the engine's processes and the workers in sessions
of their own, so a Ctrl-C reaches `up` alone and it stops them in order. Killed outright
(SIGKILL, out of memory), `up` stops nothing: its children would run on, holding ports
and the data directory, until someone found them. So it names itself to each child
($FLOWMESH_PARENT_PID), and the child watches for its parent to go: when it is reparented
the parent is gone, and it sends itself SIGTERM: a graceful stop (its batch finished, its
work handed back), or an exit while it is still starting.

The watch is the child's, not the kernel's PR_SET_PDEATHSIG: that signal follows the
*thread* that started the child, and workers are started from the autoscaler's thread
too; os.getppid() changes only when the parent process is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

from flowmesh.topics.config.settings import BY_FIELD

log = structlog.get_logger("flowmesh.parent")

PARENT_ENV = BY_FIELD["parent_pid"].env  # FLOWMESH_PARENT_PID
POLL_S = 1.0


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that must stop when this process is gone."""
    return {**env, PARENT_ENV: str(os.getpid())}


def expected_parent() -> int | None:
    raw = os.environ.get(PARENT_ENV, "")
    return int(raw) if raw.isdigit() else None


async def parent_gone(poll_s: float = POLL_S) -> None:
    """Returns once the process that started this one (named by $FLOWMESH_PARENT_PID)
    is gone; never when no parent was named."""
    parent = expected_parent()
    if parent is None:
        await asyncio.Event().wait()
        return
    while os.getppid() == parent:
        await asyncio.sleep(poll_s)
    log.warning("the process that started this one is gone; stopping", parent=parent)


def terminate_when_parent_gone() -> asyncio.Task[None]:
    """SIGTERM to this process when its parent is gone: a graceful stop once the
    process has its handler installed, the default (exit) while it is still starting,
    perhaps waiting for a nats-server that went with the parent."""

    async def watch() -> None:
        await parent_gone()
        os.kill(os.getpid(), signal.SIGTERM)

    return asyncio.create_task(watch(), name="parent-watch")
