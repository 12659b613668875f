#!/usr/bin/env bash
# A scratch venv with another Triton (default 3.6, the GPU machine's) beside the project's, for
# compiling the kernels for sm_90a as that version does (scripts/compile_report.py, tests/test_compile.py).
# It holds only triton and numpy; torch, megatron-core and the rest come from the project's .venv
# (a .pth appended after the venv's own site-packages, so its triton is the one imported).
#   bash scripts/triton_venv.sh 3.6 /work/wt/venv-triton36
#   env -u TRITON_INTERPRET PYTHONPATH=$PWD /work/wt/venv-triton36/bin/python scripts/compile_report.py --table \
#       --out bench/results/compile_sm90_triton3.6.json
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.6}
venv=${2:-../venv-triton${version//./}}
project_site=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
python=$(.venv/bin/python -c 'import sys; print(sys.executable)')
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "triton==${version}.*" numpy
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
echo "$project_site" > "$site/zz_project_venv.pth"
"$venv/bin/python" -c 'import triton, torch; print("triton", triton.__version__, "torch", torch.__version__)'
