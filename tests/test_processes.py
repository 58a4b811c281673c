"""Child process lifecycle: ordered stop, SIGKILL escalation, no orphans."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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


async def test_children_start_while_a_grpc_channel_is_busy() -> None:
    """A child started while this process's gRPC channel is busy runs its command.

    With a ``preexec_fn`` (which makes Python fork() rather than vfork()), gRPC's fork
    handlers restarted its poller in the child, whose epoll descriptor ``close_fds``
    then closed: about one child in twenty died of SIGSEGV before exec. It stopped a
    restarted worker in CI."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    busy = True

    async def chatter(stub: health_pb2_grpc.HealthStub) -> None:
        while busy:
            await stub.Check(health_pb2.HealthCheckRequest())
            await asyncio.sleep(0.001)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            chatting = asyncio.create_task(chatter(health_pb2_grpc.HealthStub(channel)))
            codes = []
            for i in range(200):
                child = ChildProcess(f"true-{i}", ["true"])
                await child.start()
                await child.exited.wait()
                codes.append(child.returncode)
                await child.stop()
            busy = False
            await chatting
    finally:
        await server.stop(0)
    assert codes == [0] * 200, f"{sum(c != 0 for c in codes)} children failed: {set(codes)}"
