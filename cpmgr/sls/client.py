"""The async SLS client: one aiohttp session; build, sign, send, and map every failure to SLSError.

See SLS-API.md sections 1-3 for the wire format and CONTRACT.md section 5 for the failure table.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, TypeGuard, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from cpmgr import __version__
from cpmgr.errors import SLSError
from cpmgr.sls.endpoint import Endpoint, parse_endpoint
from cpmgr.sls.signer import Credentials, SignatureVersion, signed_headers

log = logging.getLogger(__name__)

_T = TypeVar("_T")

CredentialsSource = Callable[[], Credentials]
"""Called before every request, so rotated credentials take effect on the next one."""

HTTP_OK = 200
REQUEST_ID_HEADER = "x-log-requestid"
_MAX_MESSAGE_CHARS = 512


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One shard's entry in a GetCheckPoint answer."""

    shard: int
    checkpoint: str  # "" when the shard was never committed
    update_time: int  # as SLS sends it (microseconds in the documented example)
    consumer: str


@dataclass(frozen=True)
class ConsumerGroup:
    """One entry of a ListConsumerGroup answer."""

    name: str
    timeout: int
    order: bool


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    request_id: str


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def _encode_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in params.items())


def _resource(logstore: str, group: str | None = None) -> tuple[str, str]:
    """The raw path (what is signed) and its encoded form (what goes on the wire)."""
    segments = ["logstores", logstore, "consumergroups"]
    if group is not None:
        segments.append(group)
    raw = "/" + "/".join(segments)
    return raw, "/" + "/".join(_encode(segment) for segment in segments)


