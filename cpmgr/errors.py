"""The error hierarchy, and the one table that says what each SLS failure means."""

from __future__ import annotations

from typing import Literal

FailureClass = Literal["retryable", "credentials", "permanent"]

# docs/design.md, "Failures". Codes are matched case-insensitively because SLS and its SDKs disagree
# on spelling (ConsumerNotExsit, ShardNotExsit).
_RETRYABLE_CODES = frozenset(
    code.lower()
    for code in (
        "InternalServerError",
        "RequestTimeout",
        "ServerBusy",
        "Timeout",
        "ConnectionError",
    )
)
_THROTTLING_CODES = frozenset(
    code.lower()
    for code in (
        "ServerBusy",
        "WriteQuotaExceed",
        "ReadQuotaExceed",
        "ShardWriteQuotaExceed",
        "ShardReadQuotaExceed",
        "MetaOperationQpsLimitExceeded",
    )
)
_CREDENTIALS_CODES = frozenset(
    code.lower()
    for code in (
        "Unauthorized",
        "SignatureNotMatch",
        "InvalidAccessKeyId",
        "RequestTimeExpired",
        "InvalidSecurityToken",
        # Raised before sending: no keys yet, or the current ones are about to expire.
        "CredentialsUnavailable",
        "CredentialsExpired",
    )
)
_OWNERSHIP_CODES = frozenset(
    code.lower()
    for code in (
        "ConsumerNotExist",
        "ConsumerNotExsit",
        "ConsumerNotMatch",
        "ShardNotExist",
        "ShardNotExsit",
    )
)
# SLS no longer knows the consumer (its heartbeats lapsed): it must join again with `[]`.
_EXPIRED_MEMBER_CODES = frozenset(
    code.lower() for code in ("ConsumerNotExist", "ConsumerNotExsit", "NotExistConsumerWithBody")
)
_PERMANENT_CODES = _OWNERSHIP_CODES | frozenset(
    code.lower()
    for code in (
        "InvalidShardCheckPoint",
        "ProjectNotExist",
        "LogStoreNotExist",
        "ConsumerGroupNotExist",
    )
)
HTTP_TOO_MANY_REQUESTS = 429


def is_throttling(code: str, status: int) -> bool:
    """Whether the server asks us to slow down (lowers commit concurrency)."""
    return code.lower() in _THROTTLING_CODES or status == HTTP_TOO_MANY_REQUESTS


def classify(code: str, status: int) -> FailureClass:
    """Map an SLS error code and HTTP status to what the daemon should do about it."""
    lowered = code.lower()
    if lowered in _CREDENTIALS_CODES or lowered.startswith("securitytoken") or status == 401:
        return "credentials"
    if lowered in _PERMANENT_CODES:
        return "permanent"
    if lowered in _RETRYABLE_CODES or is_throttling(code, status) or status >= 500:
        return "retryable"
    if 400 <= status < 500:
        return "permanent"
    # Anything else (a 3xx from a proxy, an unexpected 2xx) is not understood: never drop a
    # checkpoint on an answer we cannot interpret.
    return "retryable"


class CpmgrError(Exception):
    """Root of every error cpmgr raises on purpose."""


class ConfigError(CpmgrError):
    """The configuration is invalid; `problems` lists each one with its dotted path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class ProtocolError(CpmgrError):
    """A socket request was refused; `code` is the protocol error code (docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SLSError(CpmgrError):
    """A failed SLS request: the server's error, or a transport failure with a synthetic code."""

    def __init__(self, code: str, status: int, message: str, request_id: str = "") -> None:
        super().__init__(f"{code} (HTTP {status}): {message}")
        self.code = code
        self.status = status
        self.message = message
        self.request_id = request_id

    @property
    def failure_class(self) -> FailureClass:
        return classify(self.code, self.status)

    @property
    def retryable(self) -> bool:
        return self.failure_class == "retryable"

    @property
    def credentials_problem(self) -> bool:
        return self.failure_class == "credentials"

    @property
    def permanent(self) -> bool:
        return self.failure_class == "permanent"

    @property
    def throttling(self) -> bool:
        return is_throttling(self.code, self.status)

    @property
    def may_have_landed(self) -> bool:
        """No answer came back (a timeout, a reset): the request may still be applied later."""
        return self.status == 0 and self.code in ("Timeout", "ConnectionError")

    @property
    def ownership(self) -> bool:
        """The consumer does not hold the shard (or the shard is gone): both spellings."""
        return self.code.lower() in _OWNERSHIP_CODES

    @property
    def member_expired(self) -> bool:
        """SLS does not know the consumer (any spelling, heartbeat or checkpoint): rejoin."""
        return self.code.lower() in _EXPIRED_MEMBER_CODES
