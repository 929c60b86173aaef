"""A fixed glibc mmap threshold, so a training process's memory stays flat across epochs.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit),
after which tensors of a few MB come from the heap. Length-bucketed batches allocate tensors of
ever-changing sizes, the freed heap fragments, and the resident set creeps up epoch after epoch:
a Scientific SASRec-ID fit peaked at 2.1 GB after 4 epochs and 3.2-3.4 GB after a full fit. With
the threshold fixed, blocks above it are mmapped and go back to the system when freed
(benchmarks/README.md, "Peak memory"). ``UNISREC_X_MALLOC=default`` keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
#: Environment variables with which a user sets glibc's malloc by hand; any of them wins over ours.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OFF_ENV = "UNISREC_X_MALLOC"


def fix_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; ``False`` (nothing changed) off glibc, when
    the user set malloc through its environment variables, or with ``UNISREC_X_MALLOC=default``."""
    if sys.platform != "linux" or os.environ.get(OFF_ENV) == "default" or any(k in os.environ for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if done:
        log.debug("glibc mmap threshold fixed at %d bytes", threshold)
    return done

