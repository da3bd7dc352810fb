"""The emulator's credentials services: STS AssumeRoleWithOIDC, the ECS metadata paths and a
credentials URI, all issuing short-lived STS keys that the SLS side accepts until they expire.

- STS: `GET` or `POST /` with `Action=AssumeRoleWithOIDC`, parameters in the query or the
  form body (the Python SDK sends a GET query, the Go SDK a POST form). With a token file
  named (`--oidc-token-file`), the OIDC token must be the file's current content, so a
  stale token is refused (`AuthenticationFail.OIDCToken.Expired`); without one, any
  non-empty token is accepted.
- Metadata: `PUT /latest/api/token`, `GET /latest/meta-data/ram/security-credentials/` (the
  role name) and `.../{role}` (keys with `"Code":"Success"`). A token, when sent, must be one
  this emulator issued.
- URI: `GET /credentials` (any query).
- `POST /_emulator/credentials` `{"down": bool, "lifetime": seconds, "oidc_token_file": path}`
  changes the settings; while down, every credentials service answers 503 ServiceUnavailable.
Keys live `lifetime` seconds (OIDC: at most DurationSeconds), whole seconds as `Expiration`
carries them. Requests are counted per API and code like the SLS APIs.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl

from cpmgr.emulator.http import HttpAnswer, HttpRequest
from cpmgr.emulator.state import ApiError

DEFAULT_LIFETIME = 3600.0
DEFAULT_ROLE_NAME = "cpmgr-emulator-role"
STS_PATH = "/"
TOKEN_PATH = "/latest/api/token"
ROLES_PATH = "/latest/meta-data/ram/security-credentials/"
URI_PATH = "/credentials"
TOKEN_HEADER = "x-aliyun-ecs-metadata-token"
TOKEN_TTL_HEADER = "x-aliyun-ecs-metadata-token-ttl-seconds"
SECURITY_TOKEN_HEADER = "x-acs-security-token"
_MIN_DURATION = 900


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    secret: str
    token: str
    expires_at: int
    api: str


def _expiration(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sts_error(status: int, code: str, message: str) -> HttpAnswer:
    return HttpAnswer.json(
        {
            "RequestId": secrets.token_hex(8).upper(),
            "HostId": "sts.aliyuncs.com",
            "Code": code,
            "Message": message,
        },
        status,
    )


class CredentialsService:
    """Issues STS keys through the three services; `check` is the SLS side's token check."""

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float],
        count: Callable[[str, str], None],
        lifetime: float = DEFAULT_LIFETIME,
        oidc_token_file: Path | None = None,
        role_name: str = DEFAULT_ROLE_NAME,
        on_issue: Callable[[str, str], None] | None = None,
    ) -> None:
        self._clock = wall_clock
        self._count = count
        self._on_issue = on_issue
        self.lifetime = lifetime
        self.oidc_token_file = oidc_token_file
        self.role_name = role_name
        self.down = False
        self.issued: dict[str, IssuedKey] = {}
        self._imds_tokens: set[str] = set()

    # ------------------------------------------------------------------ routing

    def route(self, request: HttpRequest) -> tuple[str, Callable[[HttpRequest], HttpAnswer]] | None:
        """The API name and handler for a credentials request, None for anything else."""
        path, method = request.path, request.method
        if path == STS_PATH and method in ("GET", "POST"):
            return "AssumeRoleWithOIDC", self._assume_role_with_oidc
        if path == TOKEN_PATH and method == "PUT":
            return "MetadataToken", self._metadata_token
        if path == ROLES_PATH and method == "GET":
            return "MetadataRoleName", self._role_name
        if path.startswith(ROLES_PATH) and method == "GET":
            return "MetadataCredentials", self._metadata_credentials
        if path == URI_PATH and method == "GET":
            return "CredentialsURI", self._uri_credentials
        return None

    def respond(self, request: HttpRequest) -> HttpAnswer | None:
        found = self.route(request)
        if found is None:
            return None
        api, handler = found
        if self.down:
            self._count(api, "ServiceUnavailable")
            return _sts_error(503, "ServiceUnavailable", "the service is down (emulated)")
        answer = handler(request)
        code = "OK" if answer.status == 200 else _code_of(answer)
        self._count(api, code)
        return answer

    # ------------------------------------------------------------------ the SLS side

    def check(self, key_id: str, token: str) -> None:
        """Refuse an issued key sent without its token, with another token, or expired."""
        issued = self.issued.get(key_id)
        if issued is None:
            return
        if not token or not secrets.compare_digest(token, issued.token):
            raise ApiError(401, "InvalidSecurityToken", "the security token does not match")
        if self._clock() >= issued.expires_at:
            expired = _expiration(issued.expires_at)
            raise ApiError(401, "SecurityTokenExpired", f"the security token expired at {expired}")

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict[str, object]:
        return {
            "down": self.down,
            "lifetime": self.lifetime,
            "oidc_token_file": str(self.oidc_token_file) if self.oidc_token_file else None,
            "role_name": self.role_name,
            "issued": [
                {"key_id": key.key_id, "expiration": _expiration(key.expires_at), "api": key.api}
                for key in self.issued.values()
            ],
        }

    def update(self, data: Mapping[str, object]) -> None:
        """Merge `down`, `lifetime` and `oidc_token_file`; ValueError on a bad value."""
        unknown = set(data) - {"down", "lifetime", "oidc_token_file"}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        down = data.get("down", self.down)
        lifetime = data.get("lifetime", self.lifetime)
        token_file = data.get("oidc_token_file", self.oidc_token_file)
        if not isinstance(down, bool):
            raise ValueError("down must be true or false")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise ValueError("lifetime must be a number of seconds > 0")
        if token_file is not None and not isinstance(token_file, str | Path):
            raise ValueError("oidc_token_file must be a path or null")
        self.down = down
        self.lifetime = float(lifetime)
        self.oidc_token_file = Path(token_file) if token_file else None

    # ------------------------------------------------------------------ issuing

    def _issue(self, api: str, lifetime: float) -> IssuedKey:
        key = IssuedKey(
            key_id=f"STS.{secrets.token_hex(12)}",
            secret=secrets.token_urlsafe(24),
            token=f"CAIS{secrets.token_urlsafe(48)}",
            expires_at=math.floor(self._clock() + lifetime),
            api=api,
        )
        self.issued[key.key_id] = key
        if self._on_issue is not None:
            self._on_issue(key.key_id, key.secret)
        return key

    @staticmethod
    def _keys_document(key: IssuedKey) -> dict[str, str]:
        return {
            "AccessKeyId": key.key_id,
            "AccessKeySecret": key.secret,
            "SecurityToken": key.token,
            "Expiration": _expiration(key.expires_at),
        }

    def _assume_role_with_oidc(self, request: HttpRequest) -> HttpAnswer:
        params = dict(request.query)
        if request.method == "POST" and request.body:
            params.update(parse_qsl(request.body.decode("utf-8", errors="replace")))
        if params.get("Action") != "AssumeRoleWithOIDC":
            return _sts_error(400, "InvalidAction.NotFound", "only AssumeRoleWithOIDC is served")
        for name in ("RoleArn", "OIDCProviderArn", "OIDCToken", "RoleSessionName"):
            if not params.get(name):
                return _sts_error(400, "MissingParameter", f"{name} is mandatory")
        duration = params.get("DurationSeconds", "3600")
        if not duration.isdigit() or int(duration) < _MIN_DURATION:
            return _sts_error(400, "InvalidParameter.DurationSeconds", "at least 900 seconds")
        refused = self._refuse_token(params["OIDCToken"])
        if refused is not None:
            return refused
        key = self._issue("AssumeRoleWithOIDC", min(self.lifetime, float(duration)))
        return HttpAnswer.json(
            {
                "RequestId": secrets.token_hex(8).upper(),
                "AssumedRoleUser": {
                    "AssumedRoleId": f"3{secrets.token_hex(8)}:{params['RoleSessionName']}",
                    "Arn": f"{params['RoleArn']}/{params['RoleSessionName']}",
                },
                "OIDCTokenInfo": {"Issuer": "emulator", "VerificationInfo": "Success"},
                "Credentials": self._keys_document(key),
            }
        )

    def _refuse_token(self, token: str) -> HttpAnswer | None:
        if self.oidc_token_file is None:
            return None
        try:
            current = self.oidc_token_file.read_text(encoding="utf-8").strip()
        except OSError:
            return _sts_error(500, "InternalError", "the emulator cannot read its token file")
        if secrets.compare_digest(token.strip(), current):
            return None
        return _sts_error(
            400, "AuthenticationFail.OIDCToken.Expired", "the OIDC token is not the current one"
        )

    def _metadata_token(self, request: HttpRequest) -> HttpAnswer:
        ttl = request.header(TOKEN_TTL_HEADER)
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return HttpAnswer(400, b"ttl must be 1-21600 seconds", "text/plain")
        token = secrets.token_urlsafe(24)
        self._imds_tokens.add(token)
        return HttpAnswer(200, token.encode(), "text/plain")

    def _metadata_refusal(self, request: HttpRequest) -> HttpAnswer | None:
        token = request.header(TOKEN_HEADER)
        if token and token not in self._imds_tokens:
            return HttpAnswer(401, b"invalid metadata token", "text/plain")
        return None

    def _role_name(self, request: HttpRequest) -> HttpAnswer:
        return self._metadata_refusal(request) or HttpAnswer(
            200, self.role_name.encode(), "text/plain"
        )

    def _metadata_credentials(self, request: HttpRequest) -> HttpAnswer:
        refused = self._metadata_refusal(request)
        if refused is not None:
            return refused
        if request.path[len(ROLES_PATH) :] != self.role_name:
            return HttpAnswer(404, b"no such role", "text/plain")
        key = self._issue("MetadataCredentials", self.lifetime)
        now = _expiration(self._clock())
        return HttpAnswer.json({**self._keys_document(key), "LastUpdated": now, "Code": "Success"})

    def _uri_credentials(self, request: HttpRequest) -> HttpAnswer:
        key = self._issue("CredentialsURI", self.lifetime)
        return HttpAnswer.json({"Code": "Success", **self._keys_document(key)})


def _code_of(answer: HttpAnswer) -> str:
    if answer.content_type.startswith("application/json"):
        document = json.loads(answer.body)
        if isinstance(document, dict) and isinstance(document.get("Code"), str):
            return str(document["Code"])
    return f"HTTP{answer.status}"
