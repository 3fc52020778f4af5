"""Tenant credentials: a nats-server config with per-user permissions, and credentials files.

`flowmesh auth init --tenants a,b --out DIR` writes

* `DIR/nats-server.conf`: users and what each may do. The internal user `fabric` (engine
  and workers) may do everything; tenant `a`'s user may publish only to `fm.api.a.>` (the
  gateway, engine/gateway.py) and subscribe only to its own inbox `_INBOX.a.>`: no
  JetStream API, no KV, no object store, no internal subject. Passwords are stored as
  bcrypt hashes, so the config holds no secret.
* `DIR/creds/fabric.json` and `DIR/creds/<tenant>.json`: user, password (and for a tenant
  its name and the server URL), readable by their owner only. Give each tenant its file.

Plain user/password is what nats-py and nats-server both support with no extra packages
or operator/JWT setup; credentials travel to NATS in the URL's userinfo (never in argv or
logs: use `redact_url`). Running init again keeps every existing password and adds the new
tenants, so credentials already handed out stay valid.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import bcrypt
import click
import msgspec

from flowmesh.topics import subjects
from flowmesh.topics.config.creds import Creds, CredsError, load_creds
from flowmesh.topics.config.settings import Settings

FABRIC_USER = "fabric"
TENANT_USER_PREFIX = "tenant-"
CONFIG_NAME = "nats-server.conf"
CREDS_DIR = "creds"
# nats-server checks a bcrypt hash on every connect, failed ones included: at cost 10 a
# stream of wrong passwords for a known user burned 60 ms of server CPU each (200: 12 s).
# The passwords are 192 random bits (secrets.token_urlsafe(24)), which no guessing
# reaches whatever the cost, so key stretching buys nothing here: the minimum cost keeps
# a failed login at ~1 ms. (A password typed by a person would need the opposite.)
BCRYPT_ROUNDS = 4
PASSWORD_BYTES = 24
_GENERATED_LEN = len(secrets.token_urlsafe(PASSWORD_BYTES))
# what no tenant may touch even if an allow rule were widened by hand
_INTERNAL = ["$JS.>", "$KV.>", "$O.>", "$SYS.>"]


def tenant_user(tenant: str) -> str:
    return TENANT_USER_PREFIX + subjects.check_tenant(tenant)


def tenant_permissions(tenant: str) -> dict[str, dict[str, list[str]]]:
    """A tenant may ask the gateway, under its own name, and read the answers."""
    return {
        "publish": {"allow": [subjects.api_of_tenant(tenant)], "deny": _INTERNAL},
        "subscribe": {
            "allow": [subjects.tenant_inbox_prefix(tenant) + ".>"],
            "deny": [*_INTERNAL, "fm.>"],
        },
    }


@dataclass(frozen=True)
class AuthFiles:
    config: Path
    fabric: Path
    tenants: dict[str, Path]


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def _user_entry(
    user: str, password_hash: str, perms: dict[str, dict[str, list[str]]] | None
) -> str:
    # JSON string literals are valid nats-server config strings, and quoting keeps the
    # "$" of a bcrypt hash from being read as a variable reference
    entry = f"    {{user: {json.dumps(user)}, password: {json.dumps(password_hash)}"
    if perms is not None:
        entry += f",\n      permissions: {json.dumps(perms)}"
    return entry + "}"


def _write_private(path: Path, text: str) -> None:
    """Write `path` 0600 from the start (never readable by others, not even for a
    moment), as a new file renamed over it: a symlink planted at `path` is replaced, not
    followed into whatever it points at."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _private_dir(path: Path) -> None:
    """`path` as a directory of ours that nobody else can write into; a symlink there
    (planted to send the credentials elsewhere) is refused."""
    if path.is_symlink():
        raise CredsError(f"{path} is a symbolic link; refusing to write credentials through it")
    path.mkdir(parents=True, exist_ok=True)
    st = path.lstat()
    if st.st_uid != os.getuid():
        raise CredsError(f"{path} belongs to another user; refusing to write credentials there")
    os.chmod(path, 0o700)


