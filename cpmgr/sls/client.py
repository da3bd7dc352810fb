"""The async SLS client: build, sign, send over keep-alive connections, map failures to SLSError.

UpdateCheckPoint is the hot path (thousands per second on the daemon's one loop), so what stays
the same from call to call is prepared once per (endpoint, project, logstore, group, consumer,
forceSuccess): the request line, the fixed headers and the canonical resource v1 signs. A call
then only formats the body, its MD5, the Date (formatted once per second) and one HMAC, and
writes one byte string (see `cpmgr.sls.http` for why not aiohttp's client).
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from types import TracebackType
from typing import Final, Literal, Protocol, TypeGuard, TypeVar
from urllib.parse import quote

from cpmgr import __version__
from cpmgr.errors import SLSError
from cpmgr.sls.endpoint import Endpoint, parse_endpoint
from cpmgr.sls.http import ConnectionPool, HttpAnswer
from cpmgr.sls.signer import (
    API_VERSION,
    Credentials,
    SignatureVersion,
    V1Template,
    http_date,
    signed_headers,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

CredentialsSource = Callable[[], Credentials]
"""Called before every request, so rotated credentials take effect on the next one."""

HTTP_OK = 200
REQUEST_ID_HEADER = "x-log-requestid"
_MAX_MESSAGE_CHARS = 512
_CRLF: Final = "\r\n"
# Distinct (endpoint, project, logstore, group, consumer, forceSuccess) kept prepared; past
# this the cache starts over rather than grow with every consumer name ever seen.
_MAX_PREPARED: Final = 4096


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
class ShardInfo:
    """One entry of a ListShards answer."""

    shard: int
    status: str  # "readwrite", or "readonly" for the parent of a split or merge
    begin_key: str  # inclusive, 32 hex digits of the MD5 hash space
    end_key: str  # exclusive
    create_time: int  # unix seconds

    @property
    def read_only(self) -> bool:
        return self.status == "readonly"


CursorStart = Literal["begin", "end"] | int
"""Where GetCursor looks: the oldest data, the next write, or a unix time in seconds."""


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    request_id: str

    @classmethod
    def of(cls, answer: HttpAnswer) -> _Answer:
        return cls(answer.status, answer.body, answer.headers.get(REQUEST_ID_HEADER, ""))


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _header_safe(value: str) -> bool:
    """ASCII without CR, LF or other control characters: the value cannot split a header."""
    return value.isascii() and value.isprintable()


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def _encode_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in params.items())


def _resource(logstore: str, group: str | None = None) -> tuple[str, str]:
    """The raw path (what is signed) and its encoded form (what goes on the wire)."""
    segments = ["logstores", logstore, "consumergroups"]
    if group is not None:
        segments.append(group)
    return _path(segments)


def _shard_resource(logstore: str, shard: int | None = None) -> tuple[str, str]:
    """`/logstores/{logstore}/shards[/{shard}]`, raw and encoded."""
    segments = ["logstores", logstore, "shards"]
    if shard is not None:
        segments.append(str(shard))
    return _path(segments)


def _path(segments: list[str]) -> tuple[str, str]:
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


def _shard_info_entry(item: object) -> ShardInfo:
    if isinstance(item, dict):
        shard, status = item.get("shardID"), item.get("status")
        begin, end = item.get("inclusiveBeginKey", ""), item.get("exclusiveEndKey", "")
        create_time = item.get("createTime", 0)
        if (
            _is_int(shard)
            and isinstance(status, str)
            and isinstance(begin, str)
            and isinstance(end, str)
            and _is_int(create_time)
        ):
            return ShardInfo(shard, status.lower(), begin, end, create_time)
    raise _MalformedAnswer


def _cursor_from(start: CursorStart) -> str:
    """The `from` query value; a bad start is the caller's mistake, refused before sending."""
    if start in ("begin", "end"):
        return str(start)
    if _is_int(start) and start >= 0:
        return str(start)
    raise ValueError(f"start must be 'begin', 'end' or a unix time >= 0, not {start!r}")


