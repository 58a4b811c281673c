# Types of the compiled tiles (_windows.c); see tiles.py for their Python twin.
from typing import Any

from streamscore.kernels.tiles import WindowPlan

CACHE_MIN_BUCKETS: int

class Tiles:
    def __init__(self, resolution_ms: int, n_distinct: int = 0) -> None: ...
    @property
    def resolution_ms(self) -> int: ...
    @property
    def n_distinct(self) -> int: ...
    @property
    def buckets(self) -> dict[int, list[Any]]: ...
    def add(
        self, time_ms: int, amount: int, declined: bool, distinct_values: tuple[str, ...] = (), /
    ) -> bool: ...
    def expire(self, keep_from_ms: int, /) -> int: ...
    def aggregate(
        self, t_ms: int, window_ms: int, /
    ) -> tuple[int, int, int, int, int, tuple[int, ...]]: ...
    def __len__(self) -> int: ...

def windowed_values(
    values: dict[str, float],
    tiles: tuple[Any, ...],
    t_ms: int,
    plan: tuple[WindowPlan, ...],
    /,
) -> None: ...
