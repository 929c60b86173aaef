"""The fixed mmap threshold: large blocks stay mmapped after glibc would have raised its threshold."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from unisrec_x.runtime.allocator import fix_mmap_threshold

PROBE = textwrap.dedent("""
    import ctypes, sys
    from unisrec_x.runtime.allocator import fix_mmap_threshold
    fixed = fix_mmap_threshold(128 * 1024) if sys.argv[1] == "fix" else False

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    size = 4 << 20
    libc.free(libc.malloc(size))   # glibc's dynamic threshold rises to 4 MB here
    block = libc.malloc(size)      # ... so this block comes from the heap, unless the threshold is fixed
    print(fixed, libc.mallinfo2().hblkhd >= size)
""")


def _glibc_with_mallinfo2() -> bool:
    """The probes load ``libc.so.6`` and read ``mallinfo2`` (glibc 2.33+): musl, macOS and Windows have neither."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


GLIBC = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33+ (libc.so.6 with mallinfo2)")


def _clean_env() -> dict[str, str]:
    """This environment without a malloc setting of its own, so each probe sets exactly what it tests."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("UNISREC_X_MALLOC", "GLIBC_TUNABLES")}


def _probe(mode: str, **env: str) -> str:
    clean = _clean_env()
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**clean, **env}).stdout.split()


@GLIBC
def test_large_blocks_stay_mmapped_once_the_threshold_is_fixed():
    assert _probe("fix") == ["True", "True"]
    assert _probe("default") == ["False", "False"]  # glibc's own behaviour, which made the resident set creep


@GLIBC
def test_the_users_own_malloc_settings_win():
    assert _probe("fix", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
    assert _probe("fix", UNISREC_X_MALLOC="default") == ["False", "False"]


@GLIBC
def test_a_glibc_malloc_tunable_of_the_users_wins():
    """``GLIBC_TUNABLES`` sets the same thresholds as ``MALLOC_*_``; ``mallopt`` would silently override it."""
    assert _probe("fix", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == ["False", "True"]  # the user's 64 KiB
    assert _probe("fix", GLIBC_TUNABLES="glibc.rtld.nns=4:glibc.malloc.trim_threshold=1000000")[0] == "False"
    assert _probe("fix", GLIBC_TUNABLES="glibc.rtld.nns=4") == ["True", "True"]  # not a malloc setting: ours applies


def test_nothing_happens_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fix_mmap_threshold(1 << 20) is False


TRIM_PROBE = textwrap.dedent("""
    import ctypes, sys
    from unisrec_x.runtime.allocator import fix_mmap_threshold, trim_heap

    def rss_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

    fix_mmap_threshold(32 << 20)  # as the CLI: blocks of a few MB come from the heap
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4 << 20) for _ in range(64)]  # 256 MB of 4 MB blocks, touched
    for block in blocks:
        ctypes.memset(block, 1, 4 << 20)
    for block in blocks[:-1]:  # the last one pins the heap's top: nothing is trimmed on free
        libc.free(block)
    before = rss_mb()
    trimmed = trim_heap() if sys.argv[1] == "trim" else False
    print(trimmed, before - rss_mb())
""")


@GLIBC
def test_trim_returns_freed_heap_below_a_live_block():
    clean = _clean_env()
    outputs = {mode: subprocess.run([sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True,
                                    check=True, env=clean).stdout.split() for mode in ("trim", "keep")}
    assert outputs["trim"][0] == "True" and int(outputs["trim"][1]) > 200  # of the 252 MB freed
    assert outputs["keep"][0] == "False" and int(outputs["keep"][1]) < 20  # freed, but still resident


def test_growth_trim_trims_only_past_the_warm_level_plus_its_allowance(monkeypatch):
    from unisrec_x.training import heap

    readings, trims = iter([500.0, 600.0, 629.0, 300.0, 420.0, 429.0]), []
    monkeypatch.setattr(heap, "resident_mb", lambda: next(readings))
    monkeypatch.setattr(heap, "trim_heap", lambda: trims.append(True))
    policy = heap.GrowthTrim(growth_mb=128)
    # warm level 500 (one step after start); 600 is within 128 MB of it; 629 is not -> trim;
    # 300 is the new warm level; 420 within; 429 past it (300 + 128 = 428 < 429) -> trim
    assert [policy.after_step() for _ in range(6)] == [False, False, True, False, False, True]
    assert policy.trims == len(trims) == 2


def test_growth_trim_trims_every_step_without_procfs(monkeypatch):
    from unisrec_x.training import heap

    monkeypatch.setattr(heap, "resident_mb", lambda: None)
    monkeypatch.setattr(heap, "trim_heap", lambda: True)
    policy = heap.GrowthTrim()
    assert all(policy.after_step() for _ in range(3))


def test_resident_set_is_read_from_procfs():
    from unisrec_x.training.heap import resident_mb

    rss = resident_mb()
    if os.path.exists("/proc/self/status") and os.path.exists("/proc/self/statm"):
        status = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
        assert rss == pytest.approx(status, rel=0.1)
    else:
        assert rss is None
