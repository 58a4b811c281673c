"""One model call in process, per batch size: onnxruntime against the dense kernel.

The same version, loaded twice by the ONNX backend (``kernel="onnxruntime"`` and
``kernel="auto"``), called alternately on the same rows (random magnitudes, as the
backend's load-time check uses) for each batch size; the best of ``--repeat`` timings
of ``--calls`` calls each, so one preemption on a shared box does not count. Two
figures per kernel: the bare call (onnxruntime's session run without its wrapper, the
kernel's program) and ``backend.run``, which adds the batch and score checks every
Score pays. The kernel is only used up to ``DENSE_MAX_ROWS`` rows by the backend; the
bare figure goes beyond it, to show where onnxruntime overtakes it. A last line times
one row given as Score gives it to an idle batcher (a tuple of floats): scored as it is
against made into an array first.

    python -m loadtest.model_call_cost --model-repository DIR [--sizes 1,8,32,64,256]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from streamscore.server.backends.onnx_backend import OnnxBackend, check_rows
from streamscore.server.model import INPUT_NAME, ModelMetadata, latest_version

MODEL = "fraud_mlp"


def best_us(call: Callable[[], object], calls: int, repeat: int) -> float:
    """The best of ``repeat`` timings of ``calls`` calls, in us per call."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def measure(version_dir: Path, sizes: list[int], calls: int, repeat: int) -> list[dict[str, float]]:
    metadata = ModelMetadata.load(version_dir / "metadata.json")
    k = len(metadata.inputs)
    onnx = version_dir / "model.onnx"
    largest = max(sizes)
    reference = OnnxBackend(onnx, k, largest, kernel="onnxruntime")
    kernel = OnnxBackend(onnx, k, largest, sample_rows=metadata.warmup_rows())
    reference.load()
    kernel.load()
    if kernel.dense is None:
        raise SystemExit(f"the dense kernel does not serve {onnx} here (see the log)")
    dense = kernel.dense
    session_run = reference._run  # the bare session run, as the backend calls it
    rows = check_rows(k, metadata.warmup_rows(), n=largest)
    results = []
    for n in sizes:
        batch = np.ascontiguousarray(rows[:n])
        feed = {INPUT_NAME: batch}
        outputs = [metadata.output]
        # Alternating, so both see the same moments of the box.
        row: dict[str, float] = {"rows": n}
        for name, call in (
            ("onnxruntime_bare", partial(session_run, outputs, feed, None)),
            ("dense_bare", partial(dense, batch)),
            ("onnxruntime_run", partial(reference.run, batch)),
            ("dense_run", partial(kernel.run, batch)),
        ):
            row[name] = best_us(call, calls, repeat)
        results.append(row)
    return results


def one_row(version_dir: Path, calls: int, repeat: int) -> str:
    """A call alone as Score's idle batcher makes it: the row as Score assembles it (a
    tuple of floats) scored as it is (``score_row_inline``), against the way before
    it, a (1, k) float32 array made from the tuple and ``infer_inline``."""
    metadata = ModelMetadata.load(version_dir / "metadata.json")
    k = len(metadata.inputs)
    backend = OnnxBackend(version_dir / "model.onnx", k, 1, sample_rows=metadata.warmup_rows())
    backend.load()
    backend._calls.cost_s = 0.0  # measured cheap: inline, as the server's warm-up finds it
    row = tuple(check_rows(k, metadata.warmup_rows(), n=1)[-1].tolist())

    def by_array() -> object:
        return backend.infer_inline(np.array(row, np.float32, ndmin=2))

    as_row = best_us(partial(backend.score_row_inline, row), calls, repeat)
    as_array = best_us(by_array, calls, repeat)
    return (
        f"one row (a tuple of floats), inline: score_row_inline {as_row:.1f} us, "
        f"np.array + infer_inline {as_array:.1f} us"
    )


def table(results: list[dict[str, float]]) -> str:
    lines = [
        "| rows | onnxruntime run | dense kernel | ratio | backend.run, onnxruntime "
        "| backend.run, auto |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["onnxruntime_bare"] / r["dense_bare"]
        lines.append(
            f"| {int(r['rows'])} | {r['onnxruntime_bare']:.1f} us | {r['dense_bare']:.1f} us "
            f"| {ratio:.2f}x | {r['onnxruntime_run']:.1f} us | {r['dense_run']:.1f} us |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model-version", default="", help="default: the newest")
    parser.add_argument("--sizes", default="1,8,32,64,256", help="batch sizes (rows)")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure (best)")
    args = parser.parse_args()
    version_dir = (
        args.model_repository / MODEL / args.model_version
        if args.model_version
        else latest_version(args.model_repository, MODEL)
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    print(table(measure(version_dir, sizes, args.calls, args.repeat)))
    print(one_row(version_dir, args.calls, args.repeat))


if __name__ == "__main__":
    main()
