"""The scheduler: one utility function picks both the batch and the worker.

`policy` and the modules it uses are pure (no I/O, no clock of their own), so the live
scheduler (`live`) and the simulator (loadgen/sim) run exactly the same decisions.
"""

from flowmesh.engine.scheduler.live import Scheduler

__all__ = ["Scheduler"]
