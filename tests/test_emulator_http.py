"""The emulator over HTTP: signatures, clock skew, SLS-style errors for bad requests, admin
endpoints, the state file, TLS and the command line."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from cpmgr.emulator import add_emulator_arguments, run_emulator_from_args, running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.sls.signer import Credentials, SignatureVersion, signed_headers

P, L, G = "proj", "store", "group-a"
KEY_ID, SECRET = "test-key-id", "test-key-secret"
CREDS = Credentials(KEY_ID, SECRET)
HOST = f"{P}.cn-hangzhou.log.aliyuncs.com"
GROUP_PATH = f"/logstores/{L}/consumergroups/{G}"
CHECKPOINT_PARAMS = {"type": "checkpoint", "consumer": "", "forceSuccess": "true"}
CP = "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="
VECTORS = Path(__file__).with_name("data") / "sls-vectors.json"


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return str(self.json["errorCode"]) if self.status != 200 else "OK"


async def send(
    session: aiohttp.ClientSession,
    handle: EmulatorHandle,
    method: str,
    path: str,
    params: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    creds: Credentials | None = CREDS,
    version: SignatureVersion = "v1",
    now: datetime | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """A request signed like an SLS SDK would (or unsigned with `creds=None`)."""
    params = dict(params or {})
    sent: dict[str, str] = {"Host": HOST}
    if creds is not None:
        sent = signed_headers(
            creds,
            method,
            path,
            params,
            host=HOST,
            body=body,
            now=now or datetime.now(UTC),
            version=version,
            region="cn-hangzhou",
        )
    sent.update(headers or {})
    url = URL(handle.url + path).with_query(params)
    # aiohttp warns about large raw bytes bodies; a file-like object streams them
    data = io.BytesIO(body) if len(body) > 64 * 1024 else body or None
    async with session.request(method, url, data=data, headers=sent) as response:
        return Answer(response.status, response.headers, await response.read())


def commit_body(shard: object = 0, checkpoint: object = CP) -> bytes:
    return json.dumps({"shard": shard, "checkpoint": checkpoint}).encode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def signed() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{P}/{L}:4"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
    ) as handle:
        yield handle


@pytest.fixture
async def open_emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(logstores=[f"{P}/{L}:4"], consumer_groups=[f"{P}/{L}/{G}"]) as h:
        yield h


# --- signatures --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v4"])
@pytest.mark.parametrize("force", ["true", "True", "TRUE"])
async def test_signed_commit_is_accepted_and_stored(
    session: aiohttp.ClientSession,
    signed: EmulatorHandle,
    version: SignatureVersion,
    force: str,
) -> None:
    params = {**CHECKPOINT_PARAMS, "forceSuccess": force}
    answer = await send(session, signed, "POST", GROUP_PATH, params, commit_body(), version=version)
    assert (answer.status, answer.body) == (200, b"")
    got = await send(session, signed, "GET", GROUP_PATH, {"shard": "0"}, version=version)
    assert got.json[0]["checkpoint"] == CP


@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_wrong_secret_is_signature_not_match(
    session: aiohttp.ClientSession, signed: EmulatorHandle, version: SignatureVersion
) -> None:
    wrong = Credentials(KEY_ID, "not-the-secret")
    answer = await send(
        session, signed, "POST", GROUP_PATH, CHECKPOINT_PARAMS, commit_body(),
        creds=wrong, version=version,
    )  # fmt: skip
    assert (answer.status, answer.code) == (401, "SignatureNotMatch")
    assert signed.state.snapshot()["history"] == {}


@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_unknown_key_is_unauthorized(
    session: aiohttp.ClientSession, signed: EmulatorHandle, version: SignatureVersion
) -> None:
    answer = await send(
        session, signed, "GET", GROUP_PATH, creds=Credentials("who", SECRET), version=version
    )
    assert (answer.status, answer.code) == (401, "Unauthorized")
    assert "who" in answer.json["errorMessage"]


async def test_missing_signature_is_unauthorized_when_keys_are_set(
    session: aiohttp.ClientSession, signed: EmulatorHandle
) -> None:
    answer = await send(session, signed, "GET", GROUP_PATH, creds=None)
    assert (answer.status, answer.code) == (401, "Unauthorized")


async def test_without_keys_any_signature_or_none_is_accepted(
    session: aiohttp.ClientSession, open_emulator: EmulatorHandle
) -> None:
    for creds in (None, Credentials("anyone", "anything")):
        answer = await send(session, open_emulator, "GET", GROUP_PATH, creds=creds)
        assert answer.status == 200


@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_body_altered_after_signing_is_refused(
    session: aiohttp.ClientSession, signed: EmulatorHandle, version: SignatureVersion
) -> None:
    headers = signed_headers(
        CREDS, "POST", GROUP_PATH, CHECKPOINT_PARAMS, host=HOST, body=commit_body(0),
        now=datetime.now(UTC), version=version, region="cn-hangzhou",
    )  # fmt: skip
    url = URL(signed.url + GROUP_PATH).with_query(CHECKPOINT_PARAMS)
    async with session.post(url, data=commit_body(1), headers=headers) as response:
        assert response.status == 401
        assert (await response.json())["errorCode"] == "SignatureNotMatch"
    assert signed.state.snapshot()["history"] == {}


@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_altered_query_is_refused(
    session: aiohttp.ClientSession, signed: EmulatorHandle, version: SignatureVersion
) -> None:
    headers = signed_headers(
        CREDS, "POST", GROUP_PATH, CHECKPOINT_PARAMS, host=HOST, body=commit_body(),
        now=datetime.now(UTC), version=version, region="cn-hangzhou",
    )  # fmt: skip
    url = URL(signed.url + GROUP_PATH).with_query({**CHECKPOINT_PARAMS, "consumer": "evil"})
    async with session.post(url, data=commit_body(), headers=headers) as response:
        assert (await response.json())["errorCode"] == "SignatureNotMatch"


async def test_v1_falls_back_to_x_log_date_when_date_is_stripped(
    session: aiohttp.ClientSession, signed: EmulatorHandle
) -> None:
    headers = signed_headers(
        CREDS, "GET", GROUP_PATH, {}, host=HOST, body=b"", now=datetime.now(UTC)
    )
    headers["x-log-date"] = headers.pop("Date")  # a proxy dropped Date; the SDK copy survives
    async with session.get(signed.url + GROUP_PATH, headers=headers) as response:
        assert response.status == 200


async def test_sts_token_header_is_signed_and_accepted(
    session: aiohttp.ClientSession, signed: EmulatorHandle
) -> None:
    with_token = Credentials(KEY_ID, SECRET, "sts-token")
    for version in ("v1", "v4"):
        answer = await send(session, signed, "GET", GROUP_PATH, creds=with_token, version=version)
        assert answer.status == 200


@pytest.mark.parametrize("version", ["v1", "v4"])
@pytest.mark.parametrize(("skew_minutes", "status"), [(-16, 400), (16, 400), (14, 200), (-14, 200)])
async def test_clock_skew_beyond_15_minutes_is_request_time_expired(
    session: aiohttp.ClientSession, version: SignatureVersion, skew_minutes: int, status: int
) -> None:
    server_now = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    async with running_emulator(
        logstores=[f"{P}/{L}:1"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
        wall_clock=server_now.timestamp,
    ) as handle:
        client_now = server_now + timedelta(minutes=skew_minutes)
        answer = await send(session, handle, "GET", GROUP_PATH, version=version, now=client_now)
    assert answer.status == status
    if status == 400:
        assert answer.code == "RequestTimeExpired"


async def test_official_sdk_vectors_verify_byte_for_byte(session: aiohttp.ClientSession) -> None:
    """Each recorded SDK request, replayed verbatim at its recorded time, is accepted."""
    data = json.loads(VECTORS.read_text())
    inputs = data["inputs"]
    recorded = datetime.fromisoformat(inputs["time_utc"].replace("Z", "+00:00"))
    async with running_emulator(
        logstores=[f"{inputs['project']}/test-logstore:4"],
        consumer_groups=[f"{inputs['project']}/test-logstore/test-cg"],
        access_key_id=inputs["access_key_id"],
        access_key_secret=inputs["access_key_secret"],
        wall_clock=recorded.timestamp,
    ) as handle:
        # consumer-1 holds every shard, so the strict (forceSuccess=False) vector succeeds
        handle.state.heartbeat(inputs["project"], "test-logstore", "test-cg", "consumer-1", [])
        for vector in data["vectors"]:
            path_and_query = "/" + vector["url"].split("://", 1)[1].split("/", 1)[1]
            url = URL(handle.url + path_and_query, encoded=True)
            headers = {k: v for k, v in vector["headers"].items() if k != "Content-Length"}
            body = vector["body"].encode() if vector["body"] else None
            async with session.request(
                vector["method"], url, data=body, headers=headers
            ) as response:
                assert response.status == 200, (vector["name"], await response.text())


# --- SLS-style answers to bad requests ---------------------------------------------------


def assert_sls_error(answer: Answer, status: int, code: str) -> None:
    assert (answer.status, answer.code) == (status, code), answer.body
    assert set(answer.json) == {"errorCode", "errorMessage"}
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in answer.json["errorMessage"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "PostBodyInvalid"),
        (b"\xff\xfe\x00garbage", 400, "PostBodyInvalid"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "PostBodyInvalid"),
        (b"", 400, "PostBodyInvalid"),
        (b"[0, 1]", 400, "PostBodyInvalid"),
        (commit_body(shard="x"), 400, "ParameterInvalid"),
        (commit_body(shard=True), 400, "ParameterInvalid"),
        (commit_body(shard=1.0), 400, "ParameterInvalid"),
        (commit_body(checkpoint=5), 400, "ParameterInvalid"),
        (b'{"checkpoint": "MTAw"}', 400, "ParameterInvalid"),
        (commit_body(checkpoint="MTAw="), 400, "InvalidShardCheckPoint"),
        (commit_body(shard=4), 404, "ShardNotExist"),
        (commit_body(shard=-1), 404, "ShardNotExist"),
        (commit_body(shard=10**30), 404, "ShardNotExist"),
    ],
)
async def test_bad_update_checkpoint_bodies_get_sls_errors(
    session: aiohttp.ClientSession,
    open_emulator: EmulatorHandle,
    body: bytes,
    status: int,
    code: str,
) -> None:
    answer = await send(session, open_emulator, "POST", GROUP_PATH, CHECKPOINT_PARAMS, body)
    assert_sls_error(answer, status, code)
    assert open_emulator.state.snapshot()["history"] == {}


@pytest.mark.parametrize(
    ("method", "path", "params", "body", "status", "code"),
    [
        ("GET", "/nowhere", {}, b"", 404, "InvalidMethod"),
        ("PATCH", GROUP_PATH, {}, b"", 405, "InvalidMethod"),
        ("POST", GROUP_PATH, {"type": "other"}, b"[]", 400, "ParameterInvalid"),
        ("POST", GROUP_PATH, {"type": "heartbeat"}, b"[]", 400, "ParameterInvalid"),
        ("POST", GROUP_PATH, {"type": "heartbeat", "consumer": "c"}, b'["0"]', 400,
         "ParameterInvalid"),
        ("POST", GROUP_PATH, {"type": "heartbeat", "consumer": "c"}, b"[true]", 400,
         "ParameterInvalid"),
        ("POST", GROUP_PATH, {**CHECKPOINT_PARAMS, "forceSuccess": "yes"}, commit_body(), 400,
         "ParameterInvalid"),
        ("POST", GROUP_PATH, {**CHECKPOINT_PARAMS, "forceSuccess": "false"}, commit_body(), 400,
         "ParameterInvalid"),
        ("GET", GROUP_PATH, {"shard": "abc"}, b"", 400, "ParameterInvalid"),
        ("GET", f"/logstores/{L}/consumergroups/unknown", {}, b"", 404, "ConsumerGroupNotExist"),
        ("GET", "/logstores/other/consumergroups", {}, b"", 404, "LogStoreNotExist"),
        ("POST", f"/logstores/{L}/consumergroups", {}, b'{"consumerGroup": "g2"}', 400,
         "ParameterInvalid"),
        ("POST", f"/logstores/{L}/consumergroups", {},
         b'{"consumerGroup": "g2", "timeout": "60"}', 400, "ParameterInvalid"),
        ("POST", f"/logstores/{L}/consumergroups", {},
         b'{"consumerGroup": "g2", "timeout": 60, "order": 1}', 400, "ParameterInvalid"),
        ("POST", f"/logstores/{L}/consumergroups", {},
         b'{"consumerGroup": "group-a", "timeout": 60}', 400, "ConsumerGroupAlreadyExist"),
        ("PUT", GROUP_PATH, {}, b"{}", 400, "ParameterInvalid"),
        ("GET", f"/logstores/{L}/shards/0", {"type": "cursor"}, b"", 400, "ParameterInvalid"),
        ("GET", f"/logstores/{L}/shards/0", {"type": "cursor", "from": "soon"}, b"", 400,
         "ParameterInvalid"),
        ("GET", f"/logstores/{L}/shards/0", {"type": "cursor", "from": "-5"}, b"", 400,
         "ParameterInvalid"),
        ("GET", f"/logstores/{L}/shards/0", {"type": "logs"}, b"", 400, "ParameterInvalid"),
        ("GET", f"/logstores/{L}/shards/x", {"type": "cursor", "from": "end"}, b"", 400,
         "ParameterInvalid"),
        ("GET", f"/logstores/{L}/shards/9", {"type": "cursor", "from": "end"}, b"", 400,
         "ShardNotExist"),
        ("GET", "/logstores/other/shards/0", {"type": "cursor", "from": "end"}, b"", 404,
         "LogStoreNotExist"),
        # POST on a shard is SplitShard or MergeShards, chosen by `action`.
        ("POST", f"/logstores/{L}/shards/0", {"type": "cursor"}, b"", 400, "ParameterInvalid"),
        ("POST", f"/logstores/{L}/shards/0", {"action": "grow"}, b"", 400, "ParameterInvalid"),
        ("PUT", f"/logstores/{L}/shards/0", {"action": "split"}, b"", 405, "InvalidMethod"),
        ("POST", f"/logstores/{L}/shards/x", {"action": "merge"}, b"", 400, "ParameterInvalid"),
    ],
)  # fmt: skip
async def test_malformed_requests_get_sls_errors(
    session: aiohttp.ClientSession,
    open_emulator: EmulatorHandle,
    method: str,
    path: str,
    params: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    answer = await send(session, open_emulator, method, path, params, body)
    assert_sls_error(answer, status, code)


async def test_oversized_body_is_post_body_too_large(
    session: aiohttp.ClientSession, open_emulator: EmulatorHandle
) -> None:
    body = b'{"shard": 0, "checkpoint": "' + b"A" * (1024 * 1024) + b'"}'
    answer = await send(session, open_emulator, "POST", GROUP_PATH, CHECKPOINT_PARAMS, body)
    assert_sls_error(answer, 413, "PostBodyTooLarge")
    answer = await send(
        session, open_emulator, "POST", GROUP_PATH, CHECKPOINT_PARAMS, commit_body()
    )
    assert answer.status == 200  # the server is still up and serving


async def test_unknown_project_in_host_is_project_not_exist(
    session: aiohttp.ClientSession, open_emulator: EmulatorHandle
) -> None:
    for host in ("other.cn-hangzhou.log.aliyuncs.com", "127.0.0.1", "localhost"):
        url = open_emulator.url + GROUP_PATH
        async with session.get(url, headers={"Host": host}) as response:
            assert response.status == 404
            assert (await response.json())["errorCode"] == "ProjectNotExist"


async def test_every_answer_has_a_request_id(
    session: aiohttp.ClientSession, open_emulator: EmulatorHandle
) -> None:
    answers = [
        await send(session, open_emulator, "GET", GROUP_PATH),
        await send(session, open_emulator, "POST", GROUP_PATH, CHECKPOINT_PARAMS, commit_body()),
        await send(session, open_emulator, "GET", "/nowhere"),
        await send(session, open_emulator, "GET", "/_emulator/state"),
    ]
    ids = [answer.headers["x-log-requestid"] for answer in answers]
    for request_id in ids:
        assert len(request_id) == 24
        assert request_id == request_id.upper()
        int(request_id, 16)
    assert len(set(ids)) == len(ids)


async def test_unexpected_error_is_a_generic_500_and_is_logged(
    session: aiohttp.ClientSession,
    open_emulator: EmulatorHandle,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(project: str, logstore: str) -> list[dict[str, object]]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(open_emulator.state, "list_shards", broken)
    with caplog.at_level(logging.ERROR, logger="cpmgr.emulator.app"):
        answer = await send(session, open_emulator, "GET", f"/logstores/{L}/shards")
    assert_sls_error(answer, 500, "InternalServerError")
    assert "secret internals" not in answer.body.decode()
    assert "secret internals" in caplog.text
    assert open_emulator.state.snapshot()["requests"]["ListShards"] == {"InternalServerError": 1}
    monkeypatch.undo()
    assert (await send(session, open_emulator, "GET", f"/logstores/{L}/shards")).status == 200


# --- API shapes ----------------------------------------------------------------------------


async def test_heartbeat_always_answers_a_json_array(
    session: aiohttp.ClientSession, open_emulator: EmulatorHandle
) -> None:
    params = {"type": "heartbeat", "consumer": "c1"}
    first = await send(session, open_emulator, "POST", GROUP_PATH, params, b"[]")
    assert (first.status, first.json) == (200, [0, 1, 2, 3])
    second = await send(
        session, open_emulator, "POST", GROUP_PATH, {**params, "consumer": "c2"}, b"[]"
    )
    assert (second.status, second.body) == (200, b"[]")


async def test_state_endpoint_reports_checkpoints_history_and_request_counts(
    session: aiohttp.ClientSession, open_emulator: EmulatorHandle
) -> None:
    for value in ("MTAw", "MjAw"):
        body = commit_body(1, value)
        await send(session, open_emulator, "POST", GROUP_PATH, CHECKPOINT_PARAMS, body)
    await send(session, open_emulator, "POST", GROUP_PATH, CHECKPOINT_PARAMS, commit_body(1, "!"))
    await send(session, open_emulator, "GET", GROUP_PATH)
    await send(session, open_emulator, "GET", "/nowhere")
    answer = await send(session, open_emulator, "GET", "/_emulator/state")
    key = f"{P}/{L}/{G}/1"
    assert answer.json["checkpoints"] == {key: "MjAw"}
    assert answer.json["history"] == {key: ["MTAw", "MjAw"]}
    assert answer.json["requests"] == {
        "UpdateCheckPoint": {"OK": 2, "InvalidShardCheckPoint": 1},
        "GetCheckPoint": {"OK": 1},
        "Unknown": {"InvalidMethod": 1},
    }


async def test_admin_can_declare_logstores(session: aiohttp.ClientSession) -> None:
    async with running_emulator() as handle:
        assert (await send(session, handle, "GET", f"/logstores/{L}/shards")).code == (
            "ProjectNotExist"
        )
        declare = json.dumps({"project": P, "logstore": L, "shards": 2}).encode()
        answer = await send(session, handle, "POST", "/_emulator/logstores", body=declare)
        assert answer.json == {"project": P, "logstore": L, "shards": 2}
        shards = await send(session, handle, "GET", f"/logstores/{L}/shards")
        assert [shard["shardID"] for shard in shards.json] == [0, 1]
        bad = json.dumps({"project": P, "logstore": L, "shards": "2"}).encode()
        answer = await send(session, handle, "POST", "/_emulator/logstores", body=bad)
        assert_sls_error(answer, 400, "ParameterInvalid")


async def test_a_body_over_many_reads_is_read_whole(session: aiohttp.ClientSession) -> None:
    async with running_emulator() as handle:
        declare = json.dumps({"project": P, "logstore": L, "shards": 3}).encode()
        padded = declare[:-1] + b" " * (300 * 1024) + b"}"  # several reads of the socket
        answer = await send(session, handle, "POST", "/_emulator/logstores", body=padded)
        assert answer.json == {"project": P, "logstore": L, "shards": 3}


# --- state file and TLS --------------------------------------------------------------------


async def test_state_file_survives_a_restart(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state_file = tmp_path / "emulator-state.json"
    options: dict[str, Any] = {"logstores": [f"{P}/{L}:2"], "state_file": state_file}
    async with running_emulator(**options) as handle:
        create = b'{"consumerGroup": "made-at-runtime", "timeout": 30, "order": true}'
        await send(session, handle, "POST", f"/logstores/{L}/consumergroups", body=create)
        path = f"/logstores/{L}/consumergroups/made-at-runtime"
        await send(session, handle, "POST", path, CHECKPOINT_PARAMS, commit_body(1, "MTAw"))
    assert state_file.exists()
    async with running_emulator(**options) as handle:
        groups = await send(session, handle, "GET", f"/logstores/{L}/consumergroups")
        assert groups.json == [{"name": "made-at-runtime", "timeout": 30, "order": True}]
        got = await send(session, handle, "GET", path, {"shard": "1"})
        assert got.json[0]["checkpoint"] == "MTAw"
        assert handle.state.snapshot()["history"] == {f"{P}/{L}/made-at-runtime/1": ["MTAw"]}


TLS_CERT = """-----BEGIN CERTIFICATE-----
MIIBjzCCATagAwIBAgIUFrfNubnvj+5tNi7agFfGKWWTeWwwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyNjA2MTgwNloYDzIxMjYxMTAy
MDYxODA2WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQFNpRe8JmvrfMuOkZTCK1910tc5FAquCLXEbpQrvymQMiQuu9tQpRe
ZF6f0o7AKa3oGFPKGq5ShxWmClfe57c8o2QwYjAdBgNVHQ4EFgQUx2v/8xIQNCFb
64OQOZ1JOBLO1t0wHwYDVR0jBBgwFoAUx2v/8xIQNCFb64OQOZ1JOBLO1t0wDwYD
VR0TAQH/BAUwAwEB/zAPBgNVHREECDAGhwR/AAABMAoGCCqGSM49BAMCA0cAMEQC
IBxcE21GXsYywGg5twXIkPt/pKi5/z6x2I6Ai8gTClhBAiAqZ+QbYrbe+Af9ES5y
heR64ggpgoaGHyhRZCuBd8GabA==
-----END CERTIFICATE-----
"""
TLS_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg9fmyVSErRqJVYujy
HtqEevmsMuaLkMbwtJaCTldHfWGhRANCAAQFNpRe8JmvrfMuOkZTCK1910tc5FAq
uCLXEbpQrvymQMiQuu9tQpReZF6f0o7AKa3oGFPKGq5ShxWmClfe57c8
-----END PRIVATE KEY-----
"""