def _parse_cursor(answer: _Answer) -> str:
    document = _json_or_none(answer.body)
    cursor = document.get("cursor") if isinstance(document, dict) else None
    if not isinstance(cursor, str) or not cursor:
        raise _malformed("GetCursor", answer)
    return cursor


def _parse_cursor_time(answer: _Answer) -> int:
    document = _json_or_none(answer.body)
    seconds = document.get("cursor_time") if isinstance(document, dict) else None
    if not _is_int(seconds):
        raise _malformed("GetCursorTime", answer)
    return seconds


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


Method = Literal["GET", "POST", "PUT"]

# (endpoint override, project, logstore, group, consumer, forceSuccess)
_CheckpointKey = tuple[str | None, str, str, str, str, bool]
# (endpoint override, project, logstore, shard, from)
_CursorKey = tuple[str | None, str, str, int, str]


@dataclass(frozen=True)
class _Prepared:
    """One request shape, prepared once: where it goes and what is the same every time."""

    endpoint: Endpoint
    method: Method
    raw_path: str  # what is signed
    params: Mapping[str, str]
    host: str
    request_line: str  # "POST /path?query HTTP/1.1\r\n"
    v1_head: str  # request line, Host, User-Agent and the fixed v1 headers, each ending CRLF
    v1: V1Template
    sends_length: bool  # Content-Length even for an empty body (POST)


def _prepare(
    endpoint: Endpoint,
    method: Method,
    project: str,
    resource: tuple[str, str],
    params: Mapping[str, str],
    *,
    has_body: bool,
    user_agent: str,
) -> _Prepared:
    raw_path, encoded_path = resource
    host = endpoint.host_header(project)
    if not (_header_safe(host) and _header_safe(user_agent)):
        message = f"project {project!r} or user agent cannot go into an HTTP header"
        raise SLSError("ParameterInvalid", 400, message)
    query = _encode_query(params)
    request_line = f"{method} {encoded_path}{'?' if query else ''}{query} HTTP/1.1\r\n"
    fixed = f"x-log-apiversion: {API_VERSION}\r\n"
    fixed += "Content-Type: application/json\r\n" if has_body else "x-log-bodyrawsize: 0\r\n"
    fixed += "x-log-signaturemethod: hmac-sha1\r\n"
    return _Prepared(
        endpoint=endpoint,
        method=method,
        raw_path=raw_path,
        params=dict(params),
        host=host,
        request_line=request_line,
        v1_head=f"{request_line}Host: {host}\r\nUser-Agent: {user_agent}\r\n{fixed}",
        v1=V1Template.prepare(method, raw_path, params, has_body=has_body),
        sends_length=method == "POST",
    )


def _length_header(prepared: _Prepared, body: bytes) -> str:
    return f"Content-Length: {len(body)}\r\n" if body or prepared.sends_length else ""


def _checkpoint_body(shard: int, checkpoint: str) -> bytes:
    """`{"shard":N,"checkpoint":"..."}`, byte for byte what compact json.dumps writes."""
    return f'{{"shard":{shard},"checkpoint":{encode_basestring_ascii(checkpoint)}}}'.encode()


