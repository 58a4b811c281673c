"""Event-time admission: refuse events from the future or later than the allowed lateness.

"The newest event time seen so far" (DESIGN.md) is kept per ``payments`` partition,
like Kafka Streams' per-partition stream time: producers key events by card, so a
partition is one ordered stream, and the decision cannot depend on how the consumer
happens to interleave partitions. An event older than its partition's newest minus
``lateness_ms`` is too late; one more than ``skew_ms`` ahead of the wall clock is
from the future. Both go to the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Callable

from streamscore.clock import wall_clock_ms
from streamscore.stream.events import InvalidEvent, PaymentEvent
from streamscore.stream.state import DEFAULT_LATENESS_MS, DEFAULT_SKEW_MS


class EventTimeGate:
    def __init__(
        self,
        lateness_ms: int = DEFAULT_LATENESS_MS,
        skew_ms: int = DEFAULT_SKEW_MS,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.lateness_ms = lateness_ms
        self.skew_ms = skew_ms
        self.clock_ms = clock_ms
        self.newest_ms: dict[int, int] = {}

    def admit(self, event: PaymentEvent, partition: int = 0) -> None:
        """Raise ``InvalidEvent`` for a future or too-late event; else advance the watermark."""
        t = event.event_time_ms
        if t > self.clock_ms() + self.skew_ms:
            raise InvalidEvent("future", f"event_time_ms {t} is beyond the allowed clock skew")
        newest = self.newest_ms.get(partition)
        if newest is not None and t < newest - self.lateness_ms:
            raise InvalidEvent("too_late", f"event_time_ms {t} is older than the allowed lateness")
        if newest is None or t > newest:
            self.newest_ms[partition] = t
