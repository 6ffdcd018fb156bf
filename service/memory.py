"""Hands the C allocator's free memory back to the system after a burst of large refused requests.

A flood of large messages (200 unauthenticated health requests of 1 MiB each, say) is received by grpc's
C core in many small buffers before a handler can refuse it; once they are freed, glibc keeps the pages
inside its heaps, and the process holds them as if the flood were still there. `malloc_trim(0)` returns
every whole free page to the system. `soon()` asks for one trim once the burst is over (a burst of
refusals costs one trim); elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

TRIM_DELAY_S = 1.0  # after the last refusal of a burst


def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()
_lock = threading.Lock()
_last = 0.0  # time.monotonic() of the latest `soon()`
_pending = False  # a trimming thread is waiting for the burst to end


def soon() -> None:
    """Trim the C heap once `TRIM_DELAY_S` pass without another call."""
    global _last, _pending
    if _TRIM is None:
        return
    with _lock:
        _last = time.monotonic()
        if _pending:
            return
        _pending = True
    threading.Thread(target=_trim_after_burst, name="textgen-trim", daemon=True).start()


def _trim_after_burst() -> None:
    global _pending
    while True:
        with _lock:
            wait_s = _last + TRIM_DELAY_S - time.monotonic()
            if wait_s <= 0:
                _pending = False
                break
        time.sleep(wait_s)
    _TRIM(0)