class _DateCache:
    """The Date header, formatted again only when the clock's second changes."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        # The default clock's second is read from time.time(), cheaper than a datetime.
        self._seconds: Callable[[], float] | None = time.time if clock is _utc_now else None
        self._second = -1
        self._text = ""

    def text(self) -> str:
        if self._seconds is not None:
            second = int(self._seconds())
            if second != self._second:
                self._second, self._text = second, http_date(datetime.fromtimestamp(second, UTC))
            return self._text
        now = self._clock()
        second = int(now.timestamp() // 1)
        if second != self._second:
            self._second, self._text = second, http_date(now)
        return self._text


class CheckpointReads(Protocol):
    """GetCheckPoint as SLSClient makes it: the part the committer, membership and lag share."""

    async def get_checkpoint(
        self,
        project: str,
        logstore: str,
        group: str,
        shard: int | None = None,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[RemoteCheckpoint]: ...


class ShardReads(Protocol):
    """ListShards and GetCursor as SLSClient makes them: what shard ends, membership and lag
    read."""

    async def list_shards(
        self, project: str, logstore: str, *, endpoint: str | None = None, region: str | None = None
    ) -> list[ShardInfo]: ...

    async def get_cursor(
        self,
        project: str,
        logstore: str,
        shard: int,
        start: CursorStart,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> str: ...


class SLSClient:
    """Consumer-group and checkpoint calls to SLS over keep-alive connections.

    Every failure is raised as `SLSError`: the server's errorCode, `HTTP<status>` for an
    answer without one, `Timeout` or `ConnectionError` (status 0) for transport failures.
    At most `connection_limit` requests are in flight (and connections open) per endpoint.
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
        self._dates = _DateCache(clock)
        self._ssl_context = ssl_context
        self._user_agent = user_agent
        self._pools: dict[Endpoint, ConnectionPool] | None = None
        self._checkpoint_requests: dict[_CheckpointKey, _Prepared] = {}
        # GetCursor of a shard at the same start, asked again at every lag reading.
        self._cursor_requests: dict[_CursorKey, _Prepared] = {}

    def __repr__(self) -> str:
        ep = self._default_endpoint
        return (
            f"SLSClient(endpoint={ep.scheme}://{ep.host}{f':{ep.port}' if ep.port else ''}, "
            f"signature_version={self._signature_version!r}, region={self._region!r})"
        )

    async def start(self) -> None:
        """Get ready to send; a no-op if it is already running."""
        if self._pools is None:
            self._pools = {}
            if self._default_endpoint.scheme == "https":
                self._tls_context()  # loading the CA store takes a while: not on a commit

    async def close(self) -> None:
        """Close every connection; safe to call more than once."""
        pools, self._pools = self._pools, None
        for pool in (pools or {}).values():
            await pool.close()

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
        key: _CheckpointKey = (endpoint, project, logstore, group, consumer, force_success)
        prepared = self._checkpoint_requests.get(key)
        if prepared is None:
            prepared = self._prepare_checkpoint(key)
        await self._send(prepared, _checkpoint_body(shard, checkpoint), region)

    def _prepare_checkpoint(self, key: _CheckpointKey) -> _Prepared:
        endpoint, project, logstore, group, consumer, force_success = key
        params = {
            "type": "checkpoint",
            "consumer": consumer,
            "forceSuccess": "true" if force_success else "false",
        }
        prepared = _prepare(
            self._endpoint(endpoint),
            "POST",
            project,
            _resource(logstore, group),
            params,
            has_body=True,
            user_agent=self._user_agent,
        )
        if len(self._checkpoint_requests) >= _MAX_PREPARED:
            self._checkpoint_requests.clear()
        self._checkpoint_requests[key] = prepared
        return prepared

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

    async def get_shard_checkpoint(
        self,
        project: str,
        logstore: str,
        group: str,
        shard: int,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> RemoteCheckpoint | None:
        """GetCheckPoint of one shard: its entry, or None if the shard does not exist.

        The checkpoint is "" for a shard never committed; entries for other shards are ignored.
        """
        entries = await self.get_checkpoint(
            project, logstore, group, shard, endpoint=endpoint, region=region
        )
        return next((entry for entry in entries if entry.shard == shard), None)

    async def update_consumer_group(
        self,
        project: str,
        logstore: str,
        group: str,
        *,
        heartbeat_timeout: int | None = None,
        order: bool | None = None,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> None:
        """UpdateConsumerGroup: change the heartbeat timeout, the order, or both."""
        settings: dict[str, object] = {}
        if order is not None:
            settings["order"] = order
        if heartbeat_timeout is not None:
            settings["timeout"] = heartbeat_timeout
        if not settings:
            raise ValueError("update_consumer_group needs heartbeat_timeout, order or both")
        await self._call(
            "PUT",
            project,
            _resource(logstore, group),
            body=_compact_json(settings),
            endpoint=endpoint,
            region=region,
        )

    async def list_shards(
        self,
        project: str,
        logstore: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[ShardInfo]:
        """ListShards: every shard of the logstore, read-only parents of splits included."""
        answer = await self._call(
            "GET", project, _shard_resource(logstore), endpoint=endpoint, region=region
        )
        return _parse_list("ListShards", answer, _shard_info_entry)

    async def split_shard(
        self,
        project: str,
        logstore: str,
        shard: int,
        *,
        key: str | None = None,
        count: int | None = None,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[ShardInfo]:
        """SplitShard at hash `key` (32 hex digits) or into `count` equal parts: the parent
        (now read-only) and its children, in the order SLS lists them."""
        params = {"action": "split"}
        if key:
            params["key"] = key
        if count:
            params["shardCount"] = str(count)
        answer = await self._call(
            "POST",
            project,
            _shard_resource(logstore, shard),
            params=params,
            endpoint=endpoint,
            region=region,
        )
        return _parse_list("SplitShard", answer, _shard_info_entry)

    async def merge_shards(
        self,
        project: str,
        logstore: str,
        shard: int,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[ShardInfo]:
        """MergeShards of `shard` and its right neighbour: the child and both (read-only)
        parents, in the order SLS lists them."""
        answer = await self._call(
            "POST",
            project,
            _shard_resource(logstore, shard),
            params={"action": "merge"},
            endpoint=endpoint,
            region=region,
        )
        return _parse_list("MergeShards", answer, _shard_info_entry)

    async def get_cursor(
        self,
        project: str,
        logstore: str,
        shard: int,
        start: CursorStart,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> str:
        """GetCursor: the shard's cursor at `start` ("begin", "end" or a unix time in seconds).

        A time before the oldest data gives the begin cursor, one after the newest the end.
        """
        key: _CursorKey = (endpoint, project, logstore, shard, _cursor_from(start))
        prepared = self._cursor_requests.get(key)
        if prepared is None:
            prepared = self._prepare_cursor(key)
        return _parse_cursor(_Answer.of(await self._send(prepared, b"", region)))

    def _prepare_cursor(self, key: _CursorKey) -> _Prepared:
        endpoint, project, logstore, shard, start = key
        prepared = _prepare(
            self._endpoint(endpoint),
            "GET",
            project,
            _shard_resource(logstore, shard),
            {"type": "cursor", "from": start},
            has_body=False,
            user_agent=self._user_agent,
        )
        if len(self._cursor_requests) >= _MAX_PREPARED:
            self._cursor_requests.clear()
        self._cursor_requests[key] = prepared
        return prepared

    async def get_cursor_time(
        self,
        project: str,
        logstore: str,
        shard: int,
        cursor: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> int:
        """GetCursorTime: when SLS received the log group at `cursor` (unix seconds).

        A cursor outside the shard's [begin, end] is refused with `InvalidCursor`.
        """
        params = {"type": "cursor_time", "cursor": cursor}
        answer = await self._call(
            "GET",
            project,
            _shard_resource(logstore, shard),
            params=params,
            endpoint=endpoint,
            region=region,
        )
        return _parse_cursor_time(answer)

    def _endpoint(self, text: str | None) -> Endpoint:
        if text is None:
            return self._default_endpoint
        cached = self._endpoints.get(text)
        if cached is None:
            cached = self._endpoints[text] = parse_endpoint(text)
        return cached

    async def _call(
        self,
        method: Method,
        project: str,
        resource: tuple[str, str],
        *,
        params: Mapping[str, str] | None = None,
        body: bytes = b"",
        endpoint: str | None,
        region: str | None,
    ) -> _Answer:
        """Prepare, sign and send one request; return the 200 answer or raise SLSError."""
        prepared = _prepare(
            self._endpoint(endpoint),
            method,
            project,
            resource,
            params or {},
            has_body=bool(body),
            user_agent=self._user_agent,
        )
        return _Answer.of(await self._send(prepared, body, region))

    async def _send(self, prepared: _Prepared, body: bytes, region: str | None) -> HttpAnswer:
        pools = self._require_started()
        creds = self._credentials()
        if not _header_safe(creds.security_token):
            message = "the security token holds characters an HTTP header cannot carry"
            raise SLSError("InvalidSecurityToken", 400, message)
        if self._signature_version == "v1":
            data = self._v1_request(prepared, body, creds)
        else:
            data = self._signed_request(prepared, body, creds, region or self._region)
        pool = pools.get(prepared.endpoint) or self._new_pool(pools, prepared.endpoint)
        try:
            answer = await pool.request(data)
        # TimeoutError first: it is an OSError too.
        except TimeoutError as exc:
            message = f"no complete answer from {pool.host} within {self._request_timeout}s"
            raise SLSError("Timeout", 0, message) from exc
        except OSError as exc:
            message = _scrub(f"{type(exc).__name__}: {exc}", creds)
            raise SLSError("ConnectionError", 0, message) from exc
        if log.isEnabledFor(logging.DEBUG):
            request_id = answer.headers.get(REQUEST_ID_HEADER, "")
            log.debug(
                "%s %s -> %d (%s)", prepared.method, prepared.raw_path, answer.status, request_id
            )
        if answer.status != HTTP_OK:
            raise _error_from_answer(_Answer.of(answer), creds)
        return answer

    def _v1_request(self, prepared: _Prepared, body: bytes, creds: Credentials) -> bytes:
        """The whole v1-signed request from its prepared parts: the hot path."""
        date = self._dates.text()
        md5 = hashlib.md5(body).hexdigest().upper() if body else ""
        authorization = prepared.v1.authorization(creds, date=date, content_md5=md5)
        token = creds.security_token
        head = (
            f"{prepared.v1_head}Date: {date}\r\n"
            f"{f'Content-MD5: {md5}{_CRLF}' if md5 else ''}"
            f"{f'x-acs-security-token: {token}{_CRLF}' if token else ''}"
            f"Authorization: {authorization}\r\n{_length_header(prepared, body)}\r\n"
        )
        return head.encode() + body

    def _signed_request(
        self, prepared: _Prepared, body: bytes, creds: Credentials, region: str | None
    ) -> bytes:
        """Any request signed by `signed_headers` (v4)."""
        headers = signed_headers(
            creds,
            prepared.method,
            prepared.raw_path,
            prepared.params,
            host=prepared.host,
            body=body,
            now=self._clock(),
            version=self._signature_version,
            region=region,
        )
        headers["User-Agent"] = self._user_agent
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return f"{prepared.request_line}{lines}{_length_header(prepared, body)}\r\n".encode() + body

    def _new_pool(
        self, pools: dict[Endpoint, ConnectionPool], endpoint: Endpoint
    ) -> ConnectionPool:
        secure = endpoint.scheme == "https"
        pool = pools[endpoint] = ConnectionPool(
            endpoint.host,
            endpoint.port or (443 if secure else 80),
            ssl_context=self._tls_context() if secure else None,
            limit=self._connection_limit,
            timeout=self._request_timeout,
        )
        return pool

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # Certificates verified against the system store, as aiohttp's ssl=True did.
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _require_started(self) -> dict[Endpoint, ConnectionPool]:
        if self._pools is None:
            raise RuntimeError("SLSClient is not started: call start() or use `async with`")
        return self._pools
