"""Keys written in the config or taken from `ALIBABA_CLOUD_ACCESS_KEY_*`: they never expire."""

from __future__ import annotations

from cpmgr.sls.credentials.keys import IssuedKeys, Source
from cpmgr.sls.signer import Credentials


class StaticProvider:
    """The same keys every time."""

    def __init__(self, credentials: Credentials) -> None:
        self._keys = IssuedKeys(credentials)

    @property
    def source(self) -> Source:
        return "static"

    def read(self) -> IssuedKeys:
        return self._keys

    def changed(self) -> bool:
        return False

    async def fetch(self) -> IssuedKeys:
        return self._keys

    async def close(self) -> None:
        return None
