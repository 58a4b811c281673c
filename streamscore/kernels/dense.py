"""A small dense network's ONNX graph as a program for the compiled kernel (_dense.c).

onnxruntime pays about 10 us of fixed cost per run, three to four times that when the
server's other work has evicted it from the caches between requests, to compute a
thousand multiply-adds; the compiled kernel does the same arithmetic in one call of a
microsecond or two. ``translate`` accepts only what it can compute as the graph says:
float32 tensors of shape (batch, width), elementwise ops, Gemm/MatMul against
constant weights. Anything else (an op it does not know, an attribute it does not
understand, broadcasting it does not do) raises ``Unsupported`` naming it, and the
model stays with onnxruntime. Sums are accumulated in a different order than
onnxruntime's, so scores differ in the last bits: the backend checks the program
against onnxruntime on sample rows before it uses it (``matches``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DenseModel", "Unsupported", "compile_onnx", "kernel_available", "translate"]

# Step codes, as in _dense.c.
SIGN, ABS, LOG, EXP, RELU, SIGMOID, NEG, TANH, SQRT, ADD, SUB, MUL, DIV, GEMM = range(14)
UNARY = {
    "Sign": SIGN,
    "Abs": ABS,
    "Log": LOG,
    "Exp": EXP,
    "Relu": RELU,
    "Sigmoid": SIGMOID,
    "Neg": NEG,
    "Tanh": TANH,
    "Sqrt": SQRT,
}
# A step's bias when it has none (0 names the input register, never a bias).
NO_BIAS = 0
BINARY = {"Add": ADD, "Sub": SUB, "Mul": MUL, "Div": DIV}
# Ops that change a row's shape, not its values: free while the row keeps its width.
RESHAPES = {"Identity", "Flatten", "Squeeze", "Reshape", "Unsqueeze"}
# The attributes each op may carry with the values this translation supports.
ALLOWED_ATTRIBUTES: dict[str, set[str]] = {
    "Gemm": {"alpha", "beta", "transA", "transB"},
    "Flatten": {"axis"},
    "Squeeze": {"axes"},
    "Unsqueeze": {"axes"},
    "Reshape": {"allowzero"},
    "Constant": {"value"},
}

Program: type[_dense.Program] | None
try:
    from streamscore.kernels import _dense

    Program = _dense.Program
except ImportError:  # pragma: no cover - exercised where no compiler was found
    Program = None


def kernel_available() -> bool:
    """Whether the compiled kernel was built (``pip install`` with a C compiler)."""
    return Program is not None


class Unsupported(ValueError):
    """The graph has something the kernel does not compute; the reason names it."""


@dataclass
class Translation:
    """A program's parts, as ``_dense.Program`` takes them."""

    steps: list[tuple[int, int, int, int, int, int, int]] = field(default_factory=list)
    constants: list[tuple[int, int]] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    output: int = -1

    def register(self, width: int) -> int:
        self.widths.append(width)
        return len(self.widths) - 1

    def constant(self, values: np.ndarray) -> int:
        """The operand naming a new constant (negative, as the kernel reads it)."""
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        offset = sum(v.size for v in self.values)
        self.constants.append((offset, flat.size))
        self.values.append(flat)
        return -len(self.constants)

    def program(self) -> Any:
        if Program is None:
            raise Unsupported("the compiled dense kernel is not built here")
        values = np.concatenate(self.values) if self.values else np.zeros(0, np.float32)
        return Program(self.steps, self.constants, values.tobytes(), self.widths, self.output)


# A value of the graph: a register (one row of ``width`` floats) or a constant array.
@dataclass(frozen=True)
class _Register:
    index: int
    width: int


