"""The one owner of the current keys: it fetches them in the background before they expire,
backs off when a source fails, and never hands out keys about to expire.

Callers (the committer, membership heartbeats, lag reads) call it for the current keys on
every request; it answers at once from memory, or raises the credentials-class SLSError
`CredentialsUnavailable` / `CredentialsExpired`, which they treat as any credentials failure
(the value stays pending, never dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cpmgr.backoff import backoff_delay
from cpmgr.config import SLSConfig
from cpmgr.errors import SLSError
from cpmgr.sls.credentials.chain import (
    MetadataProbe,
    build_provider,
    choose_source,
    present_without_probe,
    probe_metadata,
)
from cpmgr.sls.credentials.file import FileProvider
from cpmgr.sls.credentials.keys import (
    EXPIRY_MARGIN_SECONDS,
    CredentialsFetchError,
    IssuedKeys,
    LocalProvider,
    Provider,
    Source,
    format_expiration,
)
from cpmgr.sls.credentials.static import StaticProvider
from cpmgr.sls.signer import Credentials

log = logging.getLogger(__name__)

UNAVAILABLE = "CredentialsUnavailable"
EXPIRED = "CredentialsExpired"


@dataclass(frozen=True)
class RefreshTiming:
    """When to refresh: `early` before expiry (at most `max_early`, up to `jitter` more, so
    many daemons do not ask at once), never twice within `min_interval`, and after a failure
    `min_interval` plus a backoff of at most `max_backoff`."""

    min_interval: float = 5.0
    max_early: float = 300.0
    jitter: float = 0.2
    initial_backoff: float = 2.5
    max_backoff: float = 25.0

    def after_success(self, remaining: float, rng: Callable[[], float]) -> float:
        """Seconds until the next refresh of keys with `remaining` seconds to live."""
        early = min(remaining / 2, self.max_early) * (1 + self.jitter * rng())
        return max(self.min_interval, remaining - early)

    def after_failure(self, failures: int, rng: Callable[[], float]) -> float:
        """Seconds until the next attempt after `failures` failures in a row."""
        backoff = backoff_delay(
            failures, initial=self.initial_backoff, maximum=self.max_backoff, rng=rng
        )
        return self.min_interval + backoff


class CredentialsObserver(Protocol):
    def credentials_refreshed(self, source: str, result: str) -> None: ...


class _NullObserver:
    def credentials_refreshed(self, source: str, result: str) -> None:
        return None


class CredentialsRefresher:
    """Callable returning the current keys; `start()` runs its background refresh task."""

    def __init__(
        self,
        sls: SLSConfig,
        *,
        observer: CredentialsObserver | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        probe: MetadataProbe = probe_metadata,
        timing: RefreshTiming = RefreshTiming(),
    ) -> None:
        self._sls = sls
        self._observer: CredentialsObserver = observer or _NullObserver()
        self._env = os.environ if env is None else env
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng
        self._probe = probe
        self._timing = timing
        self._provider: Provider | None = None
        self._local: LocalProvider | None = None
        self._retired: list[Provider] = []
        self._keys: IssuedKeys | None = None
        self._generation = 0
        self._force_local = False
        self._failures = 0
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._last_attempt: float | None = None
        self._due = monotonic()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._select_without_probe()

    # ------------------------------------------------------------------ the request path

    def __call__(self) -> Credentials:
        """The keys to sign the next request with; SLSError (credentials class) if none."""
        local = self._local
        if local is not None and (self._force_local or local.changed()):
            self._read_local(local)
        keys = self._keys
        if keys is None:
            raise SLSError(UNAVAILABLE, 0, self._unavailable_reason())
        if not keys.usable_at(self._clock()):
            raise SLSError(EXPIRED, 0, self._expired_reason(keys))
        return keys.credentials

    def invalidate(self) -> None:
        """SLS refused the keys: get them again soon (at most every `min_interval`)."""
        if self._local is not None:
            self._force_local = True
            return
        if self._failures or self._provider is None:
            return  # already retrying on its backoff
        self._due = min(self._due, self._earliest_attempt())
        self._wakeup.set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Choose the source (probing the metadata service for `auto` if it must), get the
        first keys (a failure is logged and retried, not raised), start the background task.
        Raises CredentialsFetchError when `auto` finds no source at all."""
        if self._task is not None:
            return
        if self._provider is None:
            await self._select()
        if self._keys is None and self._local is None:
            await self._refresh()
        self._task = asyncio.create_task(self._run(), name="cpmgr-credentials")

    async def close(self) -> None:
        """Stop refreshing and close the providers' connections (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        providers = [*self._retired, *([self._provider] if self._provider else [])]
        self._retired.clear()
        for provider in providers:
            await provider.close()

    def update(self, sls: SLSConfig) -> None:
        """A reloaded config: choose again if anything about credentials changed; the current
        keys serve until the new source has given its first."""
        changed = sls.credentials_settings != self._sls.credentials_settings
        self._sls = sls
        if not changed:
            return
        self._generation += 1
        if self._provider is not None:
            self._retired.append(self._provider)
        self._provider = self._local = None
        self._failures = 0
        self._due = self._earliest_attempt()
        self._wakeup.set()
        self._select_without_probe()
        log.info("credentials settings changed: %s", self.describe())

    # ------------------------------------------------------------------ what status shows

    def describe(self) -> str:
        """One line for the log: `oidc (chosen by auto), key id STS.x, expire at ...`."""
        keys = self._keys
        text = f"{self.source or 'not chosen yet'} ({self._how_chosen()})"
        if keys is not None:
            text += f", key id {keys.credentials.access_key_id}"
        if keys is not None and keys.expires_at is not None:
            text += f", expire at {keys.expiration_text}"
        return text

    @property
    def source(self) -> Source | None:
        return None if self._provider is None else self._provider.source

    @property
    def expires_at(self) -> float | None:
        return None if self._keys is None else self._keys.expires_at

    def status(self) -> dict[str, object]:
        """Source, key id, expiry and the last failure: never a secret or a token."""
        keys = self._keys
        now = self._clock()
        return {
            "source": self.source,
            "chosen_by": "auto" if self._sls.credentials == "auto" else "config",
            "access_key_id": keys.credentials.access_key_id if keys else None,
            "expires_at": keys.expiration_text if keys else None,
            "valid": keys is not None and keys.usable_at(now),
            "last_refresh": format_expiration(self._last_success) if self._last_success else None,
            "refresh_failures": self._failures,
            "last_error": self._last_error,
        }

    # ------------------------------------------------------------------ choosing

    def _select_without_probe(self) -> None:
        sls = self._sls
        source = sls.credentials if sls.credentials != "auto" else present_without_probe(sls)
        if source is not None:
            self._use(build_provider(source, sls))

    async def _select(self) -> None:
        source = await choose_source(self._sls, env=self._env, probe=self._probe)
        self._use(build_provider(source, self._sls))

    def _use(self, provider: Provider) -> None:
        self._provider = provider
        local = provider if isinstance(provider, StaticProvider | FileProvider) else None
        self._local = local
        if local is not None:
            self._read_local(local, quiet=self._task is None)

    def _how_chosen(self) -> str:
        return "chosen by auto" if self._sls.credentials == "auto" else "sls.credentials"

    # ------------------------------------------------------------------ refreshing

    async def _run(self) -> None:
        while True:
            await self._until_due()
            for provider in self._retired:
                await provider.close()
            self._retired.clear()
            await self._refresh()

    async def _until_due(self) -> None:
        while (delay := self._due - self._monotonic()) > 0:
            self._wakeup.clear()
            if math.isinf(delay):  # keys that never expire: until invalidate() or a reload
                await self._wakeup.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    async def _refresh(self) -> None:
        generation = self._generation
        self._last_attempt = self._monotonic()
        if self._local is not None:
            self._read_local(self._local)
            return
        try:
            if self._provider is None:
                await self._select()
            provider = self._provider
            assert provider is not None
            keys = await provider.fetch()
        except CredentialsFetchError as exc:
            if generation == self._generation:
                self._failed(str(exc))
            return
        except Exception as exc:  # a bug must not end refreshing for good
            log.exception("credentials refresh: unexpected error")
            self._failed(f"unexpected {type(exc).__name__}")
            return
        if generation == self._generation:  # not from a source a reload replaced meanwhile
            self._succeeded(provider.source, keys)

    def _succeeded(self, source: Source, keys: IssuedKeys) -> None:
        self._keys = keys
        self._failures = 0
        self._last_error = None
        self._last_success = self._clock()
        self._observer.credentials_refreshed(source, "success")
        if keys.expires_at is None:
            # A source giving keys that never expire is asked again only when SLS refuses them.
            log.info("credentials from %s: key id %s", source, keys.credentials.access_key_id)
            self._due = float("inf")
            return
        remaining = keys.expires_at - self._clock()
        self._due = self._monotonic() + self._timing.after_success(remaining, self._rng)
        log.info(
            "credentials refreshed from %s: key id %s, expire at %s, next refresh in %.0fs",
            source,
            keys.credentials.access_key_id,
            keys.expiration_text,
            self._due - self._monotonic(),
        )

    def _failed(self, reason: str) -> None:
        source = self.source or "auto"
        self._failures += 1
        self._last_error = reason
        self._observer.credentials_refreshed(source, "failure")
        self._due = self._monotonic() + self._timing.after_failure(self._failures, self._rng)
        keys = self._keys
        if keys is not None and keys.usable_at(self._clock()):
            keeping = f"keeping the current keys (usable until {self._usable_until(keys)})"
        else:
            keeping = "no usable keys: commits, heartbeats and lag reads wait"
        log.error(
            "credentials refresh from %s failed (%d in a row), retry in %.0fs, %s: %s",
            source,
            self._failures,
            self._due - self._monotonic(),
            keeping,
            reason,
        )

    def _read_local(self, local: LocalProvider, *, quiet: bool = False) -> None:
        self._force_local = False
        try:
            keys = local.read()
        except CredentialsFetchError as exc:
            self._last_error = str(exc)
            self._observer.credentials_refreshed(local.source, "failure")
            log.error("credentials file unusable, keeping the previous keys: %s", exc)
            return
        if keys != self._keys and not quiet:
            self._log_loaded(local, keys)
        self._keys = keys
        self._last_error = None
        self._last_success = self._clock()
        self._observer.credentials_refreshed(local.source, "success")
        if keys.expires_at is None:
            self._due = float("inf")  # re-read when the file changes, on a request's path
        else:
            # A file with an Expiration is also re-read on the same schedule as fetched keys.
            remaining = keys.expires_at - self._clock()
            self._due = self._monotonic() + self._timing.after_success(remaining, self._rng)
        self._wakeup.set()

    @staticmethod
    def _log_loaded(local: LocalProvider, keys: IssuedKeys) -> None:
        key_id = keys.credentials.access_key_id
        if isinstance(local, FileProvider):
            expiry = f", expire at {keys.expiration_text}" if keys.expires_at else ""
            log.info("credentials loaded from %s (key id %s%s)", local.path, key_id, expiry)
        else:
            log.info("credentials: static keys (key id %s)", key_id)

    def _earliest_attempt(self) -> float:
        if self._last_attempt is None:
            return self._monotonic()
        return self._last_attempt + self._timing.min_interval

    @staticmethod
    def _usable_until(keys: IssuedKeys) -> str:
        assert keys.expires_at is not None
        return format_expiration(keys.expires_at - EXPIRY_MARGIN_SECONDS)

    def _unavailable_reason(self) -> str:
        detail = f": {self._last_error}" if self._last_error else ""
        return f"no credentials from {self.source or 'any source'} yet{detail}"

    def _expired_reason(self, keys: IssuedKeys) -> str:
        detail = f"; last refresh failure: {self._last_error}" if self._last_error else ""
        return (
            f"the keys from {self.source} expire at {keys.expiration_text} and are no longer "
            f"sent{detail}"
        )
