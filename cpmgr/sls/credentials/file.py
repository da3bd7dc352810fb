"""A JSON credentials file that something else rotates (an STS agent, a mounted Secret)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cpmgr.sls.credentials.keys import (
    CredentialsFetchError,
    IssuedKeys,
    Source,
    parse_expiration,
)
from cpmgr.sls.signer import Credentials

_CREDENTIAL_KEYS = {
    "access_key_id": ("AccessKeyId", "access_key_id"),
    "access_key_secret": ("AccessKeySecret", "access_key_secret"),
    "security_token": ("SecurityToken", "security_token"),
}
_EXPIRATION_KEYS = ("Expiration", "expiration")


def load_credentials_file(path: str | Path) -> IssuedKeys:
    """Keys (and their `Expiration`, if any) from a JSON file; CredentialsFetchError, without
    any secret in it, if the file is unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CredentialsFetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise CredentialsFetchError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CredentialsFetchError(f"{path} must hold a JSON object")
    values = {name: _first(data, keys) for name, keys in _CREDENTIAL_KEYS.items()}
    if not values["access_key_id"] or not values["access_key_secret"]:
        raise CredentialsFetchError(f"{path} needs AccessKeyId and AccessKeySecret")
    expiration = _first(data, _EXPIRATION_KEYS)
    try:
        expires_at = parse_expiration(expiration) if expiration else None
    except CredentialsFetchError as exc:
        raise CredentialsFetchError(f"{path}: {exc}") from None
    return IssuedKeys(Credentials(**values), expires_at)


def _first(data: dict[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


class FileProvider:
    """Reads the file again whenever its mtime changes (checked before every request)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen_mtime: int | None = None

    @property
    def source(self) -> Source:
        return "file"

    def changed(self) -> bool:
        return self._mtime() != self._seen_mtime

    def read(self) -> IssuedKeys:
        self._seen_mtime = self._mtime()
        return load_credentials_file(self.path)

    async def fetch(self) -> IssuedKeys:
        return self.read()

    async def close(self) -> None:
        return None

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None
