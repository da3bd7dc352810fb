"""Where request signing gets its keys: the config, or a credentials file that rotates (STS)."""

from __future__ import annotations

import logging
import os

from cpmgr.config import SLSConfig, load_credentials_file
from cpmgr.sls.signer import Credentials

log = logging.getLogger(__name__)


class CredentialsProvider:
    """Callable returning the current credentials; re-reads `credentials_file` when it changes.

    A broken or missing file keeps the last good keys (and says so once per change), so a
    half-written rotation never stops commits that the old keys could still sign.
    """

    def __init__(self, sls: SLSConfig) -> None:
        self._static = sls.credentials
        self._path = sls.credentials_file
        self._current = self._static
        self._seen_mtime: int | None = None
        self._force_reload = False
        if self._path:
            self._reload(self._mtime())

    def __call__(self) -> Credentials:
        if self._path:
            mtime = self._mtime()
            if self._force_reload or mtime != self._seen_mtime:
                self._reload(mtime)
        return self._current

    def invalidate(self) -> None:
        """Re-read the file before the next request (after a credentials or clock failure)."""
        self._force_reload = True

    def update(self, sls: SLSConfig) -> None:
        """Swap in credentials from a reloaded config."""
        self._static = sls.credentials
        self._path = sls.credentials_file
        self._current = self._static
        self._seen_mtime = None
        if self._path:
            self._reload(self._mtime())

    def _mtime(self) -> int | None:
        assert self._path is not None
        try:
            return os.stat(self._path).st_mtime_ns
        except OSError:
            return None

    def _reload(self, mtime: int | None) -> None:
        assert self._path is not None
        self._force_reload = False
        self._seen_mtime = mtime
        try:
            fresh = load_credentials_file(self._path)
        except ValueError as exc:
            log.error("credentials file unusable, keeping the previous keys: %s", exc)
            return
        if fresh != self._current:
            log.info("credentials loaded from %s (key id %s)", self._path, fresh.access_key_id)
        self._current = fresh
