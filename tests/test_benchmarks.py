"""The benchmarks' RecBole peer must leave nothing behind where it is run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recbole_peer_writes_no_logs_into_the_current_folder(real_root, tmp_path):
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from pathlib import Path\n"
              "from benchmarks.recbole_peer import RecBoleSASRec\n"
              f"RecBoleSASRec(Path({str(real_root)!r}))\n")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True)
    assert list(tmp_path.iterdir()) == []  # RecBole's Trainer alone would have made ./log_tensorboard/
