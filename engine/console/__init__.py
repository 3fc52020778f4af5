"""The web console the engine serves: live workflows, DAGs, lineage, workers, cost."""

from flowmesh.engine.console.app import ConsoleServer, start_console

__all__ = ["ConsoleServer", "start_console"]
