# Types of the compiled dense kernel (_dense.c); kernels/dense.py builds its programs.
from collections.abc import Iterable, Sequence

from typing_extensions import Buffer

class Program:
    def __init__(
        self,
        steps: Sequence[Sequence[int]],
        constants: Sequence[Sequence[int]],
        values: bytes,
        widths: Sequence[int],
        output: int,
    ) -> None: ...
    def run(self, batch: Buffer, scores: Buffer, /) -> None: ...
    def score_row(self, values: Iterable[float], /) -> float: ...
