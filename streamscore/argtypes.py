"""argparse types shared by the CLI and the load tools: a value that could only make a
command do nothing (a step of 0 s, 0 workers) is a usage error, exit 2, naming it."""

from __future__ import annotations

import argparse


def positive(text: str) -> float:
    """A number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def at_least_one(text: str) -> int:
    """A whole number of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value
