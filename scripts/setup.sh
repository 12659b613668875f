#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 (megatron-core 0.17+ needs it) and install FORGE from this
# checkout with its test and plot extras. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

is_new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in python3.12 python3.13; do
        if command -v "$candidate" >/dev/null && is_new_enough "$candidate"; then echo "$candidate"; return; fi
    done
    if command -v pyenv >/dev/null; then
        for v in 3.12 3.13; do
            candidate=$(PYENV_VERSION=$v pyenv which "python$v" 2>/dev/null || true)
            if [ -n "$candidate" ] && is_new_enough "$candidate"; then echo "$candidate"; return; fi
        done
    fi
    if command -v python3 >/dev/null && is_new_enough python3; then echo python3; return; fi
    echo "FORGE needs Python >= 3.12 (megatron-core 0.19 requires it); install python3.12 (e.g. 'pyenv install 3.12') and rerun" >&2
    exit 1
}

if [ ! -x .venv/bin/python ]; then
    python=$(find_python)
    echo "creating .venv with $python ($("$python" --version))"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,plots]"
.venv/bin/python -c 'import forge_megatron, megatron.core, torch, triton; print("forge-megatron ready: torch", torch.__version__, "triton", triton.__version__, "megatron-core", megatron.core.__version__)'
