"""The emulator's HTTP side: SLS consumer-group API routes, signatures, faults, admin endpoints.

`running_emulator(...)` runs it in-process on 127.0.0.1 port 0 for tests; `cpmgr emulator`
(see `add_emulator_arguments` / `run_emulator_from_args`) runs it in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Final, NamedTuple

from cpmgr.emulator.credentials import (
    DEFAULT_LIFETIME,
    DEFAULT_ROLE_NAME,
    SECURITY_TOKEN_HEADER,
    CredentialsService,
)
from cpmgr.emulator.faults import Decision, FaultInjector, FaultSettings, LateLanding
from cpmgr.emulator.http import ABORT, HttpAnswer, HttpRequest, HttpServer, Reply
from cpmgr.emulator.state import (
    DEFAULT_GROUP_TIMEOUT,
    ApiError,
    Clock,
    EmulatorState,
    OwnershipErrors,
    parameter_invalid,
)
from cpmgr.emulator.writer import SteadyWriter
from cpmgr.errors import ConfigError
from cpmgr.sls.signer import (
    EMPTY_SHA256,
    V4_ALGORITHM,
    Credentials,
    sign_v4,
    v1_signature,
    v1_string_to_sign,
)

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

MAX_BODY_BYTES = 1024 * 1024
REQUEST_TIME_WINDOW_SECONDS = 15 * 60
SHUTDOWN_TIMEOUT_SECONDS = 5.0
_V4_AUTHORIZATION = re.compile(
    V4_ALGORITHM + r" Credential=(?P<key_id>[^/,]+)/(?P<day>\d{8})/(?P<region>[^/,]+)"
    r"/sls/aliyun_v4_request,\s*Signature=(?P<signature>[0-9a-fA-F]+)"
)
_INTEGER = re.compile(r"-?\d{1,18}")
_ADMIN_PREFIX = "/_emulator/"


# --- signature verification ----------------------------------------------------------------------


def _header(headers: Mapping[str, str], wanted: str) -> str:
    """Header `wanted` (a lower-case name) under any case of its name, "" if absent."""
    # The server's headers are keyed lower-case: one lookup; other mappings are scanned.
    found = headers.get(wanted)
    if found is not None:
        return found
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return ""


def _secret(keys: Mapping[str, str], key_id: str) -> str:
    secret = keys.get(key_id)
    if secret is None:
        raise ApiError(401, "Unauthorized", f"AccessKeyId not found: {key_id}")
    return secret


@functools.lru_cache(maxsize=64)
def _http_date_seconds(text: str) -> float:
    """Parsed once per distinct Date: clients send the same one for a whole second."""
    moment = parsedate_to_datetime(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _check_request_time(seconds: float, now: float, shown: str) -> None:
    if abs(seconds - now) > REQUEST_TIME_WINDOW_SECONDS:
        server_time = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise ApiError(
            400,
            "RequestTimeExpired",
            f"Request time {shown} has been expired while server time is {server_time}",
        )


def _signature_mismatch(detail: str) -> ApiError:
    return ApiError(401, "SignatureNotMatch", detail)


class SignedRequest(NamedTuple):
    """What a signature covers: method, decoded path and query, headers as received, body."""

    method: str
    path: str
    params: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str:
        return _header(self.headers, name.lower())


def _verify_v1(
    keys: Mapping[str, str], request: SignedRequest, authorization: str, now: float
) -> None:
    headers = request.headers
    key_id, _, signature = authorization[len("LOG ") :].partition(":")
    secret = keys.get(key_id) or _secret(keys, key_id)
    # Some proxies strip Date, which is why the SDKs also send x-log-date.
    date = headers.get("date") or _header(headers, "date")
    signing_headers = headers
    if not date:
        date = _header(headers, "x-log-date")
        if not date:
            raise ApiError(400, "MissingDate", "the Date header is missing")
        signing_headers = {**headers, "Date": date}  # signed with the date it carries
    try:
        seconds = _http_date_seconds(date)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "InvalidDateFormat", f"invalid Date header: {date}") from exc
    if abs(seconds - now) > REQUEST_TIME_WINDOW_SECONDS:
        _check_request_time(seconds, now, date)
    content_md5 = headers.get("content-md5") or _header(headers, "content-md5")
    if content_md5 and content_md5.upper() != hashlib.md5(request.body).hexdigest().upper():
        raise _signature_mismatch("Content-MD5 does not match the body")
    string_to_sign = v1_string_to_sign(
        request.method, request.path, request.params, signing_headers
    )
    expected = v1_signature(secret, string_to_sign)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise _signature_mismatch(f"signature {signature} not match")


def _verify_v4(
    keys: Mapping[str, str], request: SignedRequest, authorization: str, now: float
) -> None:
    match = _V4_AUTHORIZATION.fullmatch(authorization)
    if match is None:
        raise _signature_mismatch("malformed SLS4-HMAC-SHA256 Authorization header")
    secret = _secret(keys, match["key_id"])
    log_date = request.header("x-log-date")
    if not log_date:
        raise ApiError(400, "MissingDate", "the x-log-date header is missing")
    try:
        moment = datetime.strptime(log_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise ApiError(400, "InvalidDateFormat", f"invalid x-log-date: {log_date}") from exc
    _check_request_time(moment.timestamp(), now, log_date)
    content_sha256 = request.header("x-log-content-sha256") or EMPTY_SHA256
    if content_sha256.lower() != hashlib.sha256(request.body).hexdigest():
        raise _signature_mismatch("x-log-content-sha256 does not match the body")
    expected = sign_v4(
        Credentials(match["key_id"], secret),
        request.method,
        request.path,
        request.params,
        request.headers,
        region=match["region"],
    )
    expected_signature = expected.rpartition("Signature=")[2]
    if not hmac.compare_digest(expected_signature.encode(), match["signature"].lower().encode()):
        raise _signature_mismatch(f"signature {match['signature']} not match")


def signing_key_id(authorization: str) -> str:
    """The AccessKeyId a v1 or v4 Authorization header names ("" if none)."""
    if authorization.startswith("LOG "):
        return authorization[len("LOG ") :].partition(":")[0]
    match = _V4_AUTHORIZATION.fullmatch(authorization)
    return match["key_id"] if match else ""


def verify_signature(keys: Mapping[str, str], request: SignedRequest, *, now: float) -> None:
    """Check a request's v1 or v4 signature and its clock skew; raise the SLS ApiError if bad.

    `keys` maps AccessKeyId to secret; `now` is the server's wall-clock time.
    """
    _verify(keys, request, request.header("Authorization"), now)


def _verify(
    keys: Mapping[str, str], request: SignedRequest, authorization: str, now: float
) -> None:
    if authorization.startswith("LOG "):
        _verify_v1(keys, request, authorization, now)
    elif authorization.startswith(V4_ALGORITHM + " "):
        _verify_v4(keys, request, authorization, now)
    else:
        raise ApiError(401, "Unauthorized", "missing or unsupported Authorization header")


# --- request parsing ----------------------------------------------------------------------


class SlsCall(NamedTuple):
    """One SLS API request, addressed and read, ready for its handler."""

    project: str
    logstore: str
    group: str
    params: Mapping[str, str]
    body: bytes
    shard: str = ""  # the shard id segment of `/logstores/{ls}/shards/{id}`

    @property
    def group_key(self) -> str | None:
        return f"{self.project}/{self.logstore}/{self.group}" if self.group else None


@functools.lru_cache(maxsize=256)
def project_from_host(host: str | None) -> str:
    """The project is the first label of the Host header (cached: clients repeat it)."""
    # An IP literal such as 127.0.0.1 yields "127", which no logstore is declared under.
    hostname = (host or "").rsplit(":", 1)[0]
    project, dot, _ = hostname.partition(".")
    if not dot or not project:
        raise ApiError(404, "ProjectNotExist", f"no project in the Host header {host!r}")
    return project


_JSON_DECODER: Final = json.JSONDecoder()


def _json_body(body: bytes) -> object:
    try:
        # What json.loads(body) does, without its per-call checks of keyword arguments; a body
        # opening with `{"` is UTF-8 to json.detect_encoding, which is not asked then.
        encoding = "utf-8" if body.startswith(b'{"') else json.detect_encoding(body)
        return _JSON_DECODER.decode(body.decode(encoding, "surrogatepass"))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "PostBodyInvalid", "the request body is not valid JSON") from exc


def _json_object(body: bytes) -> dict[str, object]:
    data = _json_body(body)
    if not isinstance(data, dict):
        raise ApiError(400, "PostBodyInvalid", "the request body must be a JSON object")
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(data: Mapping[str, object], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise parameter_invalid(f"{name} must be an integer")
    return value


def _optional_int_field(data: Mapping[str, object], name: str) -> int | None:
    return None if data.get(name) is None else _int_field(data, name)


def _bool_field(data: Mapping[str, object], name: str) -> bool | None:
    value = data.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise parameter_invalid(f"{name} must be a boolean")


def _str_field(data: Mapping[str, object], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise parameter_invalid(f"{name} must be a string")
    return value


def _force_success(params: Mapping[str, str]) -> bool:
    """`forceSuccess`, case-insensitive: PY sends `True`/`False`, the others lowercase."""
    value = params.get("forceSuccess", "false").lower()
    if value not in ("true", "false"):
        raise parameter_invalid(f"forceSuccess must be true or false, not {value!r}")
    return value == "true"


# --- SLS API handlers -----------------------------------------------------------------------

Handler = Callable[[EmulatorState, SlsCall], HttpAnswer]

_EMPTY_OK = HttpAnswer(200)


def _ok(payload: object = None) -> HttpAnswer:
    # Exactly 200 with an empty body: the SDKs accept no other success status.
    if payload is None:
        return _EMPTY_OK
    return HttpAnswer.json(payload)


def _list_groups(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    return _ok(state.list_groups(call.project, call.logstore))


def _create_group(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    data = _json_object(call.body)
    state.create_group(
        call.project,
        call.logstore,
        _str_field(data, "consumerGroup"),
        timeout=_int_field(data, "timeout"),
        order=bool(_bool_field(data, "order")),
    )
    return _ok()


def _update_group(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    data = _json_object(call.body)
    timeout = _optional_int_field(data, "timeout")
    order = _bool_field(data, "order")
    if timeout is None and order is None:
        raise parameter_invalid("give timeout, order or both")
    state.update_group(call.project, call.logstore, call.group, timeout=timeout, order=order)
    return _ok()


def _delete_group(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    state.delete_group(call.project, call.logstore, call.group)
    return _ok()


def _heartbeat(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    consumer = call.params.get("consumer", "")
    if not consumer:
        raise parameter_invalid("consumer is required")
    data = _json_body(call.body)
    shards = [] if data is None else data
    if not isinstance(shards, list) or not all(_is_int(shard) for shard in shards):
        raise parameter_invalid("the heartbeat body must be a JSON array of shard ids")
    return _ok(state.heartbeat(call.project, call.logstore, call.group, consumer, shards))


def _update_checkpoint(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    force_success = _force_success(call.params)
    data = _json_object(call.body)
    state.update_checkpoint(
        call.project,
        call.logstore,
        call.group,
        shard=_int_field(data, "shard"),
        checkpoint=_str_field(data, "checkpoint"),
        consumer=call.params.get("consumer", ""),
        force_success=force_success,
    )
    return _ok()


def _get_checkpoint(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    raw = call.params.get("shard")
    if raw is not None and not _INTEGER.fullmatch(raw):
        raise parameter_invalid(f"shard must be an integer, not {raw!r}")
    shard = None if raw is None else int(raw)
    return _ok(state.get_checkpoints(call.project, call.logstore, call.group, shard))


def _list_shards(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    return _ok(state.list_shards(call.project, call.logstore))


def _get_cursor(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    if not _INTEGER.fullmatch(call.shard):
        raise parameter_invalid(f"shard must be an integer, not {call.shard!r}")
    start = call.params.get("from", "")
    cursor = state.get_cursor(call.project, call.logstore, int(call.shard), start)
    return _ok({"cursor": cursor})


def _get_cursor_time(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    if not _INTEGER.fullmatch(call.shard):
        raise parameter_invalid(f"shard must be an integer, not {call.shard!r}")
    cursor = call.params.get("cursor", "")
    seconds = state.get_cursor_time(call.project, call.logstore, int(call.shard), cursor)
    return _ok({"cursor_time": seconds})


def _shard_id(call: SlsCall) -> int:
    if not _INTEGER.fullmatch(call.shard):
        raise parameter_invalid(f"invalid shard id {call.shard!r}")
    return int(call.shard)


def _split_shard(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    # PY always sends `key`; GO sends it only when set, and `shardCount` only when > 0.
    raw_count = call.params.get("shardCount")
    if raw_count is not None and not _INTEGER.fullmatch(raw_count):
        raise parameter_invalid(f"invalid shardCount {raw_count!r}")
    key = call.params.get("key") or None
    count = None if raw_count is None else int(raw_count)
    shard = _shard_id(call)
    return _ok(state.split_shard(call.project, call.logstore, shard, key=key, count=count))


def _merge_shards(state: EmulatorState, call: SlsCall) -> HttpAnswer:
    return _ok(state.merge_shards(call.project, call.logstore, _shard_id(call)))


# (resource, method, type query parameter) -> (API name, handler)
_API_TABLE: dict[tuple[str, str, str], tuple[str, Handler]] = {
    ("groups", "GET", ""): ("ListConsumerGroup", _list_groups),
    ("groups", "POST", ""): ("CreateConsumerGroup", _create_group),
    ("group", "PUT", ""): ("UpdateConsumerGroup", _update_group),
    ("group", "DELETE", ""): ("DeleteConsumerGroup", _delete_group),
    ("group", "GET", ""): ("GetCheckPoint", _get_checkpoint),
    ("group", "POST", "heartbeat"): ("ConsumerGroupHeartBeat", _heartbeat),
    ("group", "POST", "checkpoint"): ("UpdateCheckPoint", _update_checkpoint),
    ("shards", "GET", ""): ("ListShards", _list_shards),
    ("shard", "GET", "cursor"): ("GetCursor", _get_cursor),
    ("shard", "GET", "cursor_time"): ("GetCursorTime", _get_cursor_time),
    ("shard", "POST", "split"): ("SplitShard", _split_shard),
    ("shard", "POST", "merge"): ("MergeShards", _merge_shards),
}
# The resources whose API is chosen by the `type` query parameter.
_TYPED = {
    ("group", "POST"): "heartbeat or checkpoint",
    ("shard", "GET"): "cursor or cursor_time",
}
# ... and those chosen by `action` (SplitShard, MergeShards).
_ACTIONS = {("shard", "POST"): "split or merge"}


def _resolve(resource: str, method: str, params: Mapping[str, str]) -> tuple[str, Handler]:
    action = _ACTIONS.get((resource, method))
    if action:
        found = _API_TABLE.get((resource, method, params.get("action", "")))
        if found is None:
            raise parameter_invalid(f"action must be {action}, not {params.get('action', '')!r}")
        return found
    typed = _TYPED.get((resource, method))
    kind = params.get("type", "") if typed else ""
    found = _API_TABLE.get((resource, method, kind))
    if found is not None:
        return found
    if typed:
        raise parameter_invalid(f"type must be {typed}, not {kind!r}")
    raise ApiError(405, "InvalidMethod", f"method {method} is not supported on this resource")


# --- the application -------------------------------------------------------------------------


# Request ids: 24 hex digits as SLS's, unique within this process without a syscall per id.
_REQUEST_ID_PREFIX: Final = os.urandom(6).hex().upper()
_request_ids: Final = map(f"{_REQUEST_ID_PREFIX}%012X".__mod__, itertools.count())


def _error_answer(error: ApiError) -> HttpAnswer:
    return HttpAnswer.json({"errorCode": error.code, "errorMessage": error.message}, error.status)


def _with_request_id(answer: HttpAnswer) -> HttpAnswer:
    if answer.abort:
        return answer
    request_id = {"x-log-requestid": next(_request_ids)}
    return HttpAnswer(answer.status, answer.body, answer.content_type, request_id)


def _abort_connection(request: HttpRequest) -> None:
    """Drop the connection without an answer, with a TCP reset where the platform allows."""
    sock = request.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


# "/logstores/{logstore}/consumergroups[/{group}]" and "/logstores/{logstore}/shards[/{shard}]"
_SLS_PATH = re.compile(r"/logstores/([^/]+)/(?:consumergroups(?:/([^/]+))?|(shards)(?:/([^/]+))?)")
AdminHandler = Callable[[HttpRequest], HttpAnswer]


@functools.lru_cache(maxsize=1024)
def _sls_route(path: str) -> tuple[str, str, str, str] | None:
    """(resource, logstore, group, shard) of an SLS API path, None for any other path.

    Cached: a client sends the same few paths over and over (one per consumer group).
    """
    match = _SLS_PATH.fullmatch(path)
    if match is None:
        return None
    logstore, group, shards, shard = match.groups()
    if shards:
        return ("shard" if shard else "shards", logstore, "", shard or "")
    return ("group" if group else "groups", logstore, group or "", "")


class EmulatorApp:
    """Routes and handlers over one state, one fault injector and the keys."""

    def __init__(
        self,
        state: EmulatorState,
        faults: FaultInjector,
        *,
        keys: Mapping[str, str],
        sleep: Sleep = asyncio.sleep,
        sts_lifetime: float = DEFAULT_LIFETIME,
        oidc_token_file: Path | None = None,
        ecs_role_name: str = DEFAULT_ROLE_NAME,
    ) -> None:
        self.state = state
        self.faults = faults
        self.keys = dict(keys)
        self._sleep = sleep
        self.credentials = CredentialsService(
            wall_clock=state.wall_clock,
            count=state.count_request,
            lifetime=sts_lifetime,
            oidc_token_file=oidc_token_file,
            role_name=ecs_role_name,
            on_issue=self.keys.__setitem__,
        )
        self._late_tasks: set[asyncio.Task[HttpAnswer]] = set()
        self._admin: dict[str, dict[str, AdminHandler]] = {
            "/_emulator/state": {"GET": self._get_state},
            "/_emulator/faults": {"GET": self._get_faults, "POST": self._post_faults},
            "/_emulator/logstores": {"POST": self._post_logstore},
            "/_emulator/credentials": {
                "GET": self._get_credentials,
                "POST": self._post_credentials,
            },
            "/_emulator/write": {"POST": self._post_write},
        }

    def respond(self, request: HttpRequest) -> Reply:
        """One request's answer, or a coroutine giving it when the request must wait.

        Every failure is an SLS-style error answer; every answer carries a request id.
        """
        try:
            reply = self._route(request)
        except ApiError as exc:
            return _with_request_id(_error_answer(exc))
        except Exception:
            return _with_request_id(_unexpected(request))
        if isinstance(reply, HttpAnswer):
            return _with_request_id(reply)
        return self._finish(request, reply)

    async def _finish(self, request: HttpRequest, reply: Awaitable[HttpAnswer]) -> HttpAnswer:
        try:
            return _with_request_id(await reply)
        except ApiError as exc:
            return _with_request_id(_error_answer(exc))
        except Exception:
            return _with_request_id(_unexpected(request))

    def _route(self, request: HttpRequest) -> Reply:
        sls_route = _sls_route(request.path)
        if sls_route is not None:
            return self._serve(request, *sls_route)
        issued = self.credentials.respond(request)
        if issued is not None:
            return issued
        methods = self._admin.get(request.path)
        if methods is None:
            if not request.path.startswith(_ADMIN_PREFIX):
                self.state.count_request("Unknown", "InvalidMethod")
            raise ApiError(404, "InvalidMethod", f"unknown API: {request.method} {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            raise ApiError(405, "InvalidMethod", f"unknown API: {request.method} {request.path}")
        return handler(request)

    def _serve(
        self, request: HttpRequest, resource: str, logstore: str, group: str, shard: str = ""
    ) -> Reply:
        """Resolve, read, draw the faults; then answer at once or after the drawn wait."""
        api, code = "Unknown", "InternalServerError"
        try:
            params = request.query
            api, handler = _resolve(resource, request.method, params)
            project = project_from_host(request.headers.get("host", ""))
            call = SlsCall(project, logstore, group, params, _read_body(request), shard)
            decision = self.faults.decide(
                call.group_key, api=api, can_land_late=api == "UpdateCheckPoint"
            )
            if decision.late_seconds is not None:
                self._authenticate(request, call)  # on arrival, as SLS would
            code = ""  # counted where the request is answered
            if decision.late_seconds is not None:
                return self._land_late(api, handler, call, decision.late_seconds)
            if decision.delay_seconds > 0:
                return self._after_delay(request, api, handler, call, decision)
            return self._apply(request, api, handler, call, decision)
        except ApiError as exc:
            code = code and exc.code
            raise
        finally:
            if code:
                self.state.count_request(api, code)

    async def _after_delay(
        self, request: HttpRequest, api: str, handler: Handler, call: SlsCall, decision: Decision
    ) -> HttpAnswer:
        await self._sleep(decision.delay_seconds)
        return self._apply(request, api, handler, call, decision)

    def _apply(
        self, request: HttpRequest, api: str, handler: Handler, call: SlsCall, decision: Decision
    ) -> HttpAnswer:
        """The drawn fault, else authenticate and run the handler; counts the outcome.

        A faulted request never changes the state.
        """
        code = "InternalServerError"
        try:
            fault = decision.fault
            if fault is not None and fault.kind == "reset":
                code = "Reset"
                _abort_connection(request)
                return ABORT
            if fault is not None:
                raise ApiError(fault.status, fault.code, fault.message)
            self._authenticate(request, call)
            answer = handler(self.state, call)
            code = "OK"
            return answer
        except ApiError as exc:
            code = exc.code
            raise
        finally:
            self.state.count_request(api, code)

    def _land_late(self, api: str, handler: Handler, call: SlsCall, seconds: float) -> Reply:
        """Apply `call` after `seconds` in a task of its own; answer its outcome if still asked.

        The task is not the one answering the request, so a client that disconnects (or the
        answering task being cancelled) cannot stop the request from landing.
        """
        self.state.late_pending += 1
        task = asyncio.get_running_loop().create_task(self._apply_late(api, handler, call, seconds))
        self._late_tasks.add(task)
        task.add_done_callback(self._late_tasks.discard)
        return _shielded(task)

    async def _apply_late(
        self, api: str, handler: Handler, call: SlsCall, seconds: float
    ) -> HttpAnswer:
        try:
            await self._sleep(seconds)
        finally:
            self.state.late_pending -= 1  # applied now, or dropped by close()
        try:
            answer = handler(self.state, call)
        except ApiError as exc:
            self.state.count_request(api, exc.code)
            return _error_answer(exc)
        self.state.count_request(api, "OK")
        return answer

    async def settle_late(self) -> None:
        """Return once every request held by the late-landing fault has been applied."""
        while self._late_tasks:
            await asyncio.wait(set(self._late_tasks))

    async def close(self) -> None:
        """Drop the held requests that have not landed yet (the emulator is stopping)."""
        tasks = set(self._late_tasks)
        if tasks:
            log.info("stopping with %d late request(s) not applied", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _authenticate(self, request: HttpRequest, call: SlsCall) -> None:
        if not self.keys:
            return  # no keys configured: any signature, or none, is accepted
        headers = request.headers  # lower-case names
        authorization = headers.get("authorization", "")
        token = headers.get(SECURITY_TOKEN_HEADER, "")
        self.credentials.check(signing_key_id(authorization), token)
        signed = SignedRequest(request.method, request.path, call.params, headers, call.body)
        _verify(self.keys, signed, authorization, self.state.wall_clock())

    # --- admin endpoints (unsigned, never faulted, not counted) ---------------------------

    def _get_state(self, request: HttpRequest) -> HttpAnswer:
        return HttpAnswer.json(self.state.snapshot())

    def _get_faults(self, request: HttpRequest) -> HttpAnswer:
        return HttpAnswer.json(self.faults.settings.as_json())

    def _post_faults(self, request: HttpRequest) -> HttpAnswer:
        try:
            settings = self.faults.update(_json_object(_read_body(request)))
        except ApiError as exc:
            raise parameter_invalid(exc.message) from exc
        except ConfigError as exc:
            raise parameter_invalid("; ".join(exc.problems)) from exc
        log.info("fault settings now %s", settings.as_json())
        return HttpAnswer.json(settings.as_json())

    def _get_credentials(self, request: HttpRequest) -> HttpAnswer:
        return HttpAnswer.json(self.credentials.settings())

    def _post_credentials(self, request: HttpRequest) -> HttpAnswer:
        try:
            self.credentials.update(_json_object(_read_body(request)))
        except ValueError as exc:
            raise parameter_invalid(str(exc)) from exc
        log.info(
            "credentials services: down=%s lifetime=%gs",
            self.credentials.down,
            self.credentials.lifetime,
        )
        return HttpAnswer.json(self.credentials.settings())

    def _post_logstore(self, request: HttpRequest) -> HttpAnswer:
        data = _json_object(_read_body(request))
        store = self.state.add_logstore(
            _str_field(data, "project"), _str_field(data, "logstore"), _int_field(data, "shards")
        )
        return HttpAnswer.json(
            {"project": store.project, "logstore": store.name, "shards": store.shard_count}
        )

    def _post_write(self, request: HttpRequest) -> HttpAnswer:
        """Append log groups: `{"project","logstore","count","shard"?,"receive_time"?}`."""
        data = _json_object(_read_body(request))
        written = self.state.write(
            _str_field(data, "project"),
            _str_field(data, "logstore"),
            count=_int_field(data, "count"),
            shard=_optional_int_field(data, "shard"),
            receive_time=_optional_int_field(data, "receive_time"),
        )
        shards = [
            {"shard": shard.shard_id, "begin": shard.begin_cursor, "end": shard.end_cursor}
            for shard in written
        ]
        return HttpAnswer.json({"shards": shards})


async def _shielded(task: asyncio.Task[HttpAnswer]) -> HttpAnswer:
    return await asyncio.shield(task)


def _read_body(request: HttpRequest) -> bytes:
    if request.body_too_large:
        raise ApiError(413, "PostBodyTooLarge", f"the body exceeds {MAX_BODY_BYTES} bytes")
    return request.body


def _unexpected(request: HttpRequest) -> HttpAnswer:
    log.exception("unexpected error serving %s %s", request.method, request.path)
    return _error_answer(ApiError(500, "InternalServerError", "internal error"))


# --- options, startup and the handle ---------------------------------------------------------


@dataclass(frozen=True)
class LogstoreSpec:
    project: str
    logstore: str
    shards: int


@dataclass(frozen=True)
class GroupSpec:
    project: str
    logstore: str
    group: str
    timeout: int = DEFAULT_GROUP_TIMEOUT


@dataclass(frozen=True)
class EmulatorOptions:
    """Everything `cpmgr emulator` can be told."""

    host: str = "127.0.0.1"
    port: int = 0
    access_key_id: str | None = None
    access_key_secret: str | None = None
    logstores: tuple[LogstoreSpec, ...] = ()
    consumer_groups: tuple[GroupSpec, ...] = ()
    seed: int = 0
    faults: FaultSettings = field(default_factory=FaultSettings)
    state_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    sts_lifetime: float = DEFAULT_LIFETIME
    oidc_token_file: Path | None = None
    ecs_role_name: str = DEFAULT_ROLE_NAME
    write_rate: float = 0.0  # log groups per second appended to every read-write shard

    def problems(self) -> list[str]:
        """Cross-option problems; single values are checked when parsed."""
        found: list[str] = []
        if not (0 <= self.write_rate < float("inf")):
            found.append("--write-rate must be a number >= 0")
        if (self.access_key_id is None) != (self.access_key_secret is None):
            found.append("--access-key-id and --access-key-secret must be given together")
        if (self.tls_cert is None) != (self.tls_key is None):
            found.append("--tls-cert and --tls-key must be given together")
        if not self.sts_lifetime > 0:
            found.append("--sts-lifetime must be > 0")
        declared = {(spec.project, spec.logstore) for spec in self.logstores}
        for group in self.consumer_groups:
            if (group.project, group.logstore) not in declared and self.state_file is None:
                found.append(
                    f"--consumer-group {group.project}/{group.logstore}/{group.group}: "
                    "its logstore is not declared with --logstore"
                )
        return found


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_logstore(text: str) -> LogstoreSpec:
    """`PROJECT/LOGSTORE:SHARD_COUNT`."""
    path, _, count = text.rpartition(":")
    parts = path.split("/")
    if len(parts) != 2 or not all(parts) or not _is_decimal(count) or int(count) < 1:
        raise ValueError(f"{text!r}: expected PROJECT/LOGSTORE:SHARD_COUNT (count >= 1)")
    return LogstoreSpec(parts[0], parts[1], int(count))


def parse_group(text: str) -> GroupSpec:
    """`PROJECT/LOGSTORE/GROUP`."""
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{text!r}: expected PROJECT/LOGSTORE/GROUP")
    return GroupSpec(parts[0], parts[1], parts[2])


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPV6]:PORT`; port 0 picks a free port."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not _is_decimal(port) or int(port) > 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def parse_latency(text: str) -> tuple[float, float]:
    """`MIN:MAX` milliseconds, or a single value for a fixed latency."""
    low, _, high = text.partition(":")
    try:
        values = (float(low), float(high or low))
    except ValueError as exc:
        raise ValueError(f"{text!r}: expected MIN:MAX milliseconds") from exc
    return values


def _ssl_context(options: EmulatorOptions) -> ssl.SSLContext | None:
    if options.tls_cert is None or options.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"--tls-cert/--tls-key: cannot load: {exc}"]) from exc
    return context


def build_state(
    options: EmulatorOptions,
    *,
    wall_clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
    ownership_errors: OwnershipErrors | None = None,
) -> EmulatorState:
    """The initial state: declared logstores, the state file, then declared groups."""
    state = EmulatorState(
        wall_clock=wall_clock, monotonic=monotonic, ownership_errors=ownership_errors
    )
    for store in options.logstores:
        state.add_logstore(store.project, store.logstore, store.shards)
    if options.state_file is not None:
        state.load_file(options.state_file)
    for spec in options.consumer_groups:
        name = f"{spec.project}/{spec.logstore}/{spec.group}"
        try:
            if spec.group not in state.logstore(spec.project, spec.logstore).groups:
                state.create_group(spec.project, spec.logstore, spec.group, timeout=spec.timeout)
        except ApiError as exc:
            raise ConfigError([f"--consumer-group {name}: {exc.message}"]) from exc
    return state


class EmulatorHandle:
    """A running emulator: its address, live state and faults, and `close()`."""

    def __init__(
        self,
        server: HttpServer,
        emulator: EmulatorApp,
        *,
        host: str,
        port: int,
        tls: bool,
        state_file: Path | None,
        writer: SteadyWriter | None = None,
    ) -> None:
        self._server = server
        self.writer = writer
        self._closed = False
        self._state_file = state_file
        self.app = emulator
        self.state = emulator.state
        self.faults = emulator.faults
        self.host = host
        self.port = port
        bracketed = f"[{host}]" if ":" in host else host
        self.endpoint = f"{bracketed}:{port}"
        self.url = f"{'https' if tls else 'http'}://{self.endpoint}"

    async def close(self) -> None:
        """Stop serving and, with a state file, save the state; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.writer is not None:
                await self.writer.close()
            await self.app.close()
            await self._server.close()
        finally:
            if self._state_file is not None:
                self.state.save_file(self._state_file)


