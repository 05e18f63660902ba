"""Giving freed heap memory back to the operating system while the engine is idle.

glibc's malloc keeps freed memory in per-thread arenas for reuse. Tensors of ever-changing sizes
(each step's batch has another shape) leave those arenas fragmented, so a long-running server's
RSS creeps up although nothing is kept (measured: the soak, docs/reliability.md). `malloc_trim(0)`
returns the free pages of every arena. It takes milliseconds, so it runs when the engine has
nothing to do, at most once every `interval_s`; an engine that is never idle trims between two
steps once every `busy_interval_s` instead. Elsewhere (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class IdleTrimmer:
    def __init__(self, interval_s: float = 30.0, busy_interval_s: float = 120.0, clock=time.monotonic):
        self.interval_s = interval_s
        self.busy_interval_s = busy_interval_s
        self.clock = clock
        self._trim = _malloc_trim()
        self._last = clock()
        self._busy_since_trim = False
        self.num_trims = 0

    def stepped(self) -> bool:
        """The engine ran a step; trim if it has been busy for busy_interval_s since the last trim."""
        self._busy_since_trim = True
        return self._maybe_trim(self.busy_interval_s)

    def idle(self) -> bool:
        """The engine has nothing to do: trim if it worked since the last trim and the interval passed."""
        return self._busy_since_trim and self._maybe_trim(self.interval_s)

    def _maybe_trim(self, interval_s: float) -> bool:
        if self._trim is None or self.clock() - self._last < interval_s:
            return False
        self._trim(0)
        self._last = self.clock()
        self._busy_since_trim = False
        self.num_trims += 1
        return True
