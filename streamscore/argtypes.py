"""argparse types shared by the CLI and the load tools: a value that could only make a
command do nothing (a step of 0 s, 0 workers) is a usage error, exit 2, naming it."""

from __future__ import annotations

import argparse
import math


def positive(text: str) -> float:
    """A finite number above 0 (``inf`` would make a step or a wait endless, ``nan``
    compares false with everything, so a budget of ``nan`` passed nothing)."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number more than 0, not {text}")
    return value


def positives(text: str) -> list[float]:
    """A comma-separated list of finite numbers above 0 (offered rates, say)."""
    values = [positive(item) for item in text.split(",") if item.strip()]
    if not values:
        raise argparse.ArgumentTypeError("must be one or more comma-separated numbers")
    return values


def at_least_one(text: str) -> int:
    """A whole number of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def at_least_ones(text: str) -> list[int]:
    """A comma-separated list of whole numbers of 1 or more."""
    values = [at_least_one(item) for item in text.split(",") if item.strip()]
    if not values:
        raise argparse.ArgumentTypeError("must be one or more comma-separated whole numbers")
    return values
