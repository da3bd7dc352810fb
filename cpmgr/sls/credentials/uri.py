"""A credentials URI (`ALIBABA_CLOUD_CREDENTIALS_URI`): GET, keys with `"Code":"Success"`."""

from __future__ import annotations

from urllib.parse import urlsplit

from cpmgr.sls.credentials.fetch import HttpFetcher
from cpmgr.sls.credentials.keys import (
    CredentialsFetchError,
    IssuedKeys,
    Source,
    json_answer,
    keys_from_document,
)

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0


class UriProvider:
    """The URL is used exactly as given, path and query included, with no auth header."""

    def __init__(self, url: str, *, fetcher: HttpFetcher | None = None) -> None:
        self.url = url
        self._fetcher = fetcher or HttpFetcher(
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT
        )

    @property
    def source(self) -> Source:
        return "uri"

    @property
    def host(self) -> str:
        """Where the URI points, without its path and query (they may hold a secret)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    async def fetch(self) -> IssuedKeys:
        answer = await self._fetcher.request("GET", self.url)
        where = f"credentials URI {self.host}"
        if answer.status != 200:
            raise CredentialsFetchError(f"{where}: HTTP {answer.status}")
        document = json_answer(answer.body, where=where)
        if not isinstance(document, dict) or document.get("Code") != "Success":
            code = document.get("Code") if isinstance(document, dict) else None
            raise CredentialsFetchError(f"{where}: Code is {str(code)[:40]!r}, not 'Success'")
        return keys_from_document(document, where=where)

    async def close(self) -> None:
        await self._fetcher.close()
