"""A circuit breaker in front of a model backend.

When a backend dies (Triton killed, a GPU gone), every call to it fails, and each
failure costs its caller the time the failure takes (a refused connection, a timeout)
before the fallback answers. After ``failures_to_open`` consecutive failures the
breaker opens: calls skip the backend and go straight to the fallback. After a
cooldown one probe call is let through (half open); its success closes the breaker,
its failure opens it again for twice the cooldown (up to ``max_cooldown_s``). A probe
that neither succeeds nor fails (its caller was shed or cancelled) is released; a probe
never heard of again is replaced after a cooldown.

Each call let through carries its :class:`Pass` back with its outcome, so that only
the probe's failure reopens the breaker: the calls let through before it opened (a
hung backend holds many) fail after it did, and counted as failed probes they reopened
it one after another, doubling the cooldown each time (a 4 s stall of Triton: 7
openings, a 10 s cooldown at once).

Pure logic on an injectable clock; the scoring service records outcomes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["CircuitBreaker", "Pass"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Pass:
    """What :meth:`CircuitBreaker.allow` gives a call it lets through, to hand back
    with the call's outcome. ``probe``: the half-open breaker's one probe."""

    __slots__ = ("probe",)

    def __init__(self, *, probe: bool) -> None:
        self.probe = probe


_CLOSED_PASS = Pass(probe=False)  # every call of a closed breaker: nothing to tell apart


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures_to_open: int = 5,
        cooldown_s: float = 1.0,
        max_cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures_to_open < 1 or cooldown_s <= 0 or max_cooldown_s < cooldown_s:
            raise ValueError("need failures_to_open >= 1 and 0 < cooldown_s <= max_cooldown_s")
        self.failures_to_open = failures_to_open
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.clock = clock
        self.consecutive_failures = 0
        self.cooldown_s = cooldown_s
        self.opened_at: float | None = None
        self.probe_started: float | None = None
        self._probe: Pass | None = None
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if self.clock() - self.opened_at < self.cooldown_s:
            return OPEN
        return HALF_OPEN

    def allow(self) -> Pass | None:
        """May this call go to the backend? None: answer by the fallback. Else its
        :class:`Pass`, for :meth:`record_success`, :meth:`record_failure` or
        :meth:`release`."""
        if self.opened_at is None:
            return _CLOSED_PASS
        now = self.clock()
        if now - self.opened_at < self.cooldown_s:
            return None
        if self.probe_started is not None and now - self.probe_started < self.cooldown_s:
            return None  # a probe is out
        self.probe_started = now
        self._probe = Pass(probe=True)
        return self._probe

    def record_success(self, call: Pass) -> None:
        # Any call's success closes it, the probe's or not: the backend answers.
        self.consecutive_failures = 0
        self.opened_at = None
        self.probe_started = None
        self._probe = None
        self.cooldown_s = self.base_cooldown_s

    def record_failure(self, call: Pass) -> None:
        self.consecutive_failures += 1
        if self.opened_at is not None:
            if call is not self._probe:
                return  # let through before it opened (or a probe since replaced)
            # The probe failed: open again, for longer.
            self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
            self._open()
        elif self.consecutive_failures >= self.failures_to_open:
            self._open()

    def release(self, call: Pass) -> None:
        """The call ended without telling whether the backend works (shed, cancelled):
        if it was the probe, the next caller may probe."""
        if call is self._probe:
            self.probe_started = None
            self._probe = None

    def _open(self) -> None:
        self.opened_at = self.clock()
        self.probe_started = None
        self._probe = None
        self.times_opened += 1
