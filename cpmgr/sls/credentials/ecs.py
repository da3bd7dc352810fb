"""The ECS instance RAM role, from the metadata service (IMDSv2 token first, as the SDKs do)."""

from __future__ import annotations

from cpmgr.sls.credentials.fetch import HttpFetcher
from cpmgr.sls.credentials.keys import (
    CredentialsFetchError,
    IssuedKeys,
    Source,
    json_answer,
    keys_from_document,
)

# The metadata service is on the host's link: a second is plenty (the SDKs use 1 s too).
CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 1.0
TOKEN_TTL_SECONDS = 21600
_TOKEN_PATH = "/latest/api/token"
_ROLES_PATH = "/latest/meta-data/ram/security-credentials/"


class EcsRamRoleProvider:
    """Token, role name (unless configured), then the role's keys."""

    def __init__(
        self, *, metadata_url: str, role_name: str | None, fetcher: HttpFetcher | None = None
    ) -> None:
        self.metadata_url = metadata_url.rstrip("/")
        self.role_name = role_name
        self._fetcher = fetcher or HttpFetcher(
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT
        )

    @property
    def source(self) -> Source:
        return "ecs_ram_role"

    async def fetch(self) -> IssuedKeys:
        headers = await self._token_header()
        role = self.role_name or await self._role(headers)
        answer = await self._fetcher.request(
            "GET", f"{self.metadata_url}{_ROLES_PATH}{role}", headers=headers
        )
        where = f"metadata role {role}"
        if answer.status != 200:
            raise CredentialsFetchError(f"{where}: HTTP {answer.status}")
        document = json_answer(answer.body, where=where)
        if not isinstance(document, dict) or document.get("Code") != "Success":
            code = document.get("Code") if isinstance(document, dict) else None
            raise CredentialsFetchError(f"{where}: Code is {str(code)[:40]!r}, not 'Success'")
        return keys_from_document(document, where=where)

    async def answers(self) -> bool:
        """Whether a metadata service answers with a role (the `auto` probe)."""
        try:
            await self._role(await self._token_header())
        except CredentialsFetchError:
            return False
        return True

    async def close(self) -> None:
        await self._fetcher.close()

    async def _token_header(self) -> dict[str, str]:
        """IMDSv2's session token; without one (an IMDSv1-only host), no header."""
        try:
            answer = await self._fetcher.request(
                "PUT",
                f"{self.metadata_url}{_TOKEN_PATH}",
                headers={"X-aliyun-ecs-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
            )
        except CredentialsFetchError:
            return {}
        token = answer.body.decode("utf-8", errors="replace").strip()
        if answer.status != 200 or not token:
            return {}
        return {"X-aliyun-ecs-metadata-token": token}

    async def _role(self, headers: dict[str, str]) -> str:
        answer = await self._fetcher.request(
            "GET", f"{self.metadata_url}{_ROLES_PATH}", headers=headers
        )
        role = answer.body.decode("utf-8", errors="replace").strip()
        if answer.status != 200 or not role or "/" in role or "\n" in role:
            raise CredentialsFetchError(
                f"the metadata service names no RAM role (HTTP {answer.status})"
            )
        return role
