"""The SLS client against a real local aiohttp server: wire, signatures, each failure class."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from cpmgr.errors import SLSError
from cpmgr.sls.client import (
    ConsumerGroup,
    Endpoint,
    RemoteCheckpoint,
    ShardInfo,
    SLSClient,
    parse_endpoint,
)
from cpmgr.sls.signer import Credentials, sign_v1, sign_v4

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
SECRET = "s3cret-Key/+="
TOKEN = "sts-T0ken-value"
CREDS = Credentials("testAccessKeyId", SECRET)
STS_CREDS = Credentials("STS.testAccessKeyId", SECRET, TOKEN)
CHECKPOINT = "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="
PROJECT, LOGSTORE, GROUP = "test-project", "test-logstore", "test-cg"
GROUP_PATH = f"/logstores/{LOGSTORE}/consumergroups/{GROUP}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query_string: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    peer: tuple[str, int]


def reply(status: int = 200, body: object = b"", *, request_id: str = "") -> Handler:
    """A handler answering `status` with `body` (bytes as is, anything else as JSON)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"x-log-requestid": request_id} if request_id else {}
        return web.Response(status=status, body=payload, headers=headers)

    return handle


@dataclass
class FakeSLS:
    """A recording HTTP server; `answer` decides what each request gets."""

    answer: Handler = field(default_factory=reply)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        transport = request.transport
        assert transport is not None
        self.seen.append(
            Seen(
                method=request.method,
                path=request.path,
                query_string=request.raw_path.partition("?")[2],  # as on the wire
                query=dict(request.query),
                headers=CIMultiDict(request.headers),
                body=body,
                peer=transport.get_extra_info("peername"),
            )
        )
        return await self.answer(request)

    @property
    def last(self) -> Seen:
        return self.seen[-1]


def _app(fake: FakeSLS) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    return app


@pytest.fixture
async def sls() -> AsyncIterator[FakeSLS]:
    fake = FakeSLS()
    async with TestServer(_app(fake), host="127.0.0.1", port=0) as server:
        assert server.port is not None
        fake.port = server.port
        yield fake


MakeClient = Callable[..., Awaitable[SLSClient]]


@pytest.fixture
async def make_client(sls: FakeSLS) -> AsyncIterator[MakeClient]:
    """Started clients pointed at the fake server by default; closed after the test."""
    clients: list[SLSClient] = []

    async def make(**options: Any) -> SLSClient:
        options.setdefault("endpoint", f"http://127.0.0.1:{sls.port}")
        options.setdefault("credentials", lambda: CREDS)
        options.setdefault("clock", lambda: NOW)
        client = SLSClient(**options)
        clients.append(client)
        await client.start()
        return client

    yield make
    for client in clients:
        await client.close()


