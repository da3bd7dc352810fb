"""SLS request signing, v1 (hmac-sha1) and v4 (SLS4-HMAC-SHA256): pure functions.

v1 signs a canonical string of the method, content headers, `x-log-*`/`x-acs-*` headers and
the resource; v4 signs a SigV4-style canonical request. The caller passes the query parameters
exactly as they will be sent (strings), the headers it will send, and the body; the result is
the Authorization value.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

if TYPE_CHECKING:
    from _hashlib import HASH

SignatureVersion = Literal["v1", "v4"]

API_VERSION = "0.6.0"
V4_ALGORITHM = "SLS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Credentials:
    """An access key pair and optional STS token. `repr` never shows the secret or token."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(default="", repr=False)


_LOG_PREFIXES = ("x-log-", "x-acs-")


def _is_log_header(lowered_name: str) -> bool:
    if lowered_name.startswith("x-log-meta-"):
        return False
    return lowered_name.startswith(("x-log-", "x-acs-"))


def _header(headers: Mapping[str, str], name: str) -> str:
    """The value of header `name`, whatever the case of its name in `headers`."""
    wanted = name.lower()
    # Two direct lookups first: the name as given, then lower-cased (as HTTP servers keep them).
    found = headers.get(name)
    if found is None:
        found = headers.get(wanted)
    if found is not None:
        return found
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return ""


def v1_string_to_sign(
    method: str, path: str, params: Mapping[str, str], headers: Mapping[str, str]
) -> str:
    """The v1 string-to-sign. `x-log-date` is left out: the SDKs add it after signing."""
    # This runs for every request the emulator verifies, whose clients send the same header
    # names call after call: the shape of the string is worked out once per set of names.
    layout = _v1_layout(tuple(headers))
    if layout is None:
        return _v1_string_to_sign_scanned(method, path, params, headers)
    template, values = layout
    return template % (method.upper(), *values(headers), v1_resource(path, params))


_HeaderValues = Callable[[Mapping[str, str]], tuple[str, ...]]
_V1_CONTENT_HEADERS = ("Content-MD5", "Content-Type", "Date")


@functools.lru_cache(maxsize=256)
def _v1_layout(names: tuple[str, ...]) -> tuple[str, _HeaderValues] | None:
    """For headers with these `names`: a template of the string-to-sign (to format with the
    method, the header values picked by the function that comes with it, and the resource).

    None when two signed names differ only in case: their order then depends on their values.
    """
    signed = sorted((name.lower(), name) for name in names if _is_v1_signed(name.lower()))
    if len({lowered for lowered, _ in signed}) != len(signed):
        return None
    content_keys = [
        _v1_content_key(names, name) for name in ("Content-MD5", "Content-Type", "Date")
    ]
    template = "%s\n" + "".join(("%s" if key else "") + "\n" for key in content_keys)
    template += "".join(f"{_format_literal(lowered)}:%s\n" for lowered, _ in signed) + "%s"
    keys = [key for key in content_keys if key] + [key for _, key in signed]
    return template, _values_of(keys)


def _format_literal(text: str) -> str:
    return text.replace("%", "%%")


def _values_of(keys: list[str]) -> _HeaderValues:
    """A function giving the values of `keys` (in order) from a mapping of headers."""
    if len(keys) > 1:
        getter: _HeaderValues = operator.itemgetter(*keys)
        return getter
    if keys:
        only = keys[0]
        return lambda headers: (headers[only],)
    return lambda headers: ()


def _is_v1_signed(lowered_name: str) -> bool:
    return (
        lowered_name.startswith(_LOG_PREFIXES)
        and lowered_name != "x-log-date"
        and not lowered_name.startswith("x-log-meta-")
    )


def _v1_content_key(names: tuple[str, ...], name: str) -> str:
    """The key `_content_header` reads `name` from: `name` itself, else the first in any case."""
    if name in names:
        return name
    wanted = name.lower()
    return next((key for key in names if key.lower() == wanted), "")


