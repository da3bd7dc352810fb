"""The one HTTP call credentials providers make: method, URL, headers, form; bounded in time
and size, https verified against the system store."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from cpmgr.sls.credentials.keys import MAX_ANSWER_BYTES, CredentialsFetchError


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class HttpFetcher:
    """A small aiohttp session, opened on first use and closed with `close()`."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=connect_timeout + read_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Answer:
        """The status and body (at most MAX_ANSWER_BYTES); CredentialsFetchError when there is
        no answer. The error names the host only: a URL's path or query may hold a secret."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        host = urlsplit(url).netloc
        try:
            async with self._session.request(
                method, url, headers=dict(headers or {}), data=form, ssl=self._ssl
            ) as response:
                body = await response.content.read(MAX_ANSWER_BYTES + 1)
                if len(body) > MAX_ANSWER_BYTES:
                    raise CredentialsFetchError(f"{host}: the answer is too large")
                return Answer(response.status, body)
        except TimeoutError:
            raise CredentialsFetchError(f"{host}: no answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise CredentialsFetchError(f"{host}: cannot connect ({exc.strerror})") from None
        except aiohttp.ClientError as exc:
            raise CredentialsFetchError(f"{host}: {type(exc).__name__}") from None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
