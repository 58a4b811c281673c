"""Where a load tool keeps its files (its servers' logs, copies of a repository, git
worktrees): removed when the tool ends, also when it is stopped (Ctrl-C, SIGTERM);
kept, and named, when the run failed, for its logs."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


def exit_on_sigterm() -> None:
    """SIGTERM as an exit (status 143), not a kill, so that what is removed at exit
    (a ``with`` block's end, ``tempfile``'s finalizers) is removed. Inside an event
    loop the exit cancels the running task, whose ``finally`` blocks run."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def work_directory(tool: str) -> Iterator[Path]:
    """A new directory for ``tool``'s run (see the module's docstring)."""
    exit_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix=f"streamscore-{tool}-"))
    try:
        yield root
    # Stopped by hand or by SIGTERM (inside a loop, the exit cancels the task).
    except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
        shutil.rmtree(root, ignore_errors=True)
        raise
    except BaseException:
        print(f"{tool} failed; its files and logs are in {root}", file=sys.stderr)
        raise
    shutil.rmtree(root, ignore_errors=True)
