"""How cpmgr keeps Python's cyclic garbage collector from stalling the event loop.

A full (generation 2) collection walks every object the collector tracks, in one go, on
whichever thread triggered it: at 100,000 shards with an object per shard that held the event
loop for 80-100 ms of CPU. So nothing cpmgr keeps per shard is tracked: values are plain tuples
(the collector stops tracking a tuple of strings and numbers itself), and the per-shard records
that must stay mutable are taken out of its sight with `untrack`. What is left for a full
collection is the process's working set (connections, in-flight commits), which does not grow
with the shards; `freeze_startup` also takes the start-up objects (modules, classes, the
daemon's components) out of every later scan.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

__all__ = ["freeze_startup", "untrack"]


def _c_untrack() -> Callable[[object], None] | None:
    """CPython's `PyObject_GC_UnTrack`, or None where the C API is not reachable. Called
    through `ctypes.pythonapi`, which keeps the GIL held (the collector of another thread never
    sees an object half untracked)."""
    api = getattr(ctypes, "pythonapi", None)
    function = getattr(api, "PyObject_GC_UnTrack", None)
    if function is None:
        return None
    function.argtypes = [ctypes.py_object]
    function.restype = None
    untrack: Callable[[object], None] = function
    return untrack


_UNTRACK = _c_untrack()


def untrack(obj: object) -> None:
    """Stop the cyclic garbage collector from scanning `obj`.

    Only for objects that can never be part of a reference cycle: ones that hold nothing but
    strings, numbers, None and tuples of them (or other such objects), and that nothing they
    hold refers back to. Reference counting still frees them as soon as the last reference
    goes; the collector would only ever have visited them to find nothing. Setting an attribute
    or adding to a set does not track the object again; storing a tracked object in a dict
    does, so a dict is untracked again after such a store. A no-op where the C API is not
    reachable (the objects are then scanned as usual)."""
    if _UNTRACK is not None and gc.is_tracked(obj):
        _UNTRACK(obj)


def freeze_startup() -> None:
    """Collect once, then move every object alive now to the collector's permanent generation,
    which no later collection scans. For the process's own daemon, once start-up is over.

    Safe because what is alive then lives as long as the process (modules, classes, functions,
    the daemon's components and config) or is freed by reference counting when dropped (a
    reloaded config, a restored shard forgotten later): neither needs the cyclic collector. An
    object frozen here that later became garbage inside a reference cycle would stay until
    exit; that is at most what start-up built, once, never a growth."""
    gc.collect()
    gc.freeze()
