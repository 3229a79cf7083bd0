#!/usr/bin/env bash
# Set up, train the quickstart model (the `tiny` preset) on the bundled corpus with a progress bar, then open
# JupyterLab on the tutorial notebooks (when run from a terminal; LAB_NO_JUPYTER=1 skips that step).
# Extra arguments go to `python -m lab train` (e.g. --steps 1000 --backend wgpu --out runs/tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh lab
.venv/bin/python -m lab train --preset tiny --steps 600 --out runs/quickstart "$@"
.venv/bin/python -m lab generate --checkpoint runs/quickstart --prompt "And God said" --max-new-tokens 200 --seed 1
# then a real pretrained model, shipped offline by setup.sh (SmolLM2-135M-Instruct), answering through its chat template
echo "SmolLM2-135M-Instruct, asked \"What is the capital of France?\":"
.venv/bin/python -m lab generate --model smollm2-135m-instruct --chat --prompt "What is the capital of France?" --greedy
if [ -t 0 ] && [ "${LAB_NO_JUPYTER:-0}" != 1 ]; then
    echo "Opening JupyterLab on the tutorials (Ctrl-C to stop)"
    exec .venv/bin/python -m jupyter lab --ip=127.0.0.1 --no-browser notebooks/01-quickstart.ipynb ${CI:+--allow-root}
else
    echo "To open the tutorials: .venv/bin/python -m jupyter lab notebooks/"
fi
