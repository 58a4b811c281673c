#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with streamscore and its
# test tools installed from this repository's own files. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned (torch==2.13.0) in pyproject.toml. PyPI's torch for Linux is the
# CUDA build (several GB more); PyTorch's own CPU index has 2.13.0+cpu, which the pin
# takes (a local version sorts after the plain one). Used when that index can be
# reached and no index was chosen; a machine with its own wheels (pip's find-links)
# or an offline mirror is left as it is.
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ -z "${PIP_EXTRA_INDEX_URL:-}" ] && .venv/bin/python -c "
import sys, urllib.request
try:
    urllib.request.urlopen('$TORCH_CPU_INDEX/torch/', timeout=5)
except Exception:
    sys.exit(1)
" 2>/dev/null; then
  export PIP_EXTRA_INDEX_URL=$TORCH_CPU_INDEX
fi
.venv/bin/python -m pip install --quiet -e '.[dev]'
# A real tritonserver (nvidia-pytriton) in its own venv, for the Triton backend and
# its tests; it pins numpy<2 and an older protobuf, so it cannot share .venv.
./scripts/setup_triton.sh
# A real Prometheus server (Debian's package) for the metrics integration test; when
# it cannot be installed (not root, no apt) that test skips and says why.
./scripts/setup_prometheus.sh
echo "streamscore installed in .venv (tritonserver in .venv-triton)"
