"""One settings object for the CLI, the engine, the workers and the client.

Every value comes from, in this order: a flag (the caller passes it), the environment
(`FLOWMESH_*`), a settings file (TOML: `--config`, `$FLOWMESH_CONFIG`, or `flowmesh.toml`
in the working directory), the default. Nothing here writes the environment: a process
that starts others (`flowmesh up`) hands them its settings as flags.

    settings = Settings.load({"nats": "nats://10.0.0.5:4222"})   # flags win
    settings.cas_url      # file:///abs/.flowmesh/cas unless cas is set

`VARIABLES` is the table of every variable, what it sets and its default; the README's
table is generated from it (`flowmesh settings`) and a test keeps them equal.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flowmesh.topics.errors import FlowMeshError


@dataclass(frozen=True)
class Variable:
    field: str
    env: str
    default: Any
    help: str
    kind: type = str
    low: int | None = None
    high: int | None = None
    choices: tuple[str, ...] = ()


VARIABLES: tuple[Variable, ...] = (
    Variable("nats", "FLOWMESH_NATS", "nats://127.0.0.1:4222", "NATS server URL"),
    Variable(
        "data_dir",
        "FLOWMESH_DATA",
        ".flowmesh",
        "data directory: the local CAS, logs, models, the private nats-server's store "
        "(made absolute at start)",
    ),
    Variable(
        "cas",
        "FLOWMESH_CAS",
        "",
        "CAS URL: file:///path, nats: (JetStream object store) or s3://bucket/prefix?"
        "endpoint=host:port; empty: file://DATA_DIR/cas",
    ),
    Variable(
        "creds",
        "FLOWMESH_CREDS",
        "",
        "fabric credentials file (flowmesh auth init) for a server that requires them",
    ),
    Variable(
        "bus",
        "FLOWMESH_BUS",
        "nats",
        "the streams' bus (KV stays on NATS unless kv is kafka)",
        choices=("nats", "kafka"),
    ),
    Variable("kafka", "FLOWMESH_KAFKA", "127.0.0.1:9092", "Kafka bootstrap servers (--bus kafka)"),
    Variable(
        "kv",
        "FLOWMESH_KV",
        "nats",
        "where KV buckets live: nats, or kafka with bus kafka (compacted changelog "
        "topics; no process connects to NATS); `flowmesh up --kv` hands it to every process",
        choices=("nats", "kafka"),
    ),
    Variable(
        "scheduler",
        "FLOWMESH_SCHEDULER",
        "live",
        "live, or faust (a faust-streaming agent; needs bus kafka and the faust extra)",
        choices=("live", "faust"),
    ),
    Variable(
        "max_attempts",
        "FLOWMESH_MAX_ATTEMPTS",
        3,
        "runs of an operator that raises before it is committed failed (engine; travels "
        "with each operator)",
        kind=int,
        low=1,
    ),
    Variable(
        "max_reclaims",
        "FLOWMESH_MAX_RECLAIMS",
        6,
        "times an operator's worker may die under it before it is failed (engine; travels "
        "with each operator)",
        kind=int,
        low=3,
    ),
    Variable(
        "replicas",
        "FLOWMESH_REPLICAS",
        1,
        "stream and bucket replicas (3 on a 3-server NATS cluster); every component the same",
        kind=int,
        low=1,
        high=5,
    ),
    Variable(
        "metrics_port",
        "FLOWMESH_METRICS_PORT",
        0,
        "engine's Prometheus /metrics port (0: off)",
        kind=int,
        low=0,
        high=65535,
    ),
    Variable(
        "worker_metrics_port",
        "FLOWMESH_WORKER_METRICS_PORT",
        0,
        "a worker's Prometheus /metrics port (0: off)",
        kind=int,
        low=0,
        high=65535,
    ),
    Variable(
        "console_port",
        "FLOWMESH_CONSOLE_PORT",
        0,
        "engine's web console port (0: off)",
        kind=int,
        low=0,
        high=65535,
    ),
    Variable(
        "console_host", "FLOWMESH_CONSOLE_HOST", "127.0.0.1", "address the web console listens on"
    ),
    Variable("log_level", "FLOWMESH_LOG_LEVEL", "info", "debug, info, warning, error"),
    Variable(
        "log_json",
        "FLOWMESH_LOG_JSON",
        "",
        "1: JSON log lines, 0: human ones; empty: JSON unless stderr is a terminal",
        choices=("", "0", "1"),
    ),
    Variable(
        "connect_timeout",
        "FLOWMESH_CONNECT_TIMEOUT",
        5,
        "seconds a command or client tries to reach NATS before it gives up",
        kind=int,
        low=1,
    ),
    Variable(
        "parent_pid",
        "FLOWMESH_PARENT_PID",
        0,
        "set by flowmesh up for the processes it starts: each stops once that process is "
        "gone (topics/parent.py); 0: none",
        kind=int,
        low=0,
    ),
)
BY_FIELD = {v.field: v for v in VARIABLES}
CONFIG_ENV = "FLOWMESH_CONFIG"
CONFIG_FILE = "flowmesh.toml"


class SettingsError(FlowMeshError, ValueError):
    """A setting has a bad value; the message names where it came from."""

    code = "bad_setting"


@dataclass(frozen=True)
class Settings:
    nats: str = "nats://127.0.0.1:4222"
    data_dir: Path = Path(".flowmesh")
    cas: str = ""
    creds: str = ""
    bus: str = "nats"
    kafka: str = "127.0.0.1:9092"
    kv: str = "nats"
    scheduler: str = "live"
    max_attempts: int = 3
    max_reclaims: int = 6
    replicas: int = 1
    metrics_port: int = 0
    worker_metrics_port: int = 0
    console_port: int = 0
    console_host: str = "127.0.0.1"
    log_level: str = "info"
    log_json: str = ""
    connect_timeout: int = 5
    parent_pid: int = 0
    # the settings a flag, the environment or the file gave (the rest are defaults)
    given: frozenset[str] = frozenset()

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        file: str | Path | None = None,
    ) -> Settings:
        """Flags (None values are "not given") > environment > file > defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = file or env.get(CONFIG_ENV) or (CONFIG_FILE if Path(CONFIG_FILE).is_file() else None)
        if path:
            values.update(_from_file(Path(path)))
        for var in VARIABLES:
            raw = env.get(var.env, "")
            if raw.strip():
                values[var.field] = _check(var, raw.strip(), f"${var.env}")
        for name, value in (flags or {}).items():
            if value is None or name not in BY_FIELD:
                continue
            values[name] = _check(BY_FIELD[name], value, f"--{name.replace('_', '-')}")
        settings = cls(**{k: v for k, v in values.items() if k != "data_dir"})
        data_dir = Path(values.get("data_dir", settings.data_dir)).expanduser().resolve()
        return replace(settings, data_dir=data_dir, given=frozenset(values))

    def updated(self, **flags: Any) -> Settings:
        """These settings with the flags that are not None applied on top."""
        values = {
            k: _check(BY_FIELD[k], v, f"--{k.replace('_', '-')}")
            for k, v in flags.items()
            if v is not None
        }
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"]).expanduser().resolve()
        return replace(self, **values, given=self.given | frozenset(values))

    @property
    def cas_url(self) -> str:
        """The CAS this process uses: `cas`, or the data directory's (absolute)."""
        return self.cas or f"file://{self.data_dir / 'cas'}"

    @property
    def chosen_cas(self) -> str | None:
        """The CAS someone asked for (a CAS, or a data directory, given by a flag, the
        environment or the file); None when both are defaults, and a client should use
        the one the running fabric recorded (topics/store/fabric.py)."""
        if "cas" in self.given and self.cas:
            return self.cas
        if "data_dir" in self.given:
            return self.cas_url
        return None

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def flags(self) -> list[str]:
        """This object as command-line flags of `flowmesh engine` / `flowmesh-worker`
        (the settings both take), so a child process runs with exactly these."""
        out = ["--nats", self.nats, "--data-dir", str(self.data_dir), "--cas", self.cas_url]
        out += ["--bus", self.bus]
        if self.bus == "kafka":
            out += ["--kafka", self.kafka]
        if self.creds:
            out += ["--creds", self.creds]
        return out


