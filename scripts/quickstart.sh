#!/usr/bin/env bash
# Set up, then train the quickstart model (the `tiny` preset) on the bundled corpus with a progress bar.
# Extra arguments go to `python -m lab train` (e.g. --steps 1000 --backend wgpu --out runs/tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m lab train --preset tiny --steps 600 "$@"
