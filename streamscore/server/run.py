"""One serving process's life (``streamscore serve``, and each ``serve --workers``
process): start, serve until a signal or a part it needs dies, drain, stop."""

from __future__ import annotations

import asyncio
import logging

from streamscore.config import Settings
from streamscore.processes import PartFailed, stop_on_signals
from streamscore.server.app import ScoringServer
from streamscore.server.gc_policy import LongLivedFreezer

log = logging.getLogger("streamscore.server")


async def run_server(settings: Settings) -> int:
    """Serve until SIGTERM or Ctrl-C (then drain: exit 0) or a part dies (then drain
    and raise ``PartFailed``). A start that fails raises."""
    # The process's policy, not the server's: it freezes everything the process
    # holds, the feature state above all (server/gc_policy.py). First, so that the
    # replica's catch-up is frozen as it folds.
    freezer = LongLivedFreezer(settings.gc_freeze_interval_s)
    server = ScoringServer(settings, gc_freezer=freezer)
    stop = stop_on_signals()
    await freezer.start()
    try:
        # A signal while starting stops it there: a `serve --workers` process
        # waits for its features to catch up before it listens (server/app.py),
        # which on a long log takes minutes.
        starting = asyncio.ensure_future(server.start())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            await server.stop()
            log.info("stopped while starting")
            return 0
        signalled.cancel()
        starting.result()  # a failed start raises here
        # A signal, or a part the server needs dying (its replica): drain either way.
        ended = [asyncio.ensure_future(e.wait()) for e in (stop, server.failed)]
        try:
            await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await server.stop()
            raise
        finally:
            for waiting in ended:
                waiting.cancel()
        await server.drain()
    finally:
        await freezer.stop()
    if server.failure:
        raise PartFailed(server.failure)
    return 0
