"""The operator cache: look at it, invalidate parts of it, garbage-collect the CAS.

The cache *is* the operator KV (bucket fm_ops): one `OpState` per operator key, created
`pending` by the planner and committed `done`/`failed` by a worker. A later request for
the same key is served from the committed entry (completed dedup). So:

* `entries` / `stats` read fm_ops, filtered by key (or a key prefix), kind, executor,
  version and state.
* `invalidate` deletes matching entries (compare-and-delete on the revision it read). The
  planner creates a deleted key again on the next request, so that work runs again.
  Pending entries are in flight and are left alone. Blobs are not touched: results that
  workflows already recorded in fm_wf stay readable.
* `gc` deletes CAS blobs that nothing reaches any more (see `live_set`) and that are older
  than a grace period, which protects blobs written by work still in flight (not yet
  referenced by any KV entry).

Model manifests are read as plain JSON records ({"name": ..., "files": {name: digest}});
engine/ never imports workers/.

One module per job: `entries` (reading and counting), `invalidate`, `gc` (the live set
and the sweep) and `cli` (`flowmesh cache ...`).
"""

from flowmesh.engine.cache.entries import (
    CacheError,
    CacheStats,
    Selector,
    StatsRow,
    entries,
    stats,
    summarize,
)
from flowmesh.engine.cache.gc import GcReport, gc, live_set
from flowmesh.engine.cache.invalidate import InvalidateResult, invalidate

__all__ = [
    "CacheError",
    "CacheStats",
    "GcReport",
    "InvalidateResult",
    "Selector",
    "StatsRow",
    "entries",
    "gc",
    "invalidate",
    "live_set",
    "stats",
    "summarize",
]
