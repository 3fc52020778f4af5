"""The one codec for everything FlowMesh puts on the bus or hashes.

Bus messages are msgspec Structs encoded as JSON (readable with the `nats` CLI).
Hash inputs use the *canonical* form: JSON with sorted keys, no whitespace, so the same
content gives the same bytes on every machine and Python version. Content digests are
SHA-256 of those bytes (or of a blob's raw bytes), hex encoded.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

# Matched with fullmatch, never match: `$` also matches before a trailing newline, and a
# digest with a newline on its end would name a second object for the same content.
DIGEST_RE = re.compile(r"[0-9a-f]{64}")

_encoder = msgspec.json.Encoder()
_canonical_encoder = msgspec.json.Encoder(order="sorted")


class DecodeError(ValueError):
    """A message could not be decoded into its schema. Carries a reason for dead letters."""


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, typ: type[T]) -> T:
    """`data` as `typ`, or DecodeError with the reason: the only error bad bytes give."""
    try:
        return msgspec.json.decode(data, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"cannot decode {typ.__name__}: {exc}") from exc
    except (RecursionError, UnicodeDecodeError) as exc:
        # msgspec raises these, not DecodeError, for JSON nested ~1000 deep (2 kB of
        # brackets) and for a key that is not UTF-8 (b'{"\x80":'). Left as they are they
        # escape every consumer's dead-letter path and the message comes back forever.
        raise DecodeError(f"cannot decode {typ.__name__}: {exc}") from exc


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: the only serialisation that is ever hashed."""
    return _canonical_encoder.encode(obj)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    """Content digest of a JSON-able value (a record, a manifest, an operator spec)."""
    return sha256_hex(canonical(obj))


def is_digest(value: object) -> bool:
    """A SHA-256 hex digest: exactly 64 lowercase hex characters, nothing else."""
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def convert(obj: Any, typ: type[T]) -> T:
    """Validate plain data (e.g. parsed YAML) into a schema type."""
    try:
        return msgspec.convert(obj, type=typ)
    except msgspec.ValidationError as exc:
        raise DecodeError(str(exc)) from exc
    except RecursionError as exc:  # see decode
        raise DecodeError(f"nested too deeply: {exc}") from exc
