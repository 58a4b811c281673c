"""TorchScript in process: on CUDA or on one CPU thread (``device``; "auto": CUDA
when torch sees a GPU).

A cheap call runs inline on the event loop (tens of microseconds on the CPU; on CUDA
it includes the host/device copies and a synchronisation), a heavy one in a worker
thread (``offload.InlineOrThread``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamscore.config import TORCH_DEVICES
from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.backends.offload import InlineOrThread
from streamscore.server.model import check_batch, check_scores
from streamscore.tasks import in_daemon_thread


class TorchBackend:
    kind = "torch"

    def __init__(
        self, model_path: Path, n_inputs: int, max_batch_size: int, *, device: str = "auto"
    ) -> None:
        self.model_path = model_path
        self.n_inputs = n_inputs
        self.max_batch_size = max_batch_size
        if device not in TORCH_DEVICES:
            raise ValueError(f"torch device must be auto, cpu or cuda, not {device!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._module: Any = None
        self._calls = InlineOrThread(
            f"{model_path.parent.parent.name}:{model_path.parent.name}",
            thread_setup=self._one_thread,
        )

    def load(self) -> None:
        """Load the module (blocking: ``start`` runs it in a thread)."""
        if self._module is not None:
            return
        if not self.model_path.is_file():
            raise BackendUnavailable(f"no TorchScript model at {self.model_path}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch_device is cuda, but torch sees no CUDA GPU")
        self._one_thread()
        with warnings.catch_warnings():
            # Deprecated in torch 2.13, still the fastest in-process torch path.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(self.model_path), map_location=self.device)
        module.eval()
        self._module = module

    async def start(self) -> None:
        # Off the event loop: loading takes tens of ms, and a hot reload happens while
        # the loop serves traffic. The thread setting is made here too: OpenMP keeps
        # it per calling thread, and cheap calls run on the loop's thread.
        self._one_thread()
        if self._module is None:
            await in_daemon_thread(self.load, name="model-load")

    def _one_thread(self) -> None:
        if self.device.type == "cpu":
            # The server owns the cores: the gRPC loop and the replica need the other.
            torch.set_num_threads(1)

    async def stop(self) -> None:
        self._module = None
        self._calls.close()

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        return await self._calls.call(self._call(batch))

    def infer_inline(self, batch: np.ndarray) -> np.ndarray | None:
        """Scores now while the model is cheap enough for the event loop, else None."""
        return self._calls.call_inline(self._call(batch))

    def _call(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """The checked call of this batch on the loaded module, to run here or there."""
        module = self._module
        if module is None:
            raise BackendUnavailable("torch backend is not started")
        batch = check_batch(batch, self.n_inputs, self.max_batch_size)
        return lambda: self._run(module, batch)

    def _run(self, module: Any, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(batch).to(self.device))
        return check_scores(out.cpu().numpy(), batch, f"TorchScript model {self.model_path}")
