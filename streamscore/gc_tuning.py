"""Garbage-collector settings for processes that hold large feature state.

Feature state is millions of small acyclic containers (bucket lists, sets, dicts).
With CPython's default thresholds (700, 10, 10) the collector re-traverses them over
and over while they are being built: measured here, folding ran about 2x slower
(``loadtest/feature_bench.py``). Fewer young collections keep cycle collection (asyncio
and gRPC do make cyclic garbage) but stop it from dominating the fold.
"""

from __future__ import annotations

import gc

LARGE_STATE_THRESHOLDS = (50_000, 20, 100)


def tune_for_large_state() -> None:
    gc.set_threshold(*LARGE_STATE_THRESHOLDS)