def _free_port() -> int:
    """A loopback port nothing listens on: bound, read, closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _failure(call: Awaitable[object]) -> SLSError:
    with pytest.raises(SLSError) as caught:
        await call
    return caught.value


# --- the request on the wire -----------------------------------------------------------------


async def test_update_checkpoint_request_line_headers_and_body(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    client = await make_client()
    await client.update_checkpoint(
        PROJECT, LOGSTORE, GROUP, 3, CHECKPOINT, consumer="consumer-1", force_success=False
    )
    seen = sls.last
    assert seen.method == "POST"
    assert seen.path == GROUP_PATH
    assert seen.query_string == "type=checkpoint&consumer=consumer-1&forceSuccess=false"
    assert seen.body == b'{"shard":3,"checkpoint":"MTUyNDE1NTM3OTM3MzkwODQ5Ng=="}'
    assert seen.headers["Host"] == "test-project.127.0.0.1"
    assert seen.headers.getall("Content-Type") == ["application/json"]
    assert seen.headers["Content-MD5"] == hashlib.md5(seen.body).hexdigest().upper()
    assert seen.headers["Date"] == "Tue, 02 Jan 2024 03:04:05 GMT"
    assert seen.headers["x-log-apiversion"] == "0.6.0"
    assert seen.headers["x-log-signaturemethod"] == "hmac-sha1"
    assert seen.headers["User-Agent"].startswith("cpmgr/")
    assert seen.headers["Authorization"].startswith("LOG testAccessKeyId:")
    assert "x-acs-security-token" not in seen.headers


async def test_empty_consumer_is_sent_and_force_success_is_lowercase_true(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    client = await make_client()
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    assert sls.last.query_string == "type=checkpoint&consumer=&forceSuccess=true"
    assert sls.last.query == {"type": "checkpoint", "consumer": "", "forceSuccess": "true"}


async def test_query_values_are_percent_encoded(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client()
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT, consumer="a b&c=d")
    assert sls.last.query_string == "type=checkpoint&consumer=a%20b%26c%3Dd&forceSuccess=true"
    assert sls.last.query["consumer"] == "a b&c=d"


async def test_sts_token_is_sent(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client(credentials=lambda: STS_CREDS)
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    assert sls.last.headers["x-acs-security-token"] == TOKEN


async def test_credentials_are_read_before_every_request(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    keys = iter([Credentials("old-id", "old-secret"), Credentials("new-id", "new-secret")])
    client = await make_client(credentials=lambda: next(keys))
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    ids = [seen.headers["Authorization"].split()[1].split(":")[0] for seen in sls.seen]
    assert ids == ["old-id", "new-id"]


async def test_custom_user_agent(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client(user_agent="my-agent/1")
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    assert sls.last.headers["User-Agent"] == "my-agent/1"


def _verify_signature(seen: Seen, creds: Credentials, region: str | None) -> None:
    """What an SLS server does: rebuild the signature from the received request."""
    headers = {k: v for k, v in seen.headers.items() if k.lower() != "authorization"}
    if region is None:
        if seen.body:
            assert seen.headers["Content-MD5"] == hashlib.md5(seen.body).hexdigest().upper()
        expected = sign_v1(creds, seen.method, seen.path, seen.query, headers)
    else:
        assert seen.headers["x-log-content-sha256"] == hashlib.sha256(seen.body).hexdigest()
        expected = sign_v4(creds, seen.method, seen.path, seen.query, headers, region=region)
    assert seen.headers["Authorization"] == expected


@pytest.mark.parametrize("creds", [CREDS, STS_CREDS], ids=["plain", "sts"])
@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_server_recomputes_our_signature(
    sls: FakeSLS, make_client: MakeClient, creds: Credentials, version: str
) -> None:
    region = "cn-hangzhou" if version == "v4" else None
    client = await make_client(credentials=lambda: creds, signature_version=version, region=region)
    sls.answer = reply(200, [])
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 1, CHECKPOINT, consumer="c-1")
    await client.get_checkpoint(PROJECT, LOGSTORE, GROUP, 1)
    await client.heartbeat(PROJECT, LOGSTORE, GROUP, "c-1", [0, 1])
    await client.update_consumer_group(PROJECT, LOGSTORE, GROUP, heartbeat_timeout=30)
    await client.list_shards(PROJECT, LOGSTORE)
    assert [seen.method for seen in sls.seen] == ["POST", "GET", "POST", "PUT", "GET"]
    for seen in sls.seen:
        _verify_signature(seen, creds, region)


async def test_v4_request_headers(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client(signature_version="v4", region="cn-hangzhou")
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    headers = sls.last.headers
    assert headers["x-log-date"] == "20240102T030405Z"
    assert headers["Authorization"].startswith(
        "SLS4-HMAC-SHA256 Credential=testAccessKeyId/20240102/cn-hangzhou/sls/aliyun_v4_request,"
    )
    assert "Date" not in headers
    assert "Content-MD5" not in headers


async def test_per_call_region_override(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client(signature_version="v4", region="cn-hangzhou")
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT, region="cn-beijing")
    assert "/cn-beijing/sls/aliyun_v4_request," in sls.last.headers["Authorization"]
    _verify_signature(sls.last, CREDS, "cn-beijing")


async def test_per_call_endpoint_override_shares_the_client(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    client = await make_client(endpoint=f"http://127.0.0.1:{_free_port()}")
    override = f"http://127.0.0.1:{sls.port}"
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT, endpoint=override)
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 1, CHECKPOINT, endpoint=override)
    assert [json.loads(seen.body)["shard"] for seen in sls.seen] == [0, 1]
    with pytest.raises(SLSError) as caught:
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 2, CHECKPOINT)
    assert caught.value.code == "ConnectionError"


async def test_connections_are_kept_alive(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client()
    for shard in range(3):
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, shard, CHECKPOINT)
    assert len({seen.peer for seen in sls.seen}) == 1


async def test_connection_limit_bounds_concurrent_connections(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    client = await make_client(connection_limit=2)
    await asyncio.gather(
        *(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, s, CHECKPOINT) for s in range(6))
    )
    assert len(sls.seen) == 6
    # All six start at once; only two connections may exist, so they carry everything.
    assert len({seen.peer for seen in sls.seen}) == 2


# --- answers and their parsing ---------------------------------------------------------------


async def test_get_checkpoint_for_one_shard(sls: FakeSLS, make_client: MakeClient) -> None:
    sls.answer = reply(
        200,
        [{"shard": 0, "checkpoint": CHECKPOINT, "updateTime": 1524224984800922, "consumer": "c"}],
    )
    client = await make_client()
    result = await client.get_checkpoint(PROJECT, LOGSTORE, GROUP, 0)
    assert result == [RemoteCheckpoint(0, CHECKPOINT, 1524224984800922, "c")]
    seen = sls.last
    assert (seen.method, seen.path, seen.query_string) == ("GET", GROUP_PATH, "shard=0")
    assert seen.body == b""
    assert "Content-Type" not in seen.headers
    assert "Content-MD5" not in seen.headers
    assert seen.headers["x-log-bodyrawsize"] == "0"


async def test_get_checkpoint_for_all_shards(sls: FakeSLS, make_client: MakeClient) -> None:
    sls.answer = reply(
        200,
        [
            {"shard": 0, "checkpoint": CHECKPOINT, "updateTime": 5, "consumer": "c"},
            {"shard": 1, "checkpoint": ""},  # never committed: no consumer, no time
        ],
    )
    client = await make_client()
    result = await client.get_checkpoint(PROJECT, LOGSTORE, GROUP)
    assert result == [RemoteCheckpoint(0, CHECKPOINT, 5, "c"), RemoteCheckpoint(1, "", 0, "")]
    assert sls.last.query_string == ""


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b'{"shard": 0}',
        b'[{"checkpoint": "x"}]',
        b'[{"shard": "0", "checkpoint": "x"}]',
        b'[{"shard": true, "checkpoint": "x"}]',
        b'[{"shard": 0, "checkpoint": 5}]',
        b'[{"shard": 0, "checkpoint": "x", "updateTime": "soon"}]',
        b"[1]",
    ],
)
async def test_malformed_get_checkpoint_answer_is_a_retryable_error(
    sls: FakeSLS, make_client: MakeClient, body: bytes
) -> None:
    sls.answer = reply(200, body, request_id="REQ-1")
    client = await make_client()
    err = await _failure(client.get_checkpoint(PROJECT, LOGSTORE, GROUP, 0))
    assert (err.code, err.status, err.request_id) == ("HTTP200", 200, "REQ-1")
    assert err.retryable
    assert "GetCheckPoint" in err.message


async def test_heartbeat(sls: FakeSLS, make_client: MakeClient) -> None:
    sls.answer = reply(200, [1])
    client = await make_client()
    assert await client.heartbeat(PROJECT, LOGSTORE, GROUP, "c-1", [0, 1]) == [1]
    seen = sls.last
    assert (seen.method, seen.path) == ("POST", GROUP_PATH)
    assert seen.query_string == "type=heartbeat&consumer=c-1"
    assert seen.body == b"[0,1]"
    sls.answer = reply(200, b"")
    err = await _failure(client.heartbeat(PROJECT, LOGSTORE, GROUP, "c-1", []))
    assert err.code == "HTTP200"


async def test_create_and_list_consumer_groups(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client()
    await client.create_consumer_group(PROJECT, LOGSTORE, GROUP, heartbeat_timeout=60, order=True)
    seen = sls.last
    assert (seen.method, seen.path, seen.query_string) == (
        "POST",
        f"/logstores/{LOGSTORE}/consumergroups",
        "",
    )
    assert json.loads(seen.body) == {"consumerGroup": GROUP, "timeout": 60, "order": True}
    sls.answer = reply(200, [{"name": GROUP, "timeout": 60, "order": True}])
    assert await client.list_consumer_groups(PROJECT, LOGSTORE) == [ConsumerGroup(GROUP, 60, True)]
    assert sls.last.method == "GET"


async def test_update_consumer_group_sends_only_what_changes(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    client = await make_client()
    await client.update_consumer_group(PROJECT, LOGSTORE, GROUP, heartbeat_timeout=30, order=True)
    seen = sls.last
    assert (seen.method, seen.path, seen.query_string) == ("PUT", GROUP_PATH, "")
    assert json.loads(seen.body) == {"order": True, "timeout": 30}
    assert seen.headers["Content-MD5"] == hashlib.md5(seen.body).hexdigest().upper()
    await client.update_consumer_group(PROJECT, LOGSTORE, GROUP, order=False)
    assert json.loads(sls.last.body) == {"order": False}
    await client.update_consumer_group(PROJECT, LOGSTORE, GROUP, heartbeat_timeout=45)
    assert json.loads(sls.last.body) == {"timeout": 45}
    with pytest.raises(ValueError, match="heartbeat_timeout, order or both"):
        await client.update_consumer_group(PROJECT, LOGSTORE, GROUP)
    assert len(sls.seen) == 3


async def test_list_shards(sls: FakeSLS, make_client: MakeClient) -> None:
    listing = [
        {
            "shardID": 0,
            "status": "readonly",
            "inclusiveBeginKey": "0" * 32,
            "exclusiveEndKey": "8" + "0" * 31,
            "createTime": 1700000000,
            "serverIp": "10.0.0.1",  # optional, ignored
        },
        {
            "shardID": 2,
            "status": "readwrite",
            "inclusiveBeginKey": "0" * 32,
            "exclusiveEndKey": "4" + "0" * 31,
            "createTime": 1700000100,
        },
    ]
    sls.answer = reply(200, listing)
    client = await make_client()
    shards = await client.list_shards(PROJECT, LOGSTORE)
    assert (sls.last.method, sls.last.path) == ("GET", f"/logstores/{LOGSTORE}/shards")
    assert shards == [
        ShardInfo(0, "readonly", "0" * 32, "8" + "0" * 31, 1700000000),
        ShardInfo(2, "readwrite", "0" * 32, "4" + "0" * 31, 1700000100),
    ]
    assert [shard.read_only for shard in shards] == [True, False]


@pytest.mark.parametrize(
    ("start", "sent"),
    [("begin", "begin"), ("end", "end"), (1700000000, "1700000000"), (0, "0")],
)
async def test_get_cursor_request(
    sls: FakeSLS, make_client: MakeClient, start: Literal["begin", "end"] | int, sent: str
) -> None:
    sls.answer = reply(200, {"cursor": CHECKPOINT})
    client = await make_client()
    assert await client.get_cursor(PROJECT, LOGSTORE, 7, start) == CHECKPOINT
    seen = sls.last
    assert (seen.method, seen.path) == ("GET", f"/logstores/{LOGSTORE}/shards/7")
    assert seen.query_string == f"type=cursor&from={sent}"
    assert seen.body == b""


@pytest.mark.parametrize("start", ["now", "", -1, True, 1.5])
async def test_get_cursor_refuses_a_bad_start_before_sending(
    sls: FakeSLS, make_client: MakeClient, start: Any
) -> None:
    client = await make_client()
    with pytest.raises(ValueError, match="unix time"):
        await client.get_cursor(PROJECT, LOGSTORE, 0, start)
    assert sls.seen == []


@pytest.mark.parametrize(
    "body", [b"", b"[]", b'{"cursor": ""}', b'{"cursor": 5}', b'{"next": "MTA="}']
)
async def test_malformed_get_cursor_answer_is_a_retryable_error(
    sls: FakeSLS, make_client: MakeClient, body: bytes
) -> None:
    sls.answer = reply(200, body, request_id="REQ-2")
    client = await make_client()
    err = await _failure(client.get_cursor(PROJECT, LOGSTORE, 0, "begin"))
    assert (err.code, err.status, err.request_id) == ("HTTP200", 200, "REQ-2")
    assert err.retryable
    assert "GetCursor" in err.message


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'[{"shardID": "0", "status": "readwrite"}]',
        b'[{"shardID": 0}]',
        b'[{"shardID": 0, "status": "readwrite", "createTime": "today"}]',
    ],
)
async def test_malformed_list_shards_answer_is_a_retryable_error(
    sls: FakeSLS, make_client: MakeClient, body: bytes
) -> None:
    sls.answer = reply(200, body)
    client = await make_client()
    err = await _failure(client.list_shards(PROJECT, LOGSTORE))
    assert (err.code, err.retryable) == ("HTTP200", True)
    assert "ListShards" in err.message


async def test_one_shard_checkpoint_is_picked_from_the_answer(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    entry = {"shard": 3, "checkpoint": CHECKPOINT, "updateTime": 1, "consumer": "c-1"}
    other = {"shard": 4, "checkpoint": "", "updateTime": 0, "consumer": ""}
    sls.answer = reply(200, [other, entry])
    client = await make_client()
    found = await client.get_shard_checkpoint(PROJECT, LOGSTORE, GROUP, 3)
    assert found == RemoteCheckpoint(3, CHECKPOINT, 1, "c-1")
    assert sls.last.query_string == "shard=3"
    sls.answer = reply(200, [])  # what SLS answers for a shard that does not exist
    assert await client.get_shard_checkpoint(PROJECT, LOGSTORE, GROUP, 9) is None


@pytest.mark.parametrize(
    ("status", "code", "expired", "ownership"),
    [
        (400, "NotExistConsumerWithBody", True, False),
        (404, "ConsumerNotExist", True, True),
        (404, "ConsumerNotExsit", True, True),
        (400, "ConsumerNotMatch", False, True),
        (404, "ConsumerGroupNotExist", False, False),
        (403, "MetaOperationQpsLimitExceeded", False, False),
    ],
)
async def test_heartbeat_errors_say_whether_the_member_expired(
    sls: FakeSLS, make_client: MakeClient, status: int, code: str, expired: bool, ownership: bool
) -> None:
    sls.answer = reply(status, {"errorCode": code, "errorMessage": "no"})
    client = await make_client()
    err = await _failure(client.heartbeat(PROJECT, LOGSTORE, GROUP, "c-1", [0]))
    assert (err.code, err.status) == (code, status)
    assert (err.member_expired, err.ownership) == (expired, ownership)
    assert err.retryable == (code == "MetaOperationQpsLimitExceeded")
    assert err.throttling == (code == "MetaOperationQpsLimitExceeded")


# --- failures, one per class of the table in docs/design.md ("Failures") -------------------


@pytest.mark.parametrize(
    ("status", "code", "failure_class"),
    [
        (500, "InternalServerError", "retryable"),
        (503, "ServerBusy", "retryable"),
        (403, "WriteQuotaExceed", "retryable"),
        (401, "SignatureNotMatch", "credentials"),
        (400, "RequestTimeExpired", "credentials"),
        (401, "SecurityTokenExpired", "credentials"),
        (404, "ConsumerGroupNotExist", "permanent"),
        (404, "ConsumerNotExsit", "permanent"),
        (404, "ConsumerNotExist", "permanent"),
        (400, "InvalidShardCheckPoint", "permanent"),
        (400, "SomethingNew", "permanent"),
    ],
)
async def test_sls_error_answers_are_typed(
    sls: FakeSLS, make_client: MakeClient, status: int, code: str, failure_class: str
) -> None:
    sls.answer = reply(
        status, {"errorCode": code, "errorMessage": f"{code} happened"}, request_id="5B0A619F"
    )
    client = await make_client()
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status, err.message, err.request_id) == (
        code,
        status,
        f"{code} happened",
        "5B0A619F",
    )
    assert err.failure_class == failure_class


async def test_throttling_and_ownership_flags(sls: FakeSLS, make_client: MakeClient) -> None:
    client = await make_client()
    sls.answer = reply(403, {"errorCode": "WriteQuotaExceed", "errorMessage": "slow down"})
    throttled = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    sls.answer = reply(404, {"errorCode": "ConsumerNotExsit", "errorMessage": "who?"})
    unowned = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert throttled.throttling and not throttled.ownership
    assert unowned.ownership and not unowned.throttling


async def test_non_json_502_is_retryable(sls: FakeSLS, make_client: MakeClient) -> None:
    sls.answer = reply(502, b"<html><body>502 Bad Gateway</body></html>")
    client = await make_client()
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status) == ("HTTP502", 502)
    assert "502 Bad Gateway" in err.message
    assert err.retryable


@pytest.mark.parametrize(
    ("status", "body", "failure_class"),
    [
        (400, {"errorMessage": "no code"}, "permanent"),
        (500, {"errorCode": "InternalServerError"}, "retryable"),
        (404, [1, 2], "permanent"),
        (204, b"", "retryable"),  # only 200 is success; an answer we do not understand is kept
    ],
)
async def test_error_body_without_code_and_message_is_http_status(
    sls: FakeSLS, make_client: MakeClient, status: int, body: object, failure_class: str
) -> None:
    sls.answer = reply(status, body)
    client = await make_client()
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status, err.failure_class) == (f"HTTP{status}", status, failure_class)


async def test_timeout_is_retryable(sls: FakeSLS, make_client: MakeClient) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    sls.answer = hang
    client = await make_client(request_timeout=0.2)
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status) == ("Timeout", 0)
    assert err.retryable


async def test_refused_connection_is_retryable(make_client: MakeClient) -> None:
    client = await make_client(endpoint=f"http://127.0.0.1:{_free_port()}")
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status) == ("ConnectionError", 0)
    assert err.retryable


async def test_connection_dropped_without_answer_is_retryable(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    sls.answer = drop
    client = await make_client()
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status) == ("ConnectionError", 0)
    assert err.retryable


async def test_secrets_never_appear_in_errors_or_repr(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    sls.answer = reply(
        401, {"errorCode": "Unauthorized", "errorMessage": f"bad {SECRET} or {TOKEN}"}
    )
    client = await make_client(credentials=lambda: STS_CREDS)
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    sls.answer = reply(502, f"proxy echo: {SECRET} {TOKEN}".encode())
    gateway = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    for text in (str(err), repr(err), err.message, str(gateway), repr(client)):
        assert SECRET not in text
        assert TOKEN not in text
    assert err.credentials_problem


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_sls(tls_ca: trustme.CA) -> AsyncIterator[FakeSLS]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_context)
    fake = FakeSLS()
    runner = web.AppRunner(_app(fake))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    fake.port = runner.addresses[0][1]
    yield fake
    await runner.cleanup()


async def test_https_is_the_default_and_certificates_are_verified(
    tls_sls: FakeSLS, tls_ca: trustme.CA, make_client: MakeClient
) -> None:
    trusting = ssl.create_default_context()
    tls_ca.configure_trust(trusting)
    client = await make_client(endpoint=f"127.0.0.1:{tls_sls.port}", ssl_context=trusting)
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    assert tls_sls.last.headers["Host"] == "test-project.127.0.0.1"

    untrusting = await make_client(endpoint=f"https://127.0.0.1:{tls_sls.port}")
    err = await _failure(untrusting.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status) == ("ConnectionError", 0)
    assert err.retryable
    assert len(tls_sls.seen) == 1


async def test_a_large_answer_over_tls(
    tls_sls: FakeSLS, tls_ca: trustme.CA, make_client: MakeClient
) -> None:
    entries = [
        {"shard": n, "checkpoint": CHECKPOINT, "updateTime": n, "consumer": f"c-{n}"}
        for n in range(5000)
    ]
    tls_sls.answer = reply(200, entries)
    trusting = ssl.create_default_context()
    tls_ca.configure_trust(trusting)
    client = await make_client(endpoint=f"127.0.0.1:{tls_sls.port}", ssl_context=trusting)
    result = await client.get_checkpoint(PROJECT, LOGSTORE, GROUP)
    assert result == [RemoteCheckpoint(n, CHECKPOINT, n, f"c-{n}") for n in range(5000)]


# --- endpoints and lifecycle -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cn-hangzhou.log.aliyuncs.com", Endpoint("https", "cn-hangzhou.log.aliyuncs.com", None)),
        ("127.0.0.1:8080", Endpoint("https", "127.0.0.1", 8080)),
        ("http://127.0.0.1:8080", Endpoint("http", "127.0.0.1", 8080)),
        (
            "https://cn-hangzhou.log.aliyuncs.com",
            Endpoint("https", "cn-hangzhou.log.aliyuncs.com", None),
        ),
        ("HTTP://Example.COM/", Endpoint("http", "example.com", None)),
        (" localhost:9000 ", Endpoint("https", "localhost", 9000)),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ftp://host",
        "http://",
        "host:notaport",
        "host:70000",
        "host:0",
        "http://host/path",
        "http://user:pw@host",
        "http://host?x=1",
        "bad host",
        "under_score.example.com",
        "[::1]:8080",
        "-leading.example.com",
    ],
)
def test_parse_endpoint_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="invalid endpoint"):
        parse_endpoint(text)


def test_client_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        SLSClient(endpoint="nope://x", credentials=lambda: CREDS)
    with pytest.raises(ValueError):
        SLSClient(endpoint="example.com", credentials=lambda: CREDS, request_timeout=0)
    with pytest.raises(ValueError):
        SLSClient(endpoint="example.com", credentials=lambda: CREDS, connection_limit=0)


async def test_lifecycle(sls: FakeSLS) -> None:
    client = SLSClient(
        endpoint=f"http://127.0.0.1:{sls.port}", credentials=lambda: CREDS, clock=lambda: NOW
    )
    with pytest.raises(RuntimeError, match="not started"):
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    async with client as entered:
        assert entered is client
        await client.start()  # a second start is harmless
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    await client.close()  # idempotent
    with pytest.raises(RuntimeError):
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    assert len(sls.seen) == 1


# --- the HTTP transport: framing, keep-alive and the prepared hot path -----------------------


@pytest.mark.parametrize(
    "checkpoint",
    ["", 'quote " and \\ backslash', "line\nbreak\t\x01", "ünïcödé ✓", "MTAw" * 300],
)
async def test_checkpoint_body_is_compact_json_of_any_string(
    sls: FakeSLS, make_client: MakeClient, checkpoint: str
) -> None:
    client = await make_client(credentials=lambda: STS_CREDS)
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 12, checkpoint, consumer="c-1")
    expected = json.dumps({"shard": 12, "checkpoint": checkpoint}, separators=(",", ":"))
    assert sls.last.body == expected.encode()
    assert json.loads(sls.last.body)["checkpoint"] == checkpoint
    _verify_signature(sls.last, STS_CREDS, None)


async def test_date_follows_the_clock_second_by_second(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    moments = iter(
        [NOW, NOW.replace(microsecond=900_000), NOW.replace(second=6), NOW.replace(minute=5)]
    )
    client = await make_client(clock=lambda: next(moments))
    for shard in range(4):
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, shard, CHECKPOINT)
    assert [seen.headers["Date"] for seen in sls.seen] == [
        "Tue, 02 Jan 2024 03:04:05 GMT",
        "Tue, 02 Jan 2024 03:04:05 GMT",
        "Tue, 02 Jan 2024 03:04:06 GMT",
        "Tue, 02 Jan 2024 03:05:05 GMT",
    ]
    for seen in sls.seen:
        _verify_signature(seen, CREDS, None)


async def test_default_clock_sends_the_current_date(sls: FakeSLS, make_client: MakeClient) -> None:
    client = SLSClient(endpoint=f"http://127.0.0.1:{sls.port}", credentials=lambda: CREDS)
    async with client:
        before = datetime.now(UTC).replace(microsecond=0)
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
        after = datetime.now(UTC)
    sent = parsedate_to_datetime(sls.last.headers["Date"])
    assert before <= sent <= after
    _verify_signature(sls.last, CREDS, None)


async def test_a_project_that_cannot_be_a_host_header_is_refused_before_sending(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    client = await make_client()
    err = await _failure(client.update_checkpoint("evil\r\nX-Injected: 1", LOGSTORE, GROUP, 0, ""))
    assert (err.code, err.status, err.failure_class) == ("ParameterInvalid", 400, "permanent")
    assert sls.seen == []


async def test_a_large_answer_over_many_segments(sls: FakeSLS, make_client: MakeClient) -> None:
    entries = [
        {"shard": n, "checkpoint": CHECKPOINT, "updateTime": n, "consumer": f"c-{n}"}
        for n in range(5000)
    ]
    sls.answer = reply(200, entries)
    client = await make_client()
    result = await client.get_checkpoint(PROJECT, LOGSTORE, GROUP)
    assert result == [RemoteCheckpoint(n, CHECKPOINT, n, f"c-{n}") for n in range(5000)]


async def test_after_a_timeout_the_connection_is_not_reused(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    release = asyncio.Event()
    first = True

    async def hang_once(request: web.Request) -> web.StreamResponse:
        nonlocal first
        if first:
            first = False
            await release.wait()
        return web.Response()

    sls.answer = hang_once
    client = await make_client(request_timeout=0.2)
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert err.code == "Timeout"
    release.set()
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 1, CHECKPOINT)
    assert len({seen.peer for seen in sls.seen}) == 2  # the late answer could not be mistaken


async def test_close_fails_requests_in_flight(sls: FakeSLS, make_client: MakeClient) -> None:
    arrived = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.Event().wait()
        return web.Response()

    sls.answer = hang
    client = await make_client()
    pending = asyncio.ensure_future(
        client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    )
    await asyncio.wait_for(arrived.wait(), 5)
    await client.close()
    err = await _failure(pending)
    assert (err.code, err.status) == ("ConnectionError", 0)


@dataclass
class ScriptedServer:
    """A loopback server answering each complete request with the next scripted bytes, then
    closing the connection when the script says so (`(b"", True)`: close without answering)."""

    script: list[tuple[bytes, bool]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    def protocol(self) -> asyncio.Protocol:
        return _Scripted(self)


class _Scripted(asyncio.Protocol):
    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, separator, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if not separator or len(rest) < length:
            return
        self.server.requests.append(head + separator + rest[:length])
        self.buffer = rest[length:]
        answer, close = self.server.script.pop(0)
        self.transport.write(answer)
        if close:
            self.transport.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    fake = ScriptedServer(script=[])
    server = await asyncio.get_running_loop().create_server(fake.protocol, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    async with server:
        yield fake


OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (OK_EMPTY, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK_EMPTY, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    ],
    ids=["keep-alive", "connection-close", "100-continue", "chunked", "http-1.0"],
)
async def test_answer_framings_and_when_the_connection_is_reused(
    scripted: ScriptedServer, make_client: MakeClient, answer: bytes, reused: bool
) -> None:
    scripted.script = [(answer, False), (OK_EMPTY, False)]
    client = await make_client(endpoint=f"http://127.0.0.1:{scripted.port}")
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT)
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 1, CHECKPOINT)
    assert len(scripted.requests) == 2
    assert scripted.connections == (1 if reused else 2)


async def test_chunked_and_read_to_close_bodies_are_parsed(
    scripted: ScriptedServer, make_client: MakeClient
) -> None:
    error = b'{"errorCode":"ServerBusy","errorMessage":"busy now"}'
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (error[:9], error[9:]))
    listing = json.dumps([{"name": GROUP, "timeout": 60, "order": False}]).encode()
    scripted.script = [
        (
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nx-log-requestid: R-1\r\n\r\n"
            + chunks
            + b"0\r\nTrailer: x\r\n\r\n",
            False,
        ),
        # No length: the body ends when the server closes the connection.
        (b"HTTP/1.1 200 OK\r\n\r\n" + listing, True),
    ]
    client = await make_client(endpoint=f"http://127.0.0.1:{scripted.port}")
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status, err.message, err.request_id) == (
        "ServerBusy",
        503,
        "busy now",
        "R-1",
    )
    assert await client.list_consumer_groups(PROJECT, LOGSTORE) == [ConsumerGroup(GROUP, 60, False)]


@pytest.mark.parametrize(
    ("answer", "close"),
    [
        (b"SMTP ready\r\n\r\n", False),
        (b"HTTP/1.1 2xx OK\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True),
        (b"HTTP/1.1 200 OK\r\nContent-Le", True),
        (b"", True),
    ],
    ids=[
        "not-http",
        "bad-status",
        "bad-header",
        "bad-length",
        "bad-chunk",
        "cut",
        "cut-head",
        "closed",
    ],
)
async def test_malformed_or_cut_answers_are_retryable_connection_errors(
    scripted: ScriptedServer, make_client: MakeClient, answer: bytes, close: bool
) -> None:
    scripted.script = [(answer, close), (OK_EMPTY, False)]
    client = await make_client(endpoint=f"http://127.0.0.1:{scripted.port}")
    err = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, CHECKPOINT))
    assert (err.code, err.status) == ("ConnectionError", 0)
    assert err.retryable
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 1, CHECKPOINT)  # a fresh connection
    assert scripted.connections == 2


async def test_a_timed_out_request_gives_its_only_slot_back(
    sls: FakeSLS, make_client: MakeClient
) -> None:
    never = asyncio.Event()
    first = True

    async def hang_first(request: web.Request) -> web.StreamResponse:
        nonlocal first
        if first:
            first = False
            await never.wait()
        return web.Response()

    sls.answer = hang_first
    client = await make_client(connection_limit=1, request_timeout=0.3)
    hung = await _failure(client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, ""))
    assert hung.code == "Timeout"
    # With a leaked slot this would wait for one forever, and time out too.
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 1, "")
    assert [json.loads(seen.body)["shard"] for seen in sls.seen] == [0, 1]
