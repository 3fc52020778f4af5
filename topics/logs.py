"""Structured logging setup shared by every FlowMesh process (structlog, JSON or console)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from flowmesh.topics.messages import Assignment


class StderrLogger:
    """Writes each line to whatever sys.stderr is at that moment. structlog's
    PrintLogger keeps the stream it was made with, and a caller that swaps sys.stderr
    (a test harness's capture, a daemon redirecting its output) would leave every cached
    logger writing to a closed file: a log call would then raise inside the component."""

    def msg(self, message: str) -> None:
        # a log line that cannot be written (stderr closed or gone) is lost, never an
        # exception in the middle of a retry or a commit
        with contextlib.suppress(ValueError, OSError):
            print(message, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg

    @classmethod
    def factory(cls, *args: object) -> StderrLogger:
        return cls()


def configure(level: str | None = None, json: bool | None = None) -> None:
    level = (level or os.environ.get("FLOWMESH_LOG_LEVEL", "info")).upper()
    if json is None:
        json = os.environ.get("FLOWMESH_LOG_JSON", "1" if not sys.stderr.isatty() else "0") == "1"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=StderrLogger.factory,
        cache_logger_on_first_use=True,
    )


@contextmanager
def bound(**ids: object) -> Iterator[None]:
    """Every log line inside carries these ids (tenant, workflow, operator, batch...),
    whichever module writes it: executors and model loaders need not be passed them."""
    with structlog.contextvars.bound_contextvars(**ids):
        yield


def assignment_ids(batch: Assignment, max_ops: int = 16) -> dict[str, object]:
    """The ids a batch's log lines are bound to: a batch mixes workflows and tenants."""
    return {
        "batch": batch.batch_id,
        "tenants": sorted({op.tenant for op in batch.ops}),
        "workflows": sorted({op.workflow_id for op in batch.ops}),
        "ops": [op.key[:16] for op in batch.ops[:max_ops]],
    }