def _v1_string_to_sign_scanned(
    method: str, path: str, params: Mapping[str, str], headers: Mapping[str, str]
) -> str:
    """`v1_string_to_sign` for any headers, by one pass over them."""
    log_headers = []
    lowered: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        lowered.setdefault(name, value)
        if _is_v1_signed(name):
            log_headers.append((name, value))
    log_headers.sort()
    canonical_headers = "".join([f"{name}:{value}\n" for name, value in log_headers])
    return "\n".join(
        [
            method.upper(),
            _content_header(headers, lowered, "Content-MD5"),
            _content_header(headers, lowered, "Content-Type"),
            _content_header(headers, lowered, "Date"),
            canonical_headers + v1_resource(path, params),
        ]
    )


def _content_header(headers: Mapping[str, str], lowered: Mapping[str, str], name: str) -> str:
    """Header `name` as given if present, else under any case (`lowered`), else ""."""
    found = headers.get(name)
    return found if found is not None else lowered.get(name.lower(), "")


def v1_resource(path: str, params: Mapping[str, str]) -> str:
    """The canonical resource v1 signs: the path, then the parameters sorted by name."""
    if not params:
        return path
    return _v1_resource(path, tuple(params.items()))


@functools.lru_cache(maxsize=256)
def _v1_resource(path: str, params: tuple[tuple[str, str], ...]) -> str:
    # Cached: a client sends the same few resources over and over (one per consumer group).
    return path + "?" + "&".join([f"{key}={value}" for key, value in sorted(params)])


def sign_v1(
    creds: Credentials,
    method: str,
    path: str,
    params: Mapping[str, str],
    headers: Mapping[str, str],
) -> str:
    """The Authorization header value for a v1-signed request."""
    string_to_sign = v1_string_to_sign(method, path, params, headers)
    return f"LOG {creds.access_key_id}:{v1_signature(creds.access_key_secret, string_to_sign)}"


def v1_signature(secret: str, string_to_sign: str) -> str:
    """The signature part of a v1 Authorization value: base64 of the HMAC-SHA1."""
    inner, outer = _sha1_pads(secret)
    inner_hash = inner.copy()
    inner_hash.update(string_to_sign.encode())
    outer_hash = outer.copy()
    outer_hash.update(inner_hash.digest())
    return binascii.b2a_base64(outer_hash.digest(), newline=False).decode()


@dataclass(frozen=True)
class V1Template:
    """The parts of a v1 string-to-sign that stay the same from one call to the next.

    For a request with the headers `signed_headers` builds (no other x-log-/x-acs- headers),
    `authorization` gives what `sign_v1` gives, with far less work per call.
    """

    method: str
    content_type: str  # "" for a request without a body
    canonical_tail: str  # the fixed x-log- headers, then the canonical resource

    @classmethod
    def prepare(
        cls,
        method: str,
        path: str,
        params: Mapping[str, str],
        *,
        has_body: bool,
        content_type: str = "application/json",
    ) -> V1Template:
        resource = v1_resource(path, params)
        # Sorted, as v1_string_to_sign sorts them; x-acs-security-token sorts before all three.
        fixed = f"x-log-apiversion:{API_VERSION}\n"
        if not has_body:
            fixed += "x-log-bodyrawsize:0\n"
        fixed += "x-log-signaturemethod:hmac-sha1\n"
        return cls(method.upper(), content_type if has_body else "", fixed + resource)

    def authorization(self, creds: Credentials, *, date: str, content_md5: str) -> str:
        """The Authorization value for this request sent at `date` with `content_md5`."""
        token = creds.security_token
        token_line = f"x-acs-security-token:{token}\n" if token else ""
        message = (
            f"{self.method}\n{content_md5}\n{self.content_type}\n{date}\n"
            f"{token_line}{self.canonical_tail}"
        )
        return f"LOG {creds.access_key_id}:{v1_signature(creds.access_key_secret, message)}"


_SHA1_BLOCK_BYTES = 64
# bytes.translate tables XOR-ing every byte with HMAC's inner and outer pad.
_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


