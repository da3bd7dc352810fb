"""SLS endpoints: `host`, `host:port` or `scheme://host[:port]`, and the URL and Host they give."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from yarl import URL

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: connect to `host[:port]`, send `Host: <project>.<host>` (no port)."""

    scheme: str
    host: str
    port: int | None

    def host_header(self, project: str) -> str:
        """The Host header addressing `project`: SLS reads the project from it."""
        return f"{project}.{self.host}"

    def url(self, encoded_path: str, encoded_query: str) -> URL:
        """The request URL, with path and query used exactly as given (already encoded)."""
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=encoded_path,
            query_string=encoded_query,
            encoded=True,
        )


def parse_endpoint(text: str) -> Endpoint:
    """Parse `host`, `host:port` or `scheme://host[:port]` (https by default).

    Raises ValueError for anything else (another scheme, a path, credentials, a bad host or port).
    """
    cleaned = text.strip()
    has_scheme = "://" in cleaned
    try:
        parts = urlsplit(cleaned if has_scheme else f"https://{cleaned}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid endpoint {text!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"invalid endpoint {text!r}: port 0")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"invalid endpoint {text!r}: scheme must be http or https")
    extra = parts.username or parts.password or parts.query or parts.fragment
    if extra or parts.path not in ("", "/"):
        raise ValueError(f"invalid endpoint {text!r}: only scheme, host and port are allowed")
    host = parts.hostname or ""
    # An IPv6 literal cannot be prefixed with a project name, so only names and IPv4 qualify.
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"invalid endpoint {text!r}: bad host name")
    return Endpoint(scheme=scheme, host=host, port=port)
