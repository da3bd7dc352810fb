"""ACK RRSA: the pod's OIDC token exchanged for STS keys with AssumeRoleWithOIDC (unsigned)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cpmgr.sls.credentials.fetch import HttpFetcher
from cpmgr.sls.credentials.keys import (
    CredentialsFetchError,
    IssuedKeys,
    Source,
    json_answer,
    keys_from_document,
    reason,
)

# As the Go SDK: connect 5 s, read 10 s.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
_MAX_TOKEN_BYTES = 64 * 1024


class OIDCProvider:
    """POSTs the form the Go SDK sends (the Python SDK puts the same fields in a GET query)."""

    def __init__(
        self,
        *,
        role_arn: str,
        provider_arn: str,
        token_file: str,
        session_name: str,
        duration: float,
        sts_url: str,
        fetcher: HttpFetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._role_arn = role_arn
        self._provider_arn = provider_arn
        self.token_file = token_file
        self._session_name = session_name
        self._duration = duration
        self.sts_url = sts_url.rstrip("/") + "/"
        self._fetcher = fetcher or HttpFetcher(
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT
        )
        self._clock = clock

    @property
    def source(self) -> Source:
        return "oidc"

    async def fetch(self) -> IssuedKeys:
        token = self._read_token()  # at every refresh: the webhook rotates the file
        timestamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        query = f"Action=AssumeRoleWithOIDC&Format=JSON&Version=2015-04-01&Timestamp={timestamp}"
        form = {
            "RoleArn": self._role_arn,
            "OIDCProviderArn": self._provider_arn,
            "OIDCToken": token,
            "RoleSessionName": self._session_name,
            "DurationSeconds": str(int(self._duration)),
        }
        answer = await self._fetcher.request(
            "POST",
            f"{self.sts_url}?{query.replace(':', '%3A')}",
            headers={"Accept-Encoding": "identity"},
            form=form,
        )
        where = "AssumeRoleWithOIDC"
        document = json_answer(answer.body, where=where) if answer.body else None
        if answer.status != 200:
            raise CredentialsFetchError(_sts_error(answer.status, document, token))
        if not isinstance(document, dict):
            raise CredentialsFetchError(f"{where}: the answer is not a JSON object")
        return keys_from_document(document.get("Credentials"), where=where)

    async def close(self) -> None:
        await self._fetcher.close()

    def _read_token(self) -> str:
        try:
            with Path(self.token_file).open("rb") as file:
                raw = file.read(_MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            message = f"cannot read the OIDC token file {self.token_file}: {exc.strerror or exc}"
            raise CredentialsFetchError(message) from None
        token = raw.decode("utf-8", errors="replace").strip()
        if not token or len(raw) > _MAX_TOKEN_BYTES:
            raise CredentialsFetchError(f"the OIDC token file {self.token_file} is empty or huge")
        return token


def _sts_error(status: int, document: object, token: str) -> str:
    """`AssumeRoleWithOIDC: HTTP 400 AuthenticationFail.OIDCToken.Expired: <message>`."""
    if isinstance(document, dict) and isinstance(document.get("Code"), str):
        message = str(document.get("Message", ""))
        return reason(f"AssumeRoleWithOIDC: HTTP {status} {document['Code']}: {message}", token)
    return f"AssumeRoleWithOIDC: HTTP {status}"
