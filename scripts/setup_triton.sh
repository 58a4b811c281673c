#!/usr/bin/env bash
# Create .venv-triton: a separate virtual environment holding a real `tritonserver`
# (the binary that the PyPI package nvidia-pytriton ships, python backend included)
# plus numpy and onnxruntime for the python-backend models that streamscore writes.
#
# Separate because nvidia-pytriton pins numpy<2 and an older protobuf, which clash
# with the main .venv. streamscore.triton_server.EmbeddedTriton runs the server from
# here; the main venv only needs tritonclient. Safe to run again; quiet when done.
#
# Env: PYTHON (interpreter for the venv, default python3; 3.8-3.13, the versions
# nvidia-pytriton ships python-backend stubs for), TRITON_VENV (default .venv-triton),
# /tmp/pkgs (cached wheels) is searched when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TRITON_VENV:-.venv-triton}
PYTRITON_VERSION=0.7.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --quiet)
FIND_LINKS=()
[ -d /tmp/pkgs ] && FIND_LINKS=(--find-links /tmp/pkgs)

if ! "$VENV/bin/python" - <<EOF 2>/dev/null
import importlib.metadata as m, onnxruntime, numpy
assert m.version("nvidia-pytriton") == "$PYTRITON_VERSION"
EOF
then
  "${PIP[@]}" install --upgrade pip
  # numpy<2: nvidia-pytriton's pin; onnxruntime must then be a build that runs on numpy 1.x.
  "${PIP[@]}" install "${FIND_LINKS[@]}" "nvidia-pytriton==$PYTRITON_VERSION" "numpy>=1.24,<2" "onnxruntime>=1.18,<2"
fi

# The python backend runs its models in a stub process whose Python must match the
# interpreter on PATH; the wheel ships one stub per Python version and expects it
# copied next to libtriton_python.so (what PyTriton itself does in its workspace).
"$VENV/bin/python" - <<'EOF'
import shutil, sys
from pathlib import Path

import pytriton

root = Path(pytriton.__file__).parent / "tritonserver"
version = f"{sys.version_info[0]}.{sys.version_info[1]}"
src = root / "python_backend_stubs" / version / "triton_python_backend_stub"
dst = root / "backends" / "python" / "triton_python_backend_stub"
if not src.is_file():
    sys.exit(f"nvidia-pytriton ships no python-backend stub for Python {version}")
if not dst.is_file() or dst.read_bytes() != src.read_bytes():
    shutil.copy2(src, dst)
EOF
echo "tritonserver installed in $VENV"
