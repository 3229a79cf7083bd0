#!/usr/bin/env bash
# Set up with the test extras, then run the whole test suite: unit tests (both backends; wgpu on lavapipe where
# there is no GPU), the fresh-venv install test, the browser tests, and the notebooks under nbval in an
# environment built from binder/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,mkl   # (mkl: the numpy backend's products through MKL, tested beside numpy's own BLAS)
.venv/bin/python -m lab info --backend wgpu >/dev/null || echo "warning: no wgpu adapter; kernel tests will skip (LAB_REQUIRE_WGPU=1 makes that an error)" >&2
.venv/bin/python -m pytest -q tests "$@"
# the tutorials, under nbval, in an environment built from binder/ as repo2docker would build it
bash binder/check.sh