async def test_tls_serves_https_with_the_given_certificate(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(TLS_CERT)
    key.write_text(TLS_KEY)
    async with running_emulator(
        logstores=[f"{P}/{L}:1"], consumer_groups=[f"{P}/{L}/{G}"], tls_cert=cert, tls_key=key
    ) as handle:
        assert handle.url.startswith("https://")
        # Validity dates are not checked (the test must not depend on the calendar); the
        # served certificate is compared with the configured one instead.
        client_context = ssl.create_default_context()
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
        _, writer = await asyncio.open_connection(handle.host, handle.port, ssl=client_context)
        served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        assert served == ssl.PEM_cert_to_DER_cert(TLS_CERT)
        async with session.get(
            handle.url + GROUP_PATH, headers={"Host": HOST}, ssl=client_context
        ) as response:
            assert response.status == 200


# --- the command line ----------------------------------------------------------------------


async def test_module_entry_point_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cpmgr.emulator", "--listen", "127.0.0.1:0",
        "--logstore", f"{P}/{L}:2", "--consumer-group", f"{P}/{L}/{G}", "--seed", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line.startswith("cpmgr emulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with session.get(url + GROUP_PATH, headers={"Host": HOST}) as response:
            assert response.status == 200
            assert len(await response.json()) == 2
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cpmgr emulator")
    add_emulator_arguments(parser)
    return run_emulator_from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--consumer-group", "p/undeclared/g"], "--consumer-group p/undeclared/g"),
        (["--access-key-id", "only-id"], "--access-key-secret"),
        (["--error-rate", "1.5"], "error_rate"),
        (["--latency-ms", "nan:5"], "latency_ms"),
        (["--late-rate", "0.2"], "late_ms"),
        (["--error-rate", "0.6", "--reset-rate", "0.6"], "must not exceed 1"),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "tls"),
        (["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
    ],
)
def test_cli_problems_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["--listen", "127.0.0.1:0", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "nope"],
        ["--listen", "127.0.0.1:0", "--logstore", "p/l"],
        ["--listen", "127.0.0.1:0", "--logstore", "p/l:0"],
        ["--listen", "127.0.0.1:0", "--consumer-group", "p/l"],
        ["--listen", "127.0.0.1:0", "--latency-ms", "a:b"],
        [],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(argv)
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_port_in_use_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli(["--listen", f"127.0.0.1:{port}"]) == 1
    assert "cannot serve" in capsys.readouterr().err


# --- the HTTP/1.1 layer: framing, pipelining, bad requests --------------------------------


def raw_commit(shard: int, *, extra: str = "", body: bytes | None = None) -> bytes:
    payload = commit_body(shard) if body is None else body
    head = (
        f"POST {GROUP_PATH}?type=checkpoint&consumer=&forceSuccess=true HTTP/1.1\r\n"
        f"Host: {HOST}\r\nContent-Length: {len(payload)}\r\n{extra}\r\n"
    )
    return head.encode() + payload


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    """`count` answers off a raw connection: (status, body) each."""
    answers = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        answers.append((int(lines[0].split()[1]), await reader.readexactly(length)))
    return answers


async def test_pipelined_requests_are_answered_in_order(open_emulator: EmulatorHandle) -> None:
    open_emulator.faults.update({"latency_ms": [30, 30]})  # the first waits: order must hold
    reader, writer = await asyncio.open_connection(open_emulator.host, open_emulator.port)
    writer.write(raw_commit(0) + raw_commit(1) + raw_commit(7))
    answers = await read_answers(reader, 3)
    writer.close()
    assert [status for status, _ in answers] == [200, 200, 404]
    assert json.loads(answers[2][1])["errorCode"] == "ShardNotExist"
    assert list(open_emulator.state.snapshot()["history"]) == [f"{P}/{L}/{G}/0", f"{P}/{L}/{G}/1"]


async def test_chunked_body_and_expect_continue_are_understood(
    open_emulator: EmulatorHandle,
) -> None:
    body = commit_body(2)
    chunked = (
        f"POST {GROUP_PATH}?type=checkpoint&consumer=&forceSuccess=true HTTP/1.1\r\n"
        f"Host: {HOST}\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(open_emulator.host, open_emulator.port)
    writer.write(chunked)
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:]))
    assert await read_answers(reader, 1) == [(200, b"")]
    writer.close()
    assert open_emulator.state.snapshot()["checkpoints"] == {f"{P}/{L}/{G}/2": CP}


