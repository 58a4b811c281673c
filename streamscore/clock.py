"""The wall clock, in the unit every event and request uses: Unix epoch milliseconds."""

from __future__ import annotations

import time


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
