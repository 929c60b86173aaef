"""A fixed glibc mmap threshold, so a training process's memory stays flat across epochs.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit)
and its trim threshold with it (to twice that), so freed heap above the live set is kept.
Length-bucketed batches allocate tensors of ever-changing sizes, the freed heap fragments, and
the resident set crept up epoch after epoch: a Scientific SASRec-ID fit peaked at 2.1 GB after 4
epochs and 3.2-3.4 GB after a full fit. Fixing the threshold (``mallopt``) also fixes the trim
threshold at glibc's 128 KiB, and blocks above the threshold are mmapped and returned when freed.

The CLI fixes it at 32 MiB (``cli.MMAP_THRESHOLD``). A 128 KiB threshold held memory lowest but
mmapped (and page-faulted) every activation anew each step: 30-40% of a fit's time went to the
kernel. Since training bounds the positions encoded at once (``SeqRecModule.encoder_chunk_tokens``),
activations are a few MB, come from the heap, and 32 MiB keeps a 4-epoch UniSRec fit at ~1.2 GB
with a quarter of the page faults and a third of the kernel time (benchmarks/README.md, "Peak memory").
``UNISREC_X_MALLOC=default`` keeps glibc's behaviour, and so does any malloc setting of the user's own
(``MALLOC_*_`` variables, a ``glibc.malloc.*`` tunable in ``GLIBC_TUNABLES``): ``mallopt`` would override it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
#: Environment variables with which a user sets glibc's malloc by hand; any of them wins over ours.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OFF_ENV = "UNISREC_X_MALLOC"


def _user_malloc_settings() -> bool:
    """The user tuned glibc's malloc: a ``MALLOC_*_`` variable, or a ``glibc.malloc.*`` tunable
    (``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(k in os.environ for k in USER_SETTINGS)
            or any(t.strip().startswith("glibc.malloc.") for t in tunables.split(":")))


def _libc() -> ctypes.CDLL | None:
    """glibc, or ``None`` off Linux and where the user keeps glibc's own malloc behaviour."""
    if sys.platform != "linux" or os.environ.get(OFF_ENV) == "default" or _user_malloc_settings():
        return None
    return _load_glibc()


@functools.cache
def _load_glibc() -> ctypes.CDLL | None:
    """Loaded once: ``find_library`` runs ``ldconfig`` (~4 ms), and ``trim_heap`` may run every step."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # musl and other C libraries have neither
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def fix_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; ``False`` (nothing changed) off glibc, when
    the user set malloc through its environment variables or ``GLIBC_TUNABLES``, or with
    ``UNISREC_X_MALLOC=default``."""
    libc = _libc()
    done = libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    if done:
        log.debug("glibc mmap threshold fixed at %d bytes", threshold)
    return done


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``, which also releases free
    pages inside the heap, not only at its top); ``True`` if any were. Under the fixed threshold
    activations of a few MB come from the heap, and what one step freed between live blocks stayed
    resident: a Scientific fit's resident set crept from 0.5 to 1.2 GB over 5 epochs without it."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))
