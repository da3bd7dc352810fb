"""External tools the tests run (promtool, prometheus, hadolint, kustomize): found, or fetched
once by .ci/ensure-tools into .cache/tools/, or a clear failure, never a skip."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".cache" / "tools"
ENSURE = REPO / ".ci" / "ensure-tools"
KUSTOMIZE_LIBRARY = TOOLS / "kustomize" / "libkustomize.so"
# Which .ci/ensure-tools argument brings each tool.
_FETCHED_BY = {"promtool": "prometheus", "prometheus": "prometheus"}


def _find(name: str) -> str | None:
    # The venv's bin is not on PATH when pytest is run as .venv/bin/pytest.
    for directory in (Path(sys.executable).parent, TOOLS / "bin"):
        if (directory / name).exists():
            return str(directory / name)
    return shutil.which(name)


@functools.cache
def _ensure(what: str) -> str:
    """Run .ci/ensure-tools for `what` once per session; its output, for a failure message."""
    done = subprocess.run(
        ["bash", str(ENSURE), what], capture_output=True, text=True, check=False, timeout=600
    )
    return done.stdout + done.stderr


def tool(name: str, install_hint: str = "") -> str:
    """The path of an external program; fetched by .ci/ensure-tools if it can be."""
    found = _find(name)
    if found is None and name in _FETCHED_BY:
        output = _ensure(_FETCHED_BY[name])
        found = _find(name)
        install_hint = install_hint or output
    if found is None:
        pytest.fail(f"{name} is not installed: {install_hint}", pytrace=False)
    return found


def kustomize_library() -> Path:
    """The kustomize shared library (.ci/ensure-tools kustomize)."""
    if not KUSTOMIZE_LIBRARY.exists():
        output = _ensure("kustomize")
        if not KUSTOMIZE_LIBRARY.exists():
            pytest.fail(f"the kustomize library is missing:\n{output}", pytrace=False)
    return KUSTOMIZE_LIBRARY
