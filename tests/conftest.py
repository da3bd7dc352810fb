"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_helpers import short_socket_dir


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory under /tmp for sockets: pytest's tmp_path is too long for one."""
    with short_socket_dir() as path:
        yield path
