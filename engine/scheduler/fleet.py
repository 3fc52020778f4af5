"""Fleet profiles: device classes with price, power, memory and a latency model per
operator kind, loaded from configs/fleet/*.yaml, plus the online estimator that refines
each (class, kind) latency model from the durations workers actually observe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class LatencyModel:
    """Seconds to run a batch of n operators: fixed + per_item * n, n <= max_batch."""

    fixed_s: float
    per_item_s: float
    max_batch: int

    def seconds(self, n: int) -> float:
        return self.fixed_s + self.per_item_s * n


# for an operator kind no profile mentions: modest, and learned online from real batches
GENERIC = LatencyModel(fixed_s=0.05, per_item_s=0.05, max_batch=16)


@dataclass(frozen=True)
class DeviceClass:
    name: str
    kind: Literal["gpu", "cpu"]
    price_per_hour: float
    watts_busy: float
    watts_idle: float
    memory_gb: float
    load_gbps: float  # model weights into device memory
    net_gbps: float  # inputs fetched from the CAS
    latency: Mapping[str, LatencyModel]  # operator kinds this class runs
    # a model smaller than the reference runs proportionally faster, down to this
    # fraction: a GPU does not get 50x faster on a 50x smaller model (launch overheads,
    # idle SMs), which is what lets a CPU win small models on cost
    min_size_factor: float = 0.0

    def runs(self, kind: str) -> bool:
        return kind in self.latency


@dataclass(frozen=True)
class Fleet:
    classes: Mapping[str, DeviceClass]
    kinds: tuple[str, ...]
    reference: Mapping[str, LatencyModel] = field(default_factory=dict)
    ref_model_gb: Mapping[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DeviceClass:
        return self.classes[name]

    def with_class(
        self,
        name: str,
        price_per_hour: float,
        watts_busy: float,
        memory_gb: float,
        kinds: Iterable[str] = (),
    ) -> Fleet:
        """This fleet plus a class nobody profiled (a worker that announced a device
        class of its own): reference latencies, its own price, power and memory. The
        estimator then learns its real speed from the batches it runs."""
        cls = DeviceClass(
            name=name,
            kind="cpu",
            price_per_hour=price_per_hour,
            watts_busy=watts_busy,
            watts_idle=watts_busy / 3,
            memory_gb=memory_gb,
            load_gbps=4.0,
            net_gbps=1.0,
            # kinds nobody profiled get a generic model; the estimator corrects it
            latency={**dict.fromkeys(kinds, GENERIC), **self.reference},
        )
        classes = {**self.classes, name: cls}
        kinds = tuple(sorted({k for c in classes.values() for k in c.latency}))
        return replace(self, classes=classes, kinds=kinds)


def parse_fleet(data: Mapping[str, Any]) -> Fleet:
    """YAML shape (see configs/fleet/default.yaml):

    reference: {<kind>: {fixed_s, per_item_s, max_batch}}   # on a speed-1.0 device
    classes:
      <name>: {kind, price_per_hour, watts_busy, watts_idle, memory_gb, speed,
               speed_by_kind: {<kind>: speed},  # where one number cannot be right
               load_gbps, net_gbps, runs: [kinds] (default: all), batch_scale,
               latency: {<kind>: {...}}  # an override of the scaled reference}

    `speed` scales the reference for every kind the class runs, `speed_by_kind` for the
    kinds it names: decoding follows memory bandwidth, a forward or training pass dense
    tensor throughput, and the two rank GPUs differently (configs/fleet/SOURCES.md).
    """
    ref = {
        k: LatencyModel(float(v["fixed_s"]), float(v["per_item_s"]), int(v["max_batch"]))
        for k, v in (data.get("reference") or {}).items()
    }
    classes: dict[str, DeviceClass] = {}
    for name, c in (data.get("classes") or {}).items():
        speed = float(c.get("speed", 1.0))
        if speed <= 0:
            raise ValueError(f"fleet class {name}: speed must be > 0")
        by_kind = {k: float(v) for k, v in (c.get("speed_by_kind") or {}).items()}
        for kind, v in by_kind.items():
            if v <= 0:
                raise ValueError(f"fleet class {name}: speed of {kind!r} must be > 0")
            if kind not in ref:
                raise ValueError(
                    f"fleet class {name}: speed_by_kind names {kind!r}, which has no "
                    "reference latency model to scale"
                )
        batch_scale = float(c.get("batch_scale", 1.0))
        runs = c.get("runs") or list(ref)
        latency: dict[str, LatencyModel] = {}
        for kind in runs:
            if kind not in ref and kind not in (c.get("latency") or {}):
                raise ValueError(f"fleet class {name}: no latency model for {kind!r}")
            if kind in ref:
                r, kind_speed = ref[kind], by_kind.get(kind, speed)
                latency[kind] = LatencyModel(
                    r.fixed_s / kind_speed,
                    r.per_item_s / kind_speed,
                    max(1, int(r.max_batch * batch_scale)),
                )
        for kind, v in (c.get("latency") or {}).items():
            latency[kind] = LatencyModel(
                float(v["fixed_s"]), float(v["per_item_s"]), int(v["max_batch"])
            )
        classes[name] = DeviceClass(
            name=name,
            kind=c.get("kind", "gpu"),
            price_per_hour=float(c["price_per_hour"]),
            watts_busy=float(c["watts_busy"]),
            watts_idle=float(c.get("watts_idle", 0.0)),
            memory_gb=float(c["memory_gb"]),
            load_gbps=float(c.get("load_gbps", 10.0)),
            net_gbps=float(c.get("net_gbps", 1.0)),
            latency=latency,
            min_size_factor=float(c.get("min_size_factor", 0.0)),
        )
    kinds = tuple(sorted({k for c in classes.values() for k in c.latency}))
    ref_gb = {k: float(v) for k, v in (data.get("ref_model_gb") or {}).items()}
    return Fleet(classes=classes, kinds=kinds, reference=ref, ref_model_gb=ref_gb)


def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(yaml.safe_load(Path(path).read_text()))


@dataclass
class _Fit:
    """Exponentially forgetting least squares of seconds ~ fixed + per_item * n."""

    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0


@dataclass
class LatencyEstimator:
    """Starts from the fleet's profiles and refines each (class, kind) model from
    observed batch durations, so a profile that was wrong (or a slow host) stops
    misleading the scheduler after a few batches.

    The prior counts as `prior_weight` observations at batch sizes 1 and max_batch;
    older observations fade by `decay` per new one."""

    fleet: Fleet
    decay: float = 0.95
    prior_weight: float = 2.0
    _fits: dict[tuple[str, str], _Fit] = field(default_factory=dict)
    _cache: dict[tuple[str, str], LatencyModel] = field(default_factory=dict)
    # bumped whenever a model changes; per kind, the version that last changed it (so a
    # reader refreshes only the kinds that moved)
    version: int = 0
    changed: dict[str, int] = field(default_factory=dict)

    def model(self, device_class: str, kind: str) -> LatencyModel | None:
        key = (device_class, kind)
        if key in self._cache:
            return self._cache[key]
        base = self.fleet.classes[device_class].latency.get(kind)
        return base

    def observe(self, device_class: str, kind: str, n: int, seconds: float) -> None:
        base = self.fleet.classes[device_class].latency.get(kind)
        if base is None or n <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        key = (device_class, kind)
        fit = self._fits.get(key)
        if fit is None:
            fit = self._fits[key] = _Fit()
            for x in (1, base.max_batch):
                self._add(fit, float(x), base.seconds(x), self.prior_weight)
        for attr in ("w", "sx", "sy", "sxx", "sxy"):
            setattr(fit, attr, getattr(fit, attr) * self.decay)
        self._add(fit, float(n), seconds, 1.0)
        var = fit.sxx - fit.sx * fit.sx / fit.w
        if var <= 1e-12:
            return
        per_item = (fit.sxy - fit.sx * fit.sy / fit.w) / var
        fixed = (fit.sy - per_item * fit.sx) / fit.w
        # Keep the line on the data when the sizes barely vary (nearly all batches full):
        # a steep slope with a negative intercept is refitted through the origin, a
        # falling one becomes flat at the mean; clipping the intercept alone would keep
        # the steep slope and overshoot at the sizes actually run.
        if fixed < 0:
            fixed, per_item = 0.0, fit.sxy / max(fit.sxx, 1e-12)
        elif per_item <= 0:
            fixed, per_item = fit.sy / fit.w, 1e-9
        self._cache[key] = replace(base, fixed_s=fixed, per_item_s=max(1e-9, per_item))
        self.version += 1
        self.changed[kind] = self.version

    @staticmethod
    def _add(fit: _Fit, x: float, y: float, weight: float) -> None:
        fit.w += weight
        fit.sx += weight * x
        fit.sy += weight * y
        fit.sxx += weight * x * x
        fit.sxy += weight * x * y
