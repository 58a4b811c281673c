"""Child processes that die with their parent, even when the parent is SIGKILLed.

Our children run in their own session (so a terminal's Ctrl-C reaches only the
parent, which stops them in order); the price is that they would outlive a parent
killed outright. On Linux, PR_SET_PDEATHSIG closes that gap.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for subprocesses: SIGTERM this child when its parent exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