async def test_answers_are_written_byte_for_byte(open_emulator: EmulatorHandle) -> None:
    """The exact bytes of a success, an error and a last answer (the same before and after the
    server's answer writing was made cheaper)."""
    reader, writer = await asyncio.open_connection(open_emulator.host, open_emulator.port)
    writer.write(raw_commit(0) + raw_commit(7) + raw_commit(1, extra="Connection: close\r\n"))
    received = await asyncio.wait_for(reader.read(), 10)  # up to the close after the third
    writer.close()
    error = b'{"errorCode": "ShardNotExist", "errorMessage": "shard 7 not exist"}'
    request_id = rb"x-log-requestid: [0-9A-F]{24}\r\n"
    expected = b"".join(
        [
            rb"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + request_id + rb"\r\n",
            rb"HTTP/1.1 404 Not Found\r\nContent-Length: " + str(len(error)).encode() + rb"\r\n",
            rb"Content-Type: application/json; charset=utf-8\r\n" + request_id + rb"\r\n",
            re.escape(error),
            rb"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + request_id,
            rb"Connection: close\r\n\r\n",
        ]
    )
    assert re.fullmatch(expected, received), received


async def test_a_known_header_name_without_its_colon_is_still_unreadable(
    open_emulator: EmulatorHandle,
) -> None:
    """Header names are remembered once seen valid; a line with that name and no colon, or
    with space around the name, is still refused."""
    for request_bytes in (
        b"GET / HTTP/1.1\r\nHost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(open_emulator.host, open_emulator.port)
        writer.write(raw_commit(0) + request_bytes)
        [(first, _), (status, body)] = await read_answers(reader, 2)
        writer.close()
        assert (first, status, json.loads(body)["errorCode"]) == (200, 400, "ParameterInvalid")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP\r\n\r\n",
        b"GET nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: many\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024),
    ],
    ids=["not-http", "bad-target", "bad-header", "bad-length", "bad-chunk", "head-too-large"],
)
async def test_unreadable_requests_get_400_and_the_connection_closes(
    open_emulator: EmulatorHandle, request_bytes: bytes
) -> None:
    reader, writer = await asyncio.open_connection(open_emulator.host, open_emulator.port)
    writer.write(request_bytes)
    [(status, body)] = await read_answers(reader, 1)
    assert (status, json.loads(body)["errorCode"]) == (400, "ParameterInvalid")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the emulator
    writer.close()
    async with aiohttp.ClientSession() as session:  # and it still serves everyone else
        answer = await send(session, open_emulator, "GET", GROUP_PATH, creds=None)
    assert answer.status == 200


async def test_http_1_0_and_connection_close_end_the_connection(
    open_emulator: EmulatorHandle,
) -> None:
    for request_bytes in (
        raw_commit(0).replace(b"HTTP/1.1", b"HTTP/1.0"),
        raw_commit(1, extra="Connection: close\r\n"),
    ):
        reader, writer = await asyncio.open_connection(open_emulator.host, open_emulator.port)
        writer.write(request_bytes)
        assert await read_answers(reader, 1) == [(200, b"")]
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
