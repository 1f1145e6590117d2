"""Memory settings of both services: glibc's heap thresholds for a data path that allocates
and frees buffers of 256 KiB to 1 MiB per read, and the garbage collector's view of what
was loaded at start-up.

Each bulk read makes a few such buffers (the socket read, and the buffers of
relay/tlswire.py that OpenSSL decrypts into and that the ciphertext of a write is read
into). glibc sizes its mmap and trim thresholds
from what was freed before; when they sit below these buffers, every read maps fresh
pages or gives the heap's top back to the kernel and faults it in again. perf showed a
third of the relay's time in page faults then (do_anonymous_page, unmap_page_range),
one bulk stream at 270-340 MB/s against 520-600 without (docs/performance.md), at
random, depending on what the heap held before.

Fixed thresholds end that: buffers up to MMAP_THRESHOLD come from the heap, and up to
TRIM_THRESHOLD of free memory at its top is kept for the next read rather than handed
back. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

from . import defaults

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * defaults.MiB  # above the 1 MiB tunnel read and the 256 KiB buffers
TRIM_THRESHOLD = 32 * defaults.MiB


def keep_buffers_on_the_heap() -> bool:
    """Set the thresholds; False where the C library has no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def freeze_startup_objects() -> int:
    """Move everything alive now (Twisted, OpenSSL bindings, our modules: about 45,000
    objects) out of the garbage collector's sight, and return how many.

    A full collection walks every tracked object; with all of start-up in it, it took
    25-37 ms in a bench run (a gc.callbacks probe in both processes), a stall of every
    stream of the tunnel at once. Frozen objects are never walked (nor freed: what is
    garbage is collected first), so the full collections left walk what the tunnel made
    since: its streams and buffers.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
