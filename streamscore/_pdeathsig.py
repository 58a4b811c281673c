"""Child processes that die with their parent, even when the parent is SIGKILLed.

Our children run in their own session (so a terminal's Ctrl-C reaches only the
parent, which stops them in order); the price is that they would outlive a parent
killed outright. On Linux, PR_SET_PDEATHSIG closes that gap.

The signal is set by a small launcher that then execs the real command, not by a
``preexec_fn``: a ``preexec_fn`` makes Python fork() instead of vfork(), which runs
gRPC's fork handlers in the child. When a gRPC channel is busy they restart gRPC's
poller there, and the ``close_fds`` before exec pulls its epoll descriptor away:
about one child in twenty died of SIGSEGV before exec (grpc/grpc#43055). Run as a
script with ``-S`` the launcher costs a few milliseconds per child.

    python -S _pdeathsig.py PARENT_PID COMMAND [ARG ...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def launcher(argv: list[str]) -> list[str]:
    """``argv`` run through the launcher: SIGTERM when this process exits."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-S", os.path.abspath(__file__), str(os.getpid()), *argv]


def _launch(parent_pid: int, argv: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The signal is inherited through exec, but a parent gone before prctl sent none.
    if os.getppid() != parent_pid:
        sys.exit(1)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _launch(int(sys.argv[1]), sys.argv[2:])
