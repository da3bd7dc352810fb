"""The official aliyun-log-python-sdk's own signers accept the requests our client sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aliyun.log.auth import AuthV1, AuthV4
from aliyun.log.credentials import StaticCredentialsProvider
from aliyun.log.util import Util

from cpmgr.sls.client import SLSClient
from cpmgr.sls.signer import Credentials

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
REGION = "cn-hangzhou"
PLAIN = Credentials("testAccessKeyId", "testAccessKeySecret")
STS = Credentials("STS.testAccessKeyId", "testAccessKeySecret", "testSecurityToken")
CHECKPOINT = "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="


@dataclass(frozen=True)
class Captured:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]  # names in the case they arrived
    body: bytes


@dataclass
class Capture:
    requests: list[Captured] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Captured(
                method=request.method,
                path=request.path,
                params=dict(request.query),  # decoded, as the SDK holds them before sending
                headers={k.decode(): v.decode() for k, v in request.raw_headers},
                body=await request.read(),
            )
        )
        return web.json_response([])


@pytest.fixture
async def capture() -> AsyncIterator[tuple[Capture, int]]:
    recorder = Capture()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        assert server.port is not None
        yield recorder, server.port


async def _send_all(port: int, creds: Credentials, version: str) -> None:
    """Every kind of request the client makes: with a body, without one, with a shard query."""
    async with SLSClient(
        endpoint=f"http://127.0.0.1:{port}",
        credentials=lambda: creds,
        signature_version="v4" if version == "v4" else "v1",
        region=REGION if version == "v4" else None,
        clock=lambda: NOW,
    ) as client:
        await client.update_checkpoint("test-project", "test-logstore", "test-cg", 0, CHECKPOINT)
        await client.update_checkpoint(
            "test-project",
            "test-logstore",
            "test-cg",
            2,
            CHECKPOINT,
            consumer="consumer-1",
            force_success=False,
        )
        await client.get_checkpoint("test-project", "test-logstore", "test-cg", 0)
        await client.get_checkpoint("test-project", "test-logstore", "test-cg")
        await client.heartbeat("test-project", "test-logstore", "test-cg", "consumer-1", [0, 1])
        await client.list_consumer_groups("test-project", "test-logstore")


def _sdk_provider(creds: Credentials) -> StaticCredentialsProvider:
    return StaticCredentialsProvider(
        creds.access_key_id, creds.access_key_secret, creds.security_token
    )


def _unsigned(seen: Captured) -> dict[str, str]:
    """The captured headers minus what the SDK's signer computes itself."""
    computed = {"authorization", "content-md5", "x-log-content-sha256", "x-log-date", "date"}
    return {k: v for k, v in seen.headers.items() if k.lower() not in computed}


def _sdk_v1(seen: Captured, creds: Credentials, monkeypatch: pytest.MonkeyPatch) -> str:
    # The SDK stamps the current time as Date; pin it to the Date we sent. It recomputes
    # Content-MD5 from the body and adds x-log-date only after signing, as it does on the wire.
    monkeypatch.setattr(AuthV1, "_getGMT", staticmethod(lambda: seen.headers["Date"]))
    headers = _unsigned(seen)
    AuthV1(_sdk_provider(creds)).sign_request(
        seen.method, seen.path, dict(seen.params), headers, seen.body
    )
    return headers["Authorization"]


def _sdk_v4(seen: Captured, creds: Credentials) -> str:
    # `sign_request` is `_do_sign_request` at the current time; call it at the time we signed.
    # It recomputes x-log-content-sha256 from the body and signs Host and Content-Type as sent.
    headers = _unsigned(seen)
    auth = AuthV4(_sdk_provider(creds), REGION)
    signature: str = auth._do_sign_request(
        seen.method, seen.path, dict(seen.params), headers, seen.body, seen.headers["x-log-date"]
    )
    assert headers["x-log-content-sha256"] == seen.headers["x-log-content-sha256"]
    return signature


@pytest.mark.parametrize("creds", [PLAIN, STS], ids=["plain", "sts"])
async def test_sdk_v1_signer_accepts_our_requests(
    capture: tuple[Capture, int], creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, port = capture
    await _send_all(port, creds, "v1")
    assert len(recorder.requests) == 6
    for seen in recorder.requests:
        assert "x-log-date" not in seen.headers  # the SDK would not have signed it either
        assert _sdk_v1(seen, creds, monkeypatch) == seen.headers["Authorization"]
        if seen.body:
            assert seen.headers["Content-MD5"] == Util.cal_md5(seen.body)


@pytest.mark.parametrize("creds", [PLAIN, STS], ids=["plain", "sts"])
async def test_sdk_v4_signer_accepts_our_requests(
    capture: tuple[Capture, int], creds: Credentials
) -> None:
    recorder, port = capture
    await _send_all(port, creds, "v4")
    assert len(recorder.requests) == 6
    for seen in recorder.requests:
        assert _sdk_v4(seen, creds) == seen.headers["Authorization"]


async def test_sdk_rejects_a_tampered_request(
    capture: tuple[Capture, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison is not vacuous: a changed query parameter changes the SDK's signature."""
    recorder, port = capture
    await _send_all(port, STS, "v1")
    await _send_all(port, STS, "v4")
    v1, v4 = recorder.requests[1], recorder.requests[7]
    for seen in (v1, v4):
        seen.params["forceSuccess"] = "true"
    assert _sdk_v1(v1, STS, monkeypatch) != v1.headers["Authorization"]
    assert _sdk_v4(v4, STS) != v4.headers["Authorization"]