def _password_for(path: Path, user: str) -> str:
    """The password already handed out in `path`, or a new one. An existing file is
    trusted only if it is ours, private, not a link, and holds a password as we generate
    them: one planted by someone else (a password they know) is replaced."""
    if path.is_symlink() or path.exists():
        st = path.lstat()
        planted = path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077 != 0
        creds = None if planted else load_creds(path)
        if creds is not None and creds.user != user:
            raise CredsError(f"{path} holds credentials of {creds.user!r}, not {user!r}")
        if creds is not None and _looks_generated(creds.password):
            return creds.password
        click.echo(f"replacing the password in {path}: not one this tool wrote", err=True)
    # URL-safe: it goes into a URL's userinfo as is
    return secrets.token_urlsafe(PASSWORD_BYTES)


def _looks_generated(password: str) -> bool:
    return len(password) >= _GENERATED_LEN and all(
        c.isascii() and (c.isalnum() or c in "-_") for c in password
    )


def init_auth(tenants: list[str], out: Path, url: str) -> AuthFiles:
    """Write the server config and one credentials file per user (see the module doc)."""
    if not tenants:
        raise CredsError("give at least one tenant")
    for t in tenants:
        try:
            subjects.check_tenant(t)
        except ValueError as exc:
            raise CredsError(str(exc)) from exc
    if len(set(tenants)) != len(tenants):
        raise CredsError(f"tenants listed twice: {', '.join(tenants)}")
    out.mkdir(parents=True, exist_ok=True)
    creds_dir = out / CREDS_DIR
    _private_dir(creds_dir)

    fabric_path = creds_dir / f"{FABRIC_USER}.json"
    fabric = Creds(user=FABRIC_USER, password=_password_for(fabric_path, FABRIC_USER), url=url)
    entries = [_user_entry(FABRIC_USER, _hash(fabric.password), None)]
    tenant_creds: dict[str, tuple[Path, Creds]] = {}
    # tenants from an earlier init stay: their users must not lose access
    known = sorted({*tenants, *(p.stem for p in creds_dir.glob("*.json") if p.stem != FABRIC_USER)})
    for t in known:
        path = creds_dir / f"{t}.json"
        user = tenant_user(t)
        creds = Creds(user=user, password=_password_for(path, user), tenant=t, url=url)
        tenant_creds[t] = (path, creds)
        entries.append(_user_entry(user, _hash(creds.password), tenant_permissions(t)))

    host = urlparse(url).hostname or "127.0.0.1"
    port = urlparse(url).port or 4222
    config = (
        "# FlowMesh: written by `flowmesh auth init`; users and their permissions.\n"
        "# Run: nats-server -c THIS_FILE -sd STORE_DIR, or let flowmesh up start it:\n"
        "# flowmesh up --nats-config THIS_FILE --creds creds/fabric.json\n"
        f"listen: {json.dumps(f'{host}:{port}')}\n"
        # the store directory is left to -sd: a store_dir here and -sd would clash
        "jetstream: enabled\n"
        "authorization {\n  users = [\n" + ",\n".join(entries) + "\n  ]\n}\n"
    )
    config_path = out / CONFIG_NAME
    _write_private(config_path, config)
    _write_private(fabric_path, msgspec.json.encode(fabric).decode() + "\n")
    for path, creds in tenant_creds.values():
        _write_private(path, msgspec.json.encode(creds).decode() + "\n")
    return AuthFiles(
        config=config_path, fabric=fabric_path, tenants={t: p for t, (p, _) in tenant_creds.items()}
    )


# --- `flowmesh auth` ------------------------------------------------------------------


@click.group("auth")
def auth_group() -> None:
    """Tenant credentials for a nats-server that enforces them."""


@auth_group.command("init")
@click.option("--tenants", required=True, help="comma-separated tenant names, e.g. acme,globex")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="directory for nats-server.conf and creds/ (existing credentials are kept)",
)
@click.option(
    "--url",
    default=lambda: Settings.load().nats,
    show_default="$FLOWMESH_NATS or nats://127.0.0.1:4222",
    help="the server's address: where the config listens and what credentials point at",
)
def init_command(tenants: str, out: Path, url: str) -> None:
    """Write a nats-server config with per-tenant permissions, and credentials files."""
    names = [t.strip() for t in tenants.split(",") if t.strip()]
    try:
        files = init_auth(names, out, url)
    except CredsError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"server config: {files.config}")
    click.echo(f"fabric (engine, workers): {files.fabric}")
    for tenant, path in files.tenants.items():
        click.echo(f"tenant {tenant}: {path}")
