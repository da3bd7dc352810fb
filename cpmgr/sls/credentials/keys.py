"""What every provider returns (keys and when they expire) and the one interface they share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from cpmgr.errors import CpmgrError
from cpmgr.sls.signer import Credentials

Source = Literal["static", "file", "oidc", "ecs_ram_role", "uri"]
# Keys this close to their expiry count as expired: a request signed now must still be valid
# when SLS reads it, whatever the clock skew and the time in queues.
EXPIRY_MARGIN_SECONDS = 10.0
# The largest answer a credentials service may send: a few hundred bytes are expected.
MAX_ANSWER_BYTES = 64 * 1024
_MAX_REASON_CHARS = 300


class CredentialsFetchError(CpmgrError):
    """A provider could not get keys; the message never holds a secret or a token."""


@dataclass(frozen=True)
class IssuedKeys:
    """Keys from a provider, and the unix time they expire at (None: they do not expire)."""

    credentials: Credentials
    expires_at: float | None = None

    def usable_at(self, now: float) -> bool:
        """Whether the keys may still be sent at wall-clock time `now`."""
        return self.expires_at is None or now < self.expires_at - EXPIRY_MARGIN_SECONDS

    @property
    def expiration_text(self) -> str | None:
        return None if self.expires_at is None else format_expiration(self.expires_at)


class Provider(Protocol):
    """One source of keys. `fetch` may do network I/O; it raises CredentialsFetchError."""

    @property
    def source(self) -> Source: ...

    async def fetch(self) -> IssuedKeys: ...

    async def close(self) -> None: ...


class LocalProvider(Provider, Protocol):
    """A source read without the network (static keys, a file): cheap enough to check on a
    request's path, so a rotated file is used by the very next request."""

    def read(self) -> IssuedKeys: ...

    def changed(self) -> bool:
        """Whether `read` would now give something new (the file's mtime moved)."""
        ...


def parse_expiration(text: object) -> float:
    """Unix time from `Expiration`, `%Y-%m-%dT%H:%M:%SZ` in UTC as the SDKs parse it."""
    if not isinstance(text, str):
        raise CredentialsFetchError("the answer has no Expiration")
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        message = f"Expiration {text[:40]!r} is not like 2024-01-02T03:04:05Z"
        raise CredentialsFetchError(message) from None
    return moment.timestamp()


def format_expiration(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def keys_from_document(document: object, *, where: str, expiring: bool = True) -> IssuedKeys:
    """`AccessKeyId`/`AccessKeySecret`/`SecurityToken`/`Expiration` from a JSON object."""
    if not isinstance(document, dict):
        raise CredentialsFetchError(f"{where}: the answer is not a JSON object")
    values = [document.get(name) for name in ("AccessKeyId", "AccessKeySecret", "SecurityToken")]
    if not all(isinstance(value, str) and value for value in values):
        raise CredentialsFetchError(
            f"{where}: the answer lacks AccessKeyId, AccessKeySecret or SecurityToken"
        )
    key_id, secret, token = (str(value) for value in values)
    expires_at = parse_expiration(document.get("Expiration")) if expiring else None
    return IssuedKeys(Credentials(key_id, secret, token), expires_at)


def json_answer(body: bytes, *, where: str) -> object:
    try:
        return json.loads(body)
    except ValueError:
        raise CredentialsFetchError(f"{where}: the answer is not JSON") from None


def reason(text: str, *secrets: str) -> str:
    """A server's words, bounded, with anything secret taken out."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."
