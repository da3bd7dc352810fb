"""`kustomize build` through the kustomize library (.ci/ensure-tools kustomize), via ctypes."""

from __future__ import annotations

import ctypes
import functools
import json
from pathlib import Path
from typing import Any

import yaml
from tools import kustomize_library

# The library's build options: restrict loads to the kustomization's root (kustomize's default)
# and keep the resources in the order kustomize prints them by default.
_OPTIONS = json.dumps(
    {
        "load_restrictions": 0,
        "reorder": "legacy",
        "add_managedby_label": False,
        "enable_plugins": False,
        "enable_helm": False,
        "helm_command": "",
    }
).encode()


class KustomizeError(Exception):
    """kustomize refused the kustomization; its own message."""


@functools.cache
def _library() -> ctypes.CDLL:
    library = ctypes.CDLL(str(kustomize_library()))
    library.pykustomize_build.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    library.pykustomize_build.restype = ctypes.c_int
    library.pykustomize_last_error.restype = ctypes.c_void_p
    library.pykustomize_free.argtypes = [ctypes.c_void_p]
    return library


def build(directory: Path) -> str:
    """The YAML that `kustomize build DIRECTORY` prints."""
    library = _library()
    result = ctypes.c_void_p()
    if library.pykustomize_build(str(directory).encode(), _OPTIONS, ctypes.byref(result)) != 0:
        error = library.pykustomize_last_error()
        raise KustomizeError(ctypes.string_at(error).decode() if error else "unknown error")
    try:
        return ctypes.string_at(result.value).decode() if result.value else ""
    finally:
        library.pykustomize_free(result)


def documents(directory: Path) -> list[dict[str, Any]]:
    """The rendered manifests of a kustomization."""
    return [doc for doc in yaml.safe_load_all(build(directory)) if doc is not None]