def _compact_json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _json_or_none(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except ValueError:  # also covers bytes that are not valid UTF-8
        return None


def _scrub(text: str, creds: Credentials) -> str:
    """Bound a message's length and make sure no secret or token appears in it."""
    for secret in (creds.access_key_secret, creds.security_token):
        if secret:
            text = text.replace(secret, "***")
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[:_MAX_MESSAGE_CHARS] + "..."
    return text


def _error_from_answer(answer: _Answer, creds: Credentials) -> SLSError:
    """A non-200 answer: the server's errorCode/errorMessage, else `HTTP<status>`."""
    document = _json_or_none(answer.body)
    if isinstance(document, dict):
        code = document.get("errorCode")
        message = document.get("errorMessage")
        if isinstance(code, str) and code and isinstance(message, str):
            return SLSError(code, answer.status, _scrub(message, creds), answer.request_id)
    snippet = answer.body.decode("utf-8", errors="replace").strip() or "(empty body)"
    return SLSError(
        f"HTTP{answer.status}",
        answer.status,
        _scrub(f"unexpected error answer: {snippet}", creds),
        answer.request_id,
    )


def _malformed(api: str, answer: _Answer) -> SLSError:
    """A 200 whose body cannot be understood: reported as `HTTP200` (retryable)."""
    return SLSError(
        f"HTTP{answer.status}",
        answer.status,
        f"malformed {api} answer ({len(answer.body)} bytes)",
        answer.request_id,
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class _MalformedAnswer(ValueError):
    """A 200 answer's body is not what the API documents."""


def _checkpoint_entry(item: object) -> RemoteCheckpoint:
    if isinstance(item, dict):
        shard, checkpoint = item.get("shard"), item.get("checkpoint")
        update_time = item.get("updateTime", 0)
        consumer = item.get("consumer") or ""  # absent or null for never-committed shards
        if (
            _is_int(shard)
            and isinstance(checkpoint, str)
            and _is_int(update_time)
            and isinstance(consumer, str)
        ):
            return RemoteCheckpoint(shard, checkpoint, update_time, consumer)
    raise _MalformedAnswer


def _consumer_group_entry(item: object) -> ConsumerGroup:
    if isinstance(item, dict):
        name, timeout, order = item.get("name"), item.get("timeout"), item.get("order", False)
        if isinstance(name, str) and _is_int(timeout) and isinstance(order, bool):
            return ConsumerGroup(name, timeout, order)
    raise _MalformedAnswer


def _shard_entry(item: object) -> int:
    if _is_int(item):
        return item
    raise _MalformedAnswer


def _parse_list(api: str, answer: _Answer, entry: Callable[[object], _T]) -> list[_T]:
    """A JSON array answer, each item checked by `entry`; anything else is `HTTP200`."""
    document = _json_or_none(answer.body)
    try:
        if not isinstance(document, list):
            raise _MalformedAnswer
        return [entry(item) for item in document]
    except _MalformedAnswer:
        raise _malformed(api, answer) from None


class SLSClient:
    """Consumer-group and checkpoint calls to SLS over one keep-alive aiohttp session.

    Every failure is raised as `SLSError`: the server's errorCode, `HTTP<status>` for an
    answer without one, `Timeout` or `ConnectionError` (status 0) for transport failures.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        credentials: CredentialsSource,
        signature_version: SignatureVersion = "v1",
        region: str | None = None,
        request_timeout: float = 5.0,
        connection_limit: int = 32,
        clock: Callable[[], datetime] = _utc_now,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = f"cpmgr/{__version__}",
    ) -> None:
        if request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if connection_limit <= 0:
            raise ValueError("connection_limit must be > 0")
        self._endpoints: dict[str, Endpoint] = {}
        self._default_endpoint = self._endpoint(endpoint)
        self._credentials = credentials
        self._signature_version: SignatureVersion = signature_version
        self._region = region
        self._request_timeout = request_timeout
        self._connection_limit = connection_limit
        self._clock = clock
        self._ssl_context = ssl_context
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        ep = self._default_endpoint
        return (
            f"SLSClient(endpoint={ep.scheme}://{ep.host}{f':{ep.port}' if ep.port else ''}, "
            f"signature_version={self._signature_version!r}, region={self._region!r})"
        )

    async def start(self) -> None:
        """Create the session; a no-op if it is already running."""
        if self._session is not None:
            return
        # ssl=True verifies certificates against the system store; a context replaces that.
        connector = aiohttp.TCPConnector(
            limit=self._connection_limit,
            ssl=self._ssl_context if self._ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._request_timeout),
        )

    async def close(self) -> None:
        """Close the session and its connections; safe to call more than once."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> SLSClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def update_checkpoint(
        self,
        project: str,
        logstore: str,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        consumer: str = "",
        force_success: bool = True,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> None:
        """UpdateCheckPoint (ConsumerGroupUpdateCheckPoint) for one shard."""
        params = {
            "type": "checkpoint",
            "consumer": consumer,
            "forceSuccess": "true" if force_success else "false",
        }
        body = _compact_json({"shard": shard, "checkpoint": checkpoint})
        await self._call(
            "POST",
            project,
            _resource(logstore, group),
            params=params,
            body=body,
            endpoint=endpoint,
            region=region,
        )

    async def get_checkpoint(
        self,
        project: str,
        logstore: str,
        group: str,
        shard: int | None = None,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[RemoteCheckpoint]:
        """GetCheckPoint: every shard, or only `shard` (an empty list if it does not exist)."""
        params = {} if shard is None else {"shard": str(shard)}
        answer = await self._call(
            "GET",
            project,
            _resource(logstore, group),
            params=params,
            endpoint=endpoint,
            region=region,
        )
        return _parse_list("GetCheckPoint", answer, _checkpoint_entry)

    async def create_consumer_group(
        self,
        project: str,
        logstore: str,
        group: str,
        *,
        heartbeat_timeout: int,
        order: bool = False,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> None:
        """CreateConsumerGroup; consumers silent for `heartbeat_timeout` seconds are dropped."""
        body = _compact_json({"consumerGroup": group, "timeout": heartbeat_timeout, "order": order})
        await self._call(
            "POST", project, _resource(logstore), body=body, endpoint=endpoint, region=region
        )

    async def list_consumer_groups(
        self,
        project: str,
        logstore: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[ConsumerGroup]:
        """ListConsumerGroup."""
        answer = await self._call(
            "GET", project, _resource(logstore), endpoint=endpoint, region=region
        )
        return _parse_list("ListConsumerGroup", answer, _consumer_group_entry)

    async def heartbeat(
        self,
        project: str,
        logstore: str,
        group: str,
        consumer: str,
        shards: Sequence[int],
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[int]:
        """ConsumerGroupHeartBeat: report held shards, return the ones the server confirms."""
        params = {"type": "heartbeat", "consumer": consumer}
        body = _compact_json(list(shards))
        answer = await self._call(
            "POST",
            project,
            _resource(logstore, group),
            params=params,
            body=body,
            endpoint=endpoint,
            region=region,
        )
        return _parse_list("ConsumerGroupHeartBeat", answer, _shard_entry)

    def _endpoint(self, text: str | None) -> Endpoint:
        if text is None:
            return self._default_endpoint
        cached = self._endpoints.get(text)
        if cached is None:
            cached = self._endpoints[text] = parse_endpoint(text)
        return cached

    async def _call(
        self,
        method: Literal["GET", "POST"],
        project: str,
        resource: tuple[str, str],
        *,
        params: Mapping[str, str] | None = None,
        body: bytes = b"",
        endpoint: str | None,
        region: str | None,
    ) -> _Answer:
        """Sign and send one request; return the 200 answer or raise SLSError."""
        session = self._require_session()
        target = self._endpoint(endpoint)
        raw_path, encoded_path = resource
        params = params or {}
        creds = self._credentials()
        headers = signed_headers(
            creds,
            method,
            raw_path,
            params,
            host=target.host_header(project),
            body=body,
            now=self._clock(),
            version=self._signature_version,
            region=region or self._region,
        )
        headers["User-Agent"] = self._user_agent
        url = target.url(encoded_path, _encode_query(params))
        answer = await self._send(session, method, url, headers=headers, body=body, creds=creds)
        log.debug("%s %s -> %d (%s)", method, raw_path, answer.status, answer.request_id)
        if answer.status != HTTP_OK:
            raise _error_from_answer(answer, creds)
        return answer

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        *,
        headers: dict[str, str],
        body: bytes,
        creds: Credentials,
    ) -> _Answer:
        """One HTTP exchange; transport failures become `Timeout` / `ConnectionError`."""
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=body or None,
                # What was signed is what is sent: no Content-Type aiohttp picked itself.
                skip_auto_headers=("Content-Type",),
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                request_id = response.headers.get(REQUEST_ID_HEADER, "")
                return _Answer(response.status, payload, request_id)
        # TimeoutError first: it is an OSError, and aiohttp's timeouts are also ClientErrors.
        except TimeoutError as exc:
            message = f"no complete answer from {url.host} within {self._request_timeout}s"
            raise SLSError("Timeout", 0, message) from exc
        except (aiohttp.ClientError, OSError) as exc:
            message = _scrub(f"{type(exc).__name__}: {exc}", creds)
            raise SLSError("ConnectionError", 0, message) from exc

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("SLSClient is not started: call start() or use `async with`")
        return self._session
