"""FlowMesh credentials files (written by `flowmesh auth init`, engine/auth.py) and how a
NATS URL carries them. Here because engine and workers both read them, and workers never
import the engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import msgspec

from flowmesh.topics import subjects


class CredsError(ValueError):
    """A credentials file that is missing or not one."""


class Creds(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    user: str
    password: str
    tenant: str | None = None  # set for a tenant's credentials: its gateway identity
    url: str | None = None  # the server these credentials are for


def load_creds(path: str | Path) -> Creds:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredsError(f"cannot read credentials file {path}: {exc}") from exc
    try:
        creds = msgspec.json.decode(data, type=Creds)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CredsError(f"{path} is not a FlowMesh credentials file: {exc}") from exc
    if creds.tenant is not None:
        try:
            subjects.check_tenant(creds.tenant)
        except ValueError as exc:
            raise CredsError(f"{path}: {exc}") from exc
    return creds


def _each_server(url: str, one: Callable[[str], str]) -> str:
    # a cluster's URL lists every server, comma-separated (Bus.connect splits it)
    return ",".join(one(u.strip()) for u in url.split(","))


def url_with_creds(url: str, creds: Creds) -> str:
    """The URL with the credentials as its userinfo (how nats-py takes user/password),
    on every server of a comma-separated cluster URL."""
    if "," in url:
        return _each_server(url, lambda u: url_with_creds(u, creds))
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    netloc = f"{creds.user}:{creds.password}@{host}"
    if parsed.port:
        netloc += f":{parsed.port}"
    return urlunparse(parsed._replace(netloc=netloc))


def resolve_url(url: str, creds_path: str | Path | None) -> str:
    """`url` with the credentials of `creds_path` applied (unchanged without a file)."""
    if not creds_path:
        return url
    return url_with_creds(url, load_creds(creds_path))


def redact_url(url: str) -> str:
    """The URL fit for a log line: any password replaced (on every server of a cluster)."""
    if "," in url:
        return _each_server(url, redact_url)
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username}:***@{parsed.hostname}"
    if parsed.port:
        netloc += f":{parsed.port}"
    return urlunparse(parsed._replace(netloc=netloc))
