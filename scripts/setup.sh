#!/usr/bin/env bash
# Create the virtual environment once per pyproject.toml version: torch 2.13.0 first (pip takes
# the local CPU build; any other torch request would pull a multi-GB CUDA build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UNISREC_X_VENV:-.venv}"
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
quiet_pip() {  # pip's notes about absent local index folders are noise here
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}
echo "setting up $VENV (first run only, about 2 minutes)" >&2
python3 -m venv "$VENV"
quiet_pip "torch==2.13.0"
quiet_pip -e ".[test,plot,serve,codes]"
rm -f "$VENV"/.installed-*
touch "$stamp"
