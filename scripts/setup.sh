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
# torch is pinned (torch==2.13.0, CPU build) in pyproject.toml; an unpinned torch
# would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet -e '.[dev]'
# A real tritonserver (nvidia-pytriton) in its own venv, for the Triton backend and
# its tests; it pins numpy<2 and an older protobuf, so it cannot share .venv.
./scripts/setup_triton.sh
# A real Prometheus server (Debian's package) for the metrics integration test; when
# it cannot be installed (not root, no apt) that test skips and says why.
./scripts/setup_prometheus.sh
echo "streamscore installed in .venv (tritonserver in .venv-triton)"