def _check(var: Variable, raw: Any, source: str) -> Any:
    if var.kind is int:
        try:
            number = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{source}={raw!r} is not a whole number") from None
        if (var.low is not None and number < var.low) or (
            var.high is not None and number > var.high
        ):
            bounds = f"{var.low}..{var.high}" if var.high is not None else f"at least {var.low}"
            raise SettingsError(f"{source}={raw!r} must be {bounds}")
        return number
    text = str(raw)
    if var.field in ("bus", "kv", "scheduler"):
        text = text.strip().lower()
    if var.choices and text not in var.choices:
        raise SettingsError(f"{source}={raw!r} must be one of {', '.join(var.choices)}")
    return text


def _from_file(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"settings file {path}: {exc}") from exc
    unknown = sorted(set(doc) - set(BY_FIELD))
    if unknown:
        raise SettingsError(
            f"settings file {path}: unknown setting(s) {', '.join(unknown)} "
            f"(known: {', '.join(BY_FIELD)})"
        )
    values = {k: _check(BY_FIELD[k], v, f"{path}: {k}") for k, v in doc.items()}
    if "data_dir" in values and not Path(values["data_dir"]).expanduser().is_absolute():
        # relative to the file, not to wherever the command runs
        values["data_dir"] = str(path.resolve().parent / values["data_dir"])
    return values