async def start_emulator(
    options: EmulatorOptions,
    *,
    wall_clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    ownership_errors: OwnershipErrors | None = None,
) -> EmulatorHandle:
    """Build the state and start serving; raises ConfigError or OSError (address in use)."""
    problems = options.problems()
    if problems:
        raise ConfigError(problems)
    state = build_state(
        options, wall_clock=wall_clock, monotonic=monotonic, ownership_errors=ownership_errors
    )
    keys = {}
    if options.access_key_id is not None and options.access_key_secret is not None:
        keys[options.access_key_id] = options.access_key_secret
    emulator = EmulatorApp(
        state,
        FaultInjector(options.faults, seed=options.seed),
        keys=keys,
        sleep=sleep,
        sts_lifetime=options.sts_lifetime,
        oidc_token_file=options.oidc_token_file,
        ecs_role_name=options.ecs_role_name,
    )
    ssl_context = _ssl_context(options)
    server = HttpServer(emulator.respond, max_body=MAX_BODY_BYTES)
    port = await server.start(options.host, options.port, ssl_context=ssl_context)
    writer = None
    if options.write_rate > 0:
        writer = SteadyWriter(state, options.write_rate)
        writer.start()
    return EmulatorHandle(
        server,
        emulator,
        host=options.host,
        port=port,
        tls=ssl_context is not None,
        state_file=options.state_file,
        writer=writer,
    )


