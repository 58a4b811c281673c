"""Child process lifecycle: ordered stop, SIGKILL escalation, no orphans."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

from streamscore.processes import ChildExited, ChildProcess


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead all the same.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    stubborn = ChildProcess(
        "stubborn",
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
        ],
    )
    await stubborn.start()
    await asyncio.sleep(0.5)  # let it install its SIGTERM handler
    started = time.monotonic()
    await stubborn.stop(timeout=1.0)
    assert time.monotonic() - started < 5
    assert stubborn.process is None
    await stubborn.stop()  # idempotent


async def test_unexpected_exit_is_reported() -> None:
    child = ChildProcess("short", [sys.executable, "-c", "raise SystemExit(3)"])
    await child.start()
    await child.exited.wait()
    with pytest.raises(ChildExited, match="code 3"):
        child.check_running()
    await child.stop()


@pytest.mark.integration
def test_children_die_with_a_killed_parent() -> None:
    """SIGKILL the parent: its broker and child processes must not live on."""
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from streamscore.processes import ChildProcess
        from streamscore.stream.broker import EmbeddedBroker

        async def main():
            broker = EmbeddedBroker()
            await broker.start()
            child = ChildProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
            await child.start()
            print(broker.pid, child.process.pid, flush=True)
            os.kill(os.getpid(), 9)

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == -9, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
