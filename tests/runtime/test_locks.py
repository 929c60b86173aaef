"""The one flock helper the run-folder guard, the model-directory writer lock and cache builders share."""

from __future__ import annotations

import pytest

from unisrec_x.runtime import locks


def test_a_second_open_file_waits_until_the_first_lets_go(tmp_path):
    pytest.importorskip("fcntl")
    path = tmp_path / ".lock"
    first, second = open(path, "a+"), open(path, "a+")  # flock holds per open file, so one process shows it
    try:
        assert locks.try_lock(first) is True
        assert locks.try_lock(second) is False
        first.close()
        assert locks.try_lock(second) is True
    finally:
        first.close()
        second.close()


def test_without_flock_nothing_is_locked_and_building_still_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "fcntl", None)
    with open(tmp_path / ".lock", "a+") as handle:
        assert locks.try_lock(handle) is None
    ran = []
    with locks.building(tmp_path / "sub" / ".build.lock"):
        ran.append(True)
    assert ran == [True]