@functools.lru_cache(maxsize=8)
def _sha1_pads(secret: str) -> tuple[HASH, HASH]:
    """SHA-1 states fed HMAC's inner and outer padded key (RFC 2104) for `secret`.

    Copying them gives the HMAC of a message with two hash copies, without setting up the key
    (or the `hmac` module's Python wrapper) for every message: half the cost of `hmac.new`.
    """
    key = secret.encode()
    if len(key) > _SHA1_BLOCK_BYTES:
        key = hashlib.sha1(key).digest()
    key = key.ljust(_SHA1_BLOCK_BYTES, b"\0")
    inner = hashlib.sha1(key.translate(_INNER_PAD))
    outer = hashlib.sha1(key.translate(_OUTER_PAD))
    return inner, outer


def http_date(moment: datetime) -> str:
    """The Date header value (RFC 1123, GMT) of `moment`."""
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _rfc3986(value: str) -> str:
    return quote(value, safe="-_.~")


def _v4_canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    selected = sorted(
        (key.lower(), value.strip())
        for key, value in headers.items()
        if key.lower() in ("content-type", "host") or _is_log_header(key.lower())
    )
    block = "".join(f"{name}:{value}\n" for name, value in selected)
    return block, ";".join(name for name, _ in selected)


def v4_canonical_request(
    method: str, path: str, params: Mapping[str, str], headers: Mapping[str, str]
) -> str:
    """The v4 canonical request; the payload hash is taken from `x-log-content-sha256`."""
    query = "&".join(
        f"{_rfc3986(key)}={_rfc3986(params[key])}" if params[key] else _rfc3986(key)
        for key in sorted(params)
    )
    header_block, signed_headers = _v4_canonical_headers(headers)
    payload_hash = _header(headers, "x-log-content-sha256") or EMPTY_SHA256
    return "\n".join(
        [method.upper(), _rfc3986_path(path), query, header_block, signed_headers, payload_hash]
    )


def _rfc3986_path(path: str) -> str:
    return quote(path, safe="/-_.~")


def _hmac256(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def v4_signing_key(secret: str, day: str, region: str) -> bytes:
    key = _hmac256(("aliyun_v4" + secret).encode(), day)
    for part in (region, "sls", "aliyun_v4_request"):
        key = _hmac256(key, part)
    return key


def sign_v4(
    creds: Credentials,
    method: str,
    path: str,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    *,
    region: str,
) -> str:
    """The Authorization header value for a v4-signed request; needs `x-log-date` set."""
    log_date = _header(headers, "x-log-date")
    day = log_date[:8]
    scope = f"{day}/{region}/sls/aliyun_v4_request"
    canonical = v4_canonical_request(method, path, params, headers)
    string_to_sign = "\n".join(
        [V4_ALGORITHM, log_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signature = hmac.new(
        v4_signing_key(creds.access_key_secret, day, region),
        string_to_sign.encode(),
        hashlib.sha256,
    ).hexdigest()
    return f"{V4_ALGORITHM} Credential={creds.access_key_id}/{scope},Signature={signature}"


def signed_headers(
    creds: Credentials,
    method: str,
    path: str,
    params: Mapping[str, str],
    *,
    host: str,
    body: bytes,
    now: datetime,
    version: SignatureVersion = "v1",
    region: str | None = None,
    content_type: str = "application/json",
) -> dict[str, str]:
    """Every header a signed SLS request carries, Authorization included.

    `Host` is included because v4 signs it; the caller must send exactly these headers.
    """
    headers: dict[str, str] = {"Host": host, "x-log-apiversion": API_VERSION}
    if body:
        headers["Content-Type"] = content_type
    else:
        headers["x-log-bodyrawsize"] = "0"
    if creds.security_token:
        headers["x-acs-security-token"] = creds.security_token
    if version == "v4":
        if not region:
            raise ValueError("signature v4 needs a region")
        headers["x-log-date"] = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        headers["x-log-content-sha256"] = hashlib.sha256(body).hexdigest()
        headers["Authorization"] = sign_v4(creds, method, path, params, headers, region=region)
        return headers
    headers["x-log-signaturemethod"] = "hmac-sha1"
    headers["Date"] = http_date(now)
    if body:
        headers["Content-MD5"] = hashlib.md5(body).hexdigest().upper()
    headers["Authorization"] = sign_v1(creds, method, path, params, headers)
    return headers
