"""Structured logging setup shared by every FlowMesh process (structlog, JSON or console)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


class FileLogger:
    """Appends each line to a file, opened (and its folder made) at the first line, so a
    command that logs nothing leaves nothing behind. A line that cannot be written is
    lost, never an exception in the command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg


def configure(level: str | None = None, json: bool | None = None, file: Path | None = None) -> None:
    """Log lines go to stderr, or (`file`) appended to that file: a command's own output
    stays free of them unless asked for (`flowmesh --verbose`)."""
    level = (level or os.environ.get("FLOWMESH_LOG_LEVEL", "info")).upper()
    if json is None:
        tty = file is None and sys.stderr.isatty()
        json = os.environ.get("FLOWMESH_LOG_JSON", "0" if tty else "1") == "1"
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
        logger_factory=StderrLogger.factory if file is None else (lambda *a: FileLogger(file)),
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
