# Types of the compiled window kernel (_windows.c); see tiles.py for its Python twin.
from typing import Any

from streamscore.kernels.tiles import Tiles, WindowAgg, WindowPlan

def window_agg(
    result_type: type[WindowAgg],
    buckets: dict[int, list[Any]],
    first: int,
    last: int,
    n_distinct: int,
    /,
) -> WindowAgg: ...
def window_partial(
    buckets: dict[int, list[Any]], first: int, last: int, n_distinct: int, /
) -> tuple[int, int, int, int, int, list[set[str]]]: ...
def windowed_values(
    values: dict[str, float],
    tiles_by_resolution: dict[int, Tiles],
    t_ms: int,
    plan: tuple[WindowPlan, ...],
    cache_min_buckets: int,
    /,
) -> None: ...
