#!/usr/bin/env bash
# Set up (if needed) and run the main job. Extra arguments go to `unisrec-x experiment`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/unisrec-x experiment transfer --quick --jobs 2 "$@"