def env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """$name as a whole number in [low, high], `default` when unset or empty; anything
    else is a ValueError naming the variable, so a typo stops a component at start."""
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}={raw!r} must be {bounds}")
    return value


# Read where they are used, not part of Settings: secrets (never a flag, never in a file
# this object prints), and the parts' own knobs.
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        CONFIG_ENV,
        "",
        f"the settings file (TOML, keys as in the setting column); default "
        f"`{CONFIG_FILE}` in the working directory when there is one",
    ),
    ("FLOWMESH_S3_ACCESS_KEY", "", "S3 CAS access key (or AWS_ACCESS_KEY_ID)"),
    ("FLOWMESH_S3_SECRET_KEY", "", "S3 CAS secret key (or AWS_SECRET_ACCESS_KEY)"),
    ("FLOWMESH_PLANNER_SHARD", "0", "`flowmesh planner`: the shard this process plans"),
    ("FLOWMESH_PLANNER_SHARDS", "1", "`flowmesh planner`: how many shards there are"),
    ("FLOWMESH_OP_WALL_S", "900", "a worker's wall-time limit for one operator, seconds"),
    (
        "FLOWMESH_OP_ABANDON_S",
        "30",
        "seconds past the wall-time limit a worker waits for code blocked in C, then fails it",
    ),
    ("FLOWMESH_CONSOLE_TOKEN", "", "the web console's operator token (a secret)"),
    ("FLOWMESH_CONSOLE_HOSTS", "", "more host names the console answers to (comma-separated)"),
    ("FLOWMESH_METRICS_HOST", "127.0.0.1", "address the Prometheus exporters listen on"),
    ("FLOWMESH_METRICS_TOKEN", "", "bearer token /metrics asks for (a secret)"),
    (
        "FLOWMESH_TENANT_RPS",
        "50",
        "gateway: a tenant's sustained requests per second (split among live gateways)",
    ),
    ("FLOWMESH_TENANT_BURST", "100", "gateway: a tenant's requests at once above the rate"),
    ("FLOWMESH_TENANT_CONCURRENT", "8", "gateway: a tenant's requests in progress at once"),
    (
        "FLOWMESH_TENANT_OPS_IN_FLIGHT",
        "200000",
        "gateway: operators of a tenant's running workflows",
    ),
    ("FLOWMESH_TENANT_WORKFLOWS", "100", "gateway: a tenant's running workflows"),
    (
        "FLOWMESH_TENANT_STORED_BYTES",
        str(10 * 1024**3),
        "gateway: bytes a tenant's datasets and outputs may take (as JSON)",
    ),
    ("FLOWMESH_SHARE_TENANTS", "", "gateway tenants allowed global dedup (comma-separated)"),
)


def settings_table() -> str:
    """The README's table of every variable (Markdown); `flowmesh settings --table`."""
    lines = ["| variable | setting | default | what it sets |", "|---|---|---|---|"]
    for v in VARIABLES:
        default = f"`{v.default}`" if v.default not in ("", None) else "(empty)"
        lines.append(f"| `{v.env}` | `{v.field}` | {default} | {v.help} |")
    for env, default, help_text in OTHER_VARIABLES:
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `{env}` | | {shown} | {help_text} |")
    return "\n".join(lines) + "\n"


assert {f.name for f in fields(Settings)} - {"given"} == set(BY_FIELD), "VARIABLES differ"