def _logstore_spec(value: str | LogstoreSpec) -> LogstoreSpec:
    return value if isinstance(value, LogstoreSpec) else parse_logstore(value)


def _group_spec(value: str | GroupSpec) -> GroupSpec:
    return value if isinstance(value, GroupSpec) else parse_group(value)


@contextlib.asynccontextmanager
async def running_emulator(
    *,
    logstores: Iterable[str | LogstoreSpec] = (),
    consumer_groups: Iterable[str | GroupSpec] = (),
    access_key_id: str | None = None,
    access_key_secret: str | None = None,
    seed: int = 0,
    error_rate: float = 0.0,
    throttle_rate: float = 0.0,
    reset_rate: float = 0.0,
    latency_ms: tuple[float, float] = (0.0, 0.0),
    force: Mapping[str, tuple[int, str]] | None = None,
    late_rate: float = 0.0,
    late_ms: tuple[float, float] = (0.0, 0.0),
    late: Mapping[str, LateLanding] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    state_file: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    wall_clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    ownership_errors: OwnershipErrors | None = None,
    sts_lifetime: float = DEFAULT_LIFETIME,
    oidc_token_file: str | Path | None = None,
    ecs_role_name: str = DEFAULT_ROLE_NAME,
    write_rate: float = 0.0,
) -> AsyncIterator[EmulatorHandle]:
    """Run an emulator for the duration of an `async with`; yields its handle.

    Logstores and groups use the CLI syntax (`"project/logstore:4"`, `"project/logstore/group"`).
    """
    options = EmulatorOptions(
        host=host,
        port=port,
        access_key_id=access_key_id,
        access_key_secret=access_key_secret,
        logstores=tuple(_logstore_spec(value) for value in logstores),
        consumer_groups=tuple(_group_spec(value) for value in consumer_groups),
        seed=seed,
        faults=FaultSettings(
            error_rate=error_rate,
            throttle_rate=throttle_rate,
            reset_rate=reset_rate,
            latency_ms=latency_ms,
            force=dict(force or {}),
            late_rate=late_rate,
            late_ms=late_ms,
            late=dict(late or {}),
        ),
        state_file=Path(state_file) if state_file is not None else None,
        tls_cert=Path(tls_cert) if tls_cert is not None else None,
        tls_key=Path(tls_key) if tls_key is not None else None,
        sts_lifetime=sts_lifetime,
        oidc_token_file=Path(oidc_token_file) if oidc_token_file is not None else None,
        ecs_role_name=ecs_role_name,
        write_rate=write_rate,
    )
    handle = await start_emulator(
        options,
        wall_clock=wall_clock,
        monotonic=monotonic,
        sleep=sleep,
        ownership_errors=ownership_errors,
    )
    try:
        yield handle
    finally:
        await handle.close()