def translate(model: Any, input_name: str, output_name: str, n_inputs: int) -> Translation:
    """The program computing ``output_name`` from ``input_name`` (float32, shape
    (batch, n_inputs)) as ``model`` (an ``onnx.ModelProto``) does; Unsupported if the
    graph has anything the kernel cannot compute exactly as written."""
    from onnx import helper, numpy_helper

    graph = model.graph
    program = Translation()
    values: dict[str, _Register | np.ndarray] = {}
    # Constants of any type are read (a reshape's target shape is int64); arithmetic
    # takes only float32 ones (``_float_constant``).
    for initializer in graph.initializer:
        values[initializer.name] = numpy_helper.to_array(initializer)
    inputs = [i for i in graph.input if i.name not in values]
    if [i.name for i in inputs] != [input_name]:
        raise Unsupported(f"graph inputs {[i.name for i in inputs]}, expected [{input_name!r}]")
    values[input_name] = _Register(program.register(n_inputs), n_inputs)
    # Every register is a (batch, width) matrix, except values reshaped from a
    # one-wide column (a score squeezed to (batch,), say): their shape is no longer
    # known here, so only more reshapes may read them, up to the output.
    tail: set[str] = set()

    for node in graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"op {node.domain}.{op}")
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        unknown = set(attributes) - ALLOWED_ATTRIBUTES.get(op, set())
        if unknown:
            raise Unsupported(f"{op} with attributes {sorted(unknown)}")
        if len(node.output) != 1:
            raise Unsupported(f"{op} with {len(node.output)} outputs")
        if op == "Constant":
            if "value" not in attributes:
                raise Unsupported("Constant without a tensor value")
            values[node.output[0]] = numpy_helper.to_array(attributes["value"])
            continue
        if op not in RESHAPES and tail.intersection(node.input):
            raise Unsupported(f"{op} after a reshape of the score (only reshapes may follow)")
        operands = [_value(values, name, op) for name in node.input if name]
        if op in RESHAPES:
            values[node.output[0]], keeps_rows = _reshape(op, operands, attributes)
            if not keeps_rows or node.input[0] in tail:
                tail.add(node.output[0])
        else:
            values[node.output[0]] = _node(program, op, operands, attributes)

    result = values.get(output_name)
    if not isinstance(result, _Register) or result.width != 1:
        raise Unsupported(f"output {output_name!r} is not one computed score per row")
    program.output = result.index
    return program


def _value(values: dict[str, _Register | np.ndarray], name: str, op: str) -> Any:
    if name not in values:
        raise Unsupported(f"{op} reads {name!r}, which no earlier node computes")
    return values[name]


def _node(
    program: Translation, op: str, operands: list[Any], attributes: dict[str, Any]
) -> _Register:
    if op in UNARY:
        (x,) = _registers(op, operands[:1])
        if len(operands) != 1:
            raise Unsupported(f"{op} with {len(operands)} inputs")
        out = _Register(program.register(x.width), x.width)
        program.steps.append((UNARY[op], out.index, x.index, 0, x.width, 0, NO_BIAS))
        return out
    if op in BINARY:
        return _binary(program, op, operands)
    if op == "Gemm":
        return _gemm(program, operands, attributes)
    if op == "MatMul":
        if len(operands) != 2:
            raise Unsupported("MatMul without two inputs")
        return _gemm(program, operands, {})
    raise Unsupported(f"op {op}")


def _registers(op: str, operands: list[Any]) -> list[_Register]:
    if not all(isinstance(x, _Register) for x in operands):
        raise Unsupported(f"{op} of constants only (fold it before export)")
    return operands


def _reshape(op: str, operands: list[Any], attributes: dict[str, Any]) -> tuple[_Register, bool]:
    """The value a reshape gives, and whether it is still a (batch, width) matrix:
    Identity, and Flatten at axis 1 of a matrix, change nothing; any other reshape is
    taken only of a one-wide column, whose values stay one per row in row order."""
    (x,) = _registers(op, operands[:1])
    if op == "Identity" or (op == "Flatten" and attributes.get("axis", 1) == 1):
        return x, True
    if x.width == 1:
        return x, False
    raise Unsupported(f"{op} of a row {x.width} wide")


