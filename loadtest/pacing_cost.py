"""CPU of a ScoreStream message's pacing when it is read ahead (``_score_paced``).

A Score that never waits, started the way ScoreStream starts it (``start_eagerly``),
in process: directly, as a message read in turn is, and through the pacing wrapper,
as a message read ahead is (one more coroutine, the stretch's counters). Rounds
alternate; the figure is each side's median round, in microseconds a message.

    python -m loadtest.pacing_cost [--rounds 5] [--messages 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any

from streamscore.server.eager import start_eagerly
from streamscore.server.scoring import ScoringService, _ReadAhead


async def _score(
    request: object, time_remaining: object, parent: object, validated: bool, **_: object
) -> bytes:
    return b"answer"


async def measure(rounds: int, messages: int) -> tuple[float, float]:
    service: Any = SimpleNamespace(score=_score)
    context: Any = SimpleNamespace(time_remaining=lambda: None)
    request: Any = None  # (the stand-in Score reads none of it)
    direct_us, paced_us = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(messages):
            done = start_eagerly(_score(None, None, None, validated=True))
        direct_us.append((time.perf_counter() - started) / messages * 1e6)
        done.result()  # (a stand-in that no longer fits fails here, not in a log line)
        ahead = _ReadAhead()
        started = time.perf_counter()
        for _ in range(messages):
            done = start_eagerly(
                ScoringService._score_paced(
                    service, request, context, None, ahead, time.perf_counter()
                )
            )
        paced_us.append((time.perf_counter() - started) / messages * 1e6)
        done.result()
    return statistics.median(direct_us), statistics.median(paced_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    direct, paced = asyncio.run(measure(args.rounds, args.messages))
    print(
        f"a Score that never waits, started: directly {direct:.2f} us, through the pacing "
        f"{paced:.2f} us (+{paced - direct:.2f} us a message read ahead)"
    )


if __name__ == "__main__":
    main()
