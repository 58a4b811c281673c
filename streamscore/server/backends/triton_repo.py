"""Write a model into a Triton model repository, served by Triton's python backend.

Layout, for model ``name`` version ``v`` (Triton's own)::

    <repository>/<name>/config.pbtxt
    <repository>/<name>/<v>/model.py      python-backend model (below)
    <repository>/<name>/<v>/model.onnx    the model itself

Contract of the ONNX model (the one our training export follows): input ``features``
float32 [batch, k], output ``score`` float32 [batch, 1].

Why the python backend and not Triton's onnxruntime backend: the Triton that
``nvidia-pytriton`` ships has only the python backend. ``model.py`` runs onnxruntime
with one intra-op thread on the batch Triton's dynamic batcher hands it: the
requests' inputs are concatenated, scored in one ``run``, and split back per request.

The config serves every version directory present (``version_policy: all``), so a
primary and a canary version of one model can be served side by side; clients name
the version they want.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from streamscore.server.model import write_atomic

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_QUEUE_DELAY_US",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "model_config",
    "write_triton_model",
]

INPUT_NAME = "features"
OUTPUT_NAME = "score"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 100

# The python-backend model. Runs inside Triton's stub process with .venv-triton's
# packages (numpy<2, onnxruntime); it must not import anything of ours.
MODEL_PY = '''\
"""Triton python-backend model written by streamscore: onnxruntime on model.onnx."""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "features"
OUTPUT_NAME = "score"


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(path):
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests):
        arrays = [
            pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            for request in requests
        ]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        try:
            scores = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
            scores = np.ascontiguousarray(scores, dtype=np.float32).reshape(len(batch), 1)
        except Exception as exc:
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for array in arrays:
            end = start + len(array)
            out = pb_utils.Tensor(OUTPUT_NAME, scores[start:end])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start = end
        return responses
'''


def model_config(
    name: str,
    n_inputs: int,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
) -> str:
    """The ``config.pbtxt`` text for a python-backend scoring model."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad Triton model name {name!r}")
    if n_inputs < 1:
        raise ValueError("n_inputs must be >= 1")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    if max_queue_delay_us < 0:
        raise ValueError("max_queue_delay_us must be >= 0")
    return f"""\
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
version_policy: {{ all {{ }} }}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {n_inputs} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ 1 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]
"""


def write_triton_model(
    repository: str | os.PathLike[str],
    name: str,
    version: int,
    onnx_model: str | os.PathLike[str] | bytes,
    n_inputs: int,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
) -> Path:
    """Write (or overwrite) one version of a model; returns its version directory.

    ``onnx_model`` is the ONNX file (path) or its bytes. ``config.pbtxt`` is rewritten
    each time; a model's versions must agree on ``n_inputs`` and batch settings. A
    running Triton in explicit model-control mode picks the version up on its next
    load of ``name`` (``EmbeddedTriton.load_model``).
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"Triton model versions are integers >= 1, not {version!r}")
    config = model_config(
        name, n_inputs, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us
    )
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    if isinstance(onnx_model, bytes):
        write_atomic(target, onnx_model)
    elif not target.exists() or not os.path.samefile(onnx_model, target):
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(onnx_model, tmp)
        os.replace(tmp, target)
    write_atomic(version_dir / "model.py", MODEL_PY.encode())
    write_atomic(model_dir / "config.pbtxt", config.encode())
    return version_dir