def _row_constant(op: str, array: np.ndarray, width: int) -> np.ndarray:
    """A float32 constant that broadcasts over (batch, width) rows without changing
    their shape: one value, or one per column; as shapes (), (1,), (width,), (1, 1)
    or (1, width)."""
    _float_constant(op, array)
    shape = array.shape[1:] if array.ndim == 2 and array.shape[0] == 1 else array.shape
    if array.ndim <= 2 and shape in ((), (1,), (width,)):
        return array.reshape(-1)
    raise Unsupported(f"{op} with a constant of shape {array.shape} against rows {width} wide")


def _float_constant(op: str, array: np.ndarray) -> None:
    if array.dtype != np.float32:
        raise Unsupported(f"{op} with a {array.dtype} constant (float32 only)")


def _binary(program: Translation, op: str, operands: list[Any]) -> _Register:
    if len(operands) != 2:
        raise Unsupported(f"{op} with {len(operands)} inputs")
    rows = [x for x in operands if isinstance(x, _Register)]
    if not rows:
        raise Unsupported(f"{op} of constants only (fold it before export)")
    width = rows[0].width
    if any(x.width != width for x in rows):
        raise Unsupported(f"{op} of rows {[x.width for x in rows]} wide (no broadcasting)")
    ids = [
        x.index if isinstance(x, _Register) else program.constant(_row_constant(op, x, width))
        for x in operands
    ]
    out = _Register(program.register(width), width)
    program.steps.append((BINARY[op], out.index, ids[0], ids[1], width, 0, NO_BIAS))
    return out


def _gemm(program: Translation, operands: list[Any], attributes: dict[str, Any]) -> _Register:
    if len(operands) not in (2, 3):
        raise Unsupported(f"Gemm with {len(operands)} inputs")
    if attributes.get("transA", 0) != 0:
        raise Unsupported("Gemm with transA")
    (x,) = _registers("Gemm", operands[:1])
    weights = operands[1]
    if not isinstance(weights, np.ndarray) or weights.ndim != 2:
        raise Unsupported("Gemm or MatMul whose weights are not a constant matrix")
    _float_constant("Gemm", weights)
    if attributes.get("transB", 0):
        weights = weights.T
    if weights.shape[0] != x.width:
        raise Unsupported(f"Gemm of a row {x.width} wide with weights {weights.shape}")
    alpha, beta = attributes.get("alpha", 1.0), attributes.get("beta", 1.0)
    if alpha != 1.0:
        weights = weights * np.float32(alpha)
    width = int(weights.shape[1])
    bias = NO_BIAS
    if len(operands) == 3:
        if not isinstance(operands[2], np.ndarray):
            raise Unsupported("Gemm whose bias is not a constant")
        c = _row_constant("Gemm", operands[2], width)
        bias = program.constant(c * np.float32(beta) if beta != 1.0 else c)
    w_id = program.constant(weights)
    out = _Register(program.register(width), width)
    program.steps.append((GEMM, out.index, x.index, w_id, width, x.width, bias))
    return out


class DenseModel:
    """A compiled program, called like onnxruntime's run for one input and output."""

    def __init__(self, program: Any) -> None:
        self._run = program.run
        # The score of one row (a sequence of numbers: no array needed), as a float.
        self.score_row: Callable[[Iterable[float]], float] = program.score_row

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Scores, shape (n,), for a C-contiguous float32 (n, inputs) batch."""
        scores = np.empty(batch.shape[0], dtype=np.float32)
        self._run(batch, scores)
        return scores


def compile_onnx(path: Path, input_name: str, output_name: str, n_inputs: int) -> DenseModel:
    """The compiled kernel's model of the ONNX file at ``path``; Unsupported when the
    graph cannot be translated or the kernel is not built here."""
    import onnx

    translation = translate(onnx.load(str(path)), input_name, output_name, n_inputs)
    return DenseModel(translation.program())
