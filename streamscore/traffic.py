"""Deterministic synthetic payment traffic with labelled fraud patterns.

The demo, the load generator and the tests need payment events that look like a
card network's: a few busy cards and merchants and a long tail, mostly approved
small purchases, and fraud that leaves the footprints our features are built to see
(decline bursts, many merchants in a short time, many cards behind one device).
Everything is drawn from ``random.Random`` streams seeded from ``TrafficConfig.seed``,
so one seed always gives the same events, byte for byte: a log can be regenerated
instead of stored, and a failing test replays exactly.

This module only makes events (dicts in the ``payments`` topic schema, see
DESIGN.md "Events"); the caller sends them to Kafka or the server.

Fraud patterns (``LabelledEvent.pattern``; every event of a pattern has ``is_fraud``):

* ``card_testing``: 1-3 stolen cards, each making 8-30 attempts of 50-300 minor units
  at 1-2 low-ticket merchants, ~4 s apart, from one new device and IP in a foreign
  country; ~70% declined.
* ``spree``: one stolen card making 4-10 large purchases (4-15x its usual spend) at
  distinct, mostly high-ticket merchants, ~40 s apart, from a new device, IP and
  country; declines grow as the issuer catches on.
* ``device_farm``: 8-20 different cards, 1-2 modest purchases each, ~12 s apart,
  all behind one device (rotating 1-3 IPs) or one IP (fresh device per card); ~25%
  declined.

``fraud_fraction`` is the expected share of fraud events among all events; it is
split between the patterns by the ``*_share`` weights, and episodes start as Poisson
processes whose rate is that share divided by the pattern's mean episode size.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Fixed default origin (2023-11-14T22:13:20Z) so that logs are reproducible; live
# runners pass the wall clock as ``start_ms`` instead.
DEFAULT_START_MS = 1_700_000_000_000

PATTERNS = ("normal", "card_testing", "spree", "device_farm")

# (country, share of cards, billing currency)
_COUNTRIES = (
    ("DE", 0.24, "EUR"), ("FR", 0.16, "EUR"), ("NL", 0.10, "EUR"), ("ES", 0.10, "EUR"),
    ("IT", 0.10, "EUR"), ("GB", 0.12, "GBP"), ("US", 0.10, "USD"), ("PL", 0.05, "PLN"),
    ("SE", 0.03, "SEK"),
)  # fmt: skip
# Where stolen-card traffic comes from in this toy world (never the card's home).
_FRAUD_COUNTRIES = ("RU", "NG", "BR", "VN", "ID", "US", "GB", "RO")
# (mcc, typical ticket in minor units, share of merchants)
_MCCS = (
    ("5411", 4_000, 0.20),  # grocery
    ("5812", 3_500, 0.15),  # restaurants
    ("5814", 1_200, 0.12),  # fast food
    ("5541", 5_000, 0.08),  # fuel
    ("4121", 2_000, 0.06),  # taxis and rides
    ("5818", 900, 0.08),  # digital goods: where card testers go
    ("5651", 7_000, 0.10),  # clothing
    ("5732", 25_000, 0.07),  # electronics
    ("5944", 40_000, 0.03),  # jewellery
    ("4511", 30_000, 0.05),  # airlines
    ("7011", 20_000, 0.06),  # hotels
)
_LOW_TICKET_MCCS = frozenset({"5818", "5814", "4121"})
# Goods a fraudster can resell or use at once.
_HIGH_TICKET_MCCS = frozenset({"5732", "5944", "4511", "7011", "5651"})

# Episode sizes as (low, high) for randint; their means set the episode rates.
_CT_CARDS, _CT_ATTEMPTS = (1, 3), (8, 30)
_SPREE_TXNS = (4, 10)
_FARM_CARDS, _FARM_TXNS_PER_CARD = (8, 20), (1, 2)


def _mean(bounds: tuple[int, int]) -> float:
    return (bounds[0] + bounds[1]) / 2


# Episodes last minutes (longest: a 40-purchase farm, ~8 min on average); starting them
# this long before a stream's start puts the stream in its steady state from the start.
_EPISODE_WARMUP_MS = 20 * 60 * 1000

_MEAN_EPISODE_EVENTS = {
    "card_testing": _mean(_CT_CARDS) * _mean(_CT_ATTEMPTS),
    "spree": _mean(_SPREE_TXNS),
    "device_farm": _mean(_FARM_CARDS) * _mean(_FARM_TXNS_PER_CARD),
}


@dataclass
class TrafficConfig:
    rate_per_s: float = 200.0  # all events, fraud included
    n_cards: int = 5000
    n_merchants: int = 500
    fraud_fraction: float = 0.02  # expected share of fraud events
    seed: int = 7
    start_ms: int | None = None  # None: DEFAULT_START_MS (or the first window's start)
    # Relative weights splitting the fraud events between the patterns.
    card_testing_share: float = 0.4
    spree_share: float = 0.3
    device_farm_share: float = 0.3

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError("rate_per_s must be a positive number")
        if self.n_cards < 1 or self.n_merchants < 1:
            raise ValueError("n_cards and n_merchants must be at least 1")
        if not 0.0 <= self.fraud_fraction <= 1.0:
            raise ValueError("fraud_fraction must be within [0, 1]")
        shares = (self.card_testing_share, self.spree_share, self.device_farm_share)
        if min(shares) < 0 or (self.fraud_fraction > 0 and sum(shares) <= 0):
            raise ValueError("pattern shares must be >= 0 and not all 0")


@dataclass(frozen=True)
class LabelledEvent:
    event: dict[str, Any]
    is_fraud: bool
    pattern: str  # "normal" | "card_testing" | "spree" | "device_farm"


@dataclass(frozen=True)
class _Card:
    card_id: str
    country: str
    currency: str
    devices: tuple[str, ...]
    ips: tuple[str, ...]
    typical_minor: float  # median spend, log-normal over the population


@dataclass(frozen=True)
class _Merchant:
    merchant_id: str
    mcc: str
    ticket_minor: float


# An episode's events before ids and absolute times: (offset ms, pattern, fields).
_Draft = tuple[float, str, dict[str, Any]]


def _device(rng: random.Random) -> str:
    return f"dev-{rng.getrandbits(48):012x}"


def _fraud_ip(rng: random.Random) -> str:
    # Proxies and hosting ranges; a few ordinary cards use this range too (see below).
    return f"203.0.113.{rng.randint(1, 254)}"


def _cumulative(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


class TrafficGenerator:
    """Endless, seeded traffic; ``stream`` is pure, ``events_between`` walks one timeline."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        rng = random.Random(f"streamscore.traffic/{config.seed}/population")
        countries = [c for c, _, _ in _COUNTRIES]
        currency = {c: cur for c, _, cur in _COUNTRIES}
        country_cum = _cumulative([w for _, w, _ in _COUNTRIES])
        mcc_cum = _cumulative([w for _, _, w in _MCCS])
        self._cards: list[_Card] = []
        activity: list[float] = []
        for i in range(config.n_cards):
            country = rng.choices(countries, cum_weights=country_cum)[0]
            # 3% sit behind a carrier NAT in the 203.0.113 range, as fraud does: the IP
            # range alone must not give the label away.
            ip_of = _fraud_ip if rng.random() < 0.03 else self._home_ip
            self._cards.append(_Card(
                card_id=f"card-{i:06d}",
                country=country,
                currency=currency[country],
                devices=tuple(_device(rng) for _ in range(rng.randint(1, 2))),
                ips=tuple(ip_of(rng) for _ in range(rng.randint(1, 2))),
                typical_minor=rng.lognormvariate(math.log(3_500), 0.8),
            ))  # fmt: skip
            # Log-normal activity: a few heavy users, a long tail of quiet cards.
            activity.append(rng.lognormvariate(0.0, 0.7))
        self._card_cum = _cumulative(activity)
        self._merchants: list[_Merchant] = []
        for j in range(config.n_merchants):
            mcc, ticket, _ = rng.choices(_MCCS, cum_weights=mcc_cum)[0]
            ticket_minor = ticket * rng.lognormvariate(0.0, 0.3)
            self._merchants.append(_Merchant(f"m-{j:04d}", mcc, ticket_minor))
        # Zipf-like popularity (s = 1.1) over a random ranking of the merchants.
        ranks = list(range(1, config.n_merchants + 1))
        rng.shuffle(ranks)
        self._merchant_cum = _cumulative([r**-1.1 for r in ranks])
        self._low_ticket = self._indices(_LOW_TICKET_MCCS)
        self._high_ticket = self._indices(_HIGH_TICKET_MCCS)
        self._other_countries = {c: [o for o in countries if o != c] for c in countries}
        # events_between state: one live timeline and its first event past the window.
        self._live: Iterator[LabelledEvent] | None = None
        self._pending: LabelledEvent | None = None
        self._live_end: int | None = None

    @staticmethod
    def _home_ip(rng: random.Random) -> str:
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"

    def _indices(self, mccs: frozenset[str]) -> list[int]:
        found = [i for i, m in enumerate(self._merchants) if m.mcc in mccs]
        return found or list(range(len(self._merchants)))  # tiny populations: anything

    def _pick_card(self, rng: random.Random) -> _Card:
        return self._cards[bisect.bisect(self._card_cum, rng.random() * self._card_cum[-1])]

    def _pick_merchant(self, rng: random.Random) -> _Merchant:
        total = self._merchant_cum[-1]
        return self._merchants[bisect.bisect(self._merchant_cum, rng.random() * total)]

    def _foreign(self, rng: random.Random, card: _Card) -> str:
        return rng.choice([c for c in _FRAUD_COUNTRIES if c != card.country])

    @staticmethod
    def _fields(
        card: _Card,
        merchant: _Merchant,
        device: str,
        ip: str,
        amount: float,
        country: str,
        declined: bool,
    ) -> dict[str, Any]:
        return {
            "card_id": card.card_id, "merchant_id": merchant.merchant_id,
            "device_id": device, "ip": ip, "amount_minor": max(1, round(amount)),
            "currency": card.currency, "mcc": merchant.mcc, "country": country,
            "status": "declined" if declined else "approved",
        }  # fmt: skip

    # -- the four sources -------------------------------------------------------------

    def _normal(self, rng: random.Random) -> dict[str, Any]:
        card, merchant = self._pick_card(rng), self._pick_merchant(rng)
        # Amount: geometric mean of the card's spend level and the merchant's ticket,
        # with per-purchase noise.
        log_amount = 0.5 * (math.log(card.typical_minor) + math.log(merchant.ticket_minor))
        amount = math.exp(log_amount + rng.gauss(0.0, 0.6))
        # ~2% baseline declines (funds, expiry, typos), more for unusually large amounts.
        declined = rng.random() < (0.12 if amount > 4 * card.typical_minor else 0.02)
        # Travel: 3% of purchases happen abroad.
        country = card.country
        if rng.random() < 0.03:
            country = rng.choice(self._other_countries[card.country])
        device, ip = rng.choice(card.devices), rng.choice(card.ips)
        return self._fields(card, merchant, device, ip, amount, country, declined)

    def _card_testing(self, rng: random.Random) -> list[_Draft]:
        cards = rng.sample(self._cards, min(rng.randint(*_CT_CARDS), len(self._cards)))
        merchants = [self._merchants[i] for i in rng.choices(self._low_ticket, k=rng.randint(1, 2))]
        device, ip = _device(rng), _fraud_ip(rng)
        country = self._foreign(rng, cards[0])
        drafts: list[_Draft] = []
        t = 0.0
        for card in cards:  # a script works through its list of cards one by one
            for _ in range(rng.randint(*_CT_ATTEMPTS)):
                t += rng.expovariate(1 / 4_000)  # scripted: seconds apart
                fields = self._fields(
                    card,
                    rng.choice(merchants),
                    device,
                    ip,
                    rng.randint(50, 300),
                    country,
                    rng.random() < 0.7,
                )
                drafts.append((t, "card_testing", fields))
        return drafts

    def _spree(self, rng: random.Random) -> list[_Draft]:
        card = rng.choice(self._cards)
        n = rng.randint(*_SPREE_TXNS)
        pool = self._high_ticket if len(self._high_ticket) >= n else range(len(self._merchants))
        merchants = [self._merchants[i] for i in rng.sample(pool, min(n, len(pool)))]
        device, ip, country = _device(rng), _fraud_ip(rng), self._foreign(rng, card)
        drafts: list[_Draft] = []
        t = 0.0
        for k, merchant in enumerate(merchants):
            t += rng.expovariate(1 / 40_000)  # cash out before the card is blocked
            amount = max(card.typical_minor * rng.uniform(4, 15), merchant.ticket_minor)
            declined = rng.random() < min(0.5, 0.05 + 0.07 * k)  # the issuer catches up
            drafts.append(
                (t, "spree", self._fields(card, merchant, device, ip, amount, country, declined))
            )
        return drafts

    def _device_farm(self, rng: random.Random) -> list[_Draft]:
        n_cards = min(rng.randint(*_FARM_CARDS), len(self._cards))
        cards = rng.sample(self._cards, n_cards)
        # Either one emulator box rotating a few proxy IPs, or one proxy IP in front of
        # many fresh (reset) devices.
        shared_device = rng.random() < 0.6
        device = _device(rng)
        ips = [_fraud_ip(rng) for _ in range(rng.randint(1, 3) if shared_device else 1)]
        country = rng.choice(_FRAUD_COUNTRIES)
        drafts: list[_Draft] = []
        t = 0.0
        for card in cards:
            for _ in range(rng.randint(*_FARM_TXNS_PER_CARD)):
                t += rng.expovariate(1 / 12_000)
                amount = card.typical_minor * rng.lognormvariate(0.0, 0.5)  # stay unremarkable
                fields = self._fields(
                    card,
                    self._pick_merchant(rng),
                    device if shared_device else _device(rng),
                    rng.choice(ips),
                    amount,
                    country,
                    rng.random() < 0.25,
                )
                drafts.append((t, "device_farm", fields))
        return drafts

    # -- public API -------------------------------------------------------------------

    def rates_per_ms(self) -> dict[str, float]:
        """Arrival rate per ms of normal events and of each pattern's episodes."""
        c = self.config
        shares = {"card_testing": c.card_testing_share, "spree": c.spree_share,
                  "device_farm": c.device_farm_share}  # fmt: skip
        total_share = sum(shares.values()) or 1.0
        fraud_rate = c.rate_per_s * c.fraud_fraction / 1000
        rates = {"normal": c.rate_per_s * (1 - c.fraud_fraction) / 1000}
        for name, share in shares.items():
            rates[name] = fraud_rate * share / total_share / _MEAN_EPISODE_EVENTS[name]
        return rates

    def stream(self, start_ms: int | None = None) -> Iterator[LabelledEvent]:
        """Endless events from ``start_ms`` on, in non-decreasing event time.

        Each call starts the same timeline afresh (same seed, same events). Normal
        arrivals and episode starts are scheduled as ticks on one heap; an episode
        tick pushes all its events, which are only ever in the future of the tick,
        so popping the heap yields events in time order.
        """
        if start_ms is None:
            start_ms = self.config.start_ms
        if start_ms is None:
            start_ms = DEFAULT_START_MS
        seed = self.config.seed
        # One generator per source: changing fraud settings leaves normal traffic alone.
        rngs = {p: random.Random(f"streamscore.traffic/{seed}/{p}") for p in PATTERNS}
        episodes: dict[str, Callable[[random.Random], list[_Draft]]] = {
            "card_testing": self._card_testing, "spree": self._spree,
            "device_farm": self._device_farm,
        }  # fmt: skip
        rates = self.rates_per_ms()
        counter = itertools.count()
        seq = itertools.count()  # heap tie-breaker: equal times keep insertion order
        heap: list[tuple[float, int, str, dict[str, Any] | None]] = []
        for source, rate in rates.items():
            if rate > 0:
                # Episodes start before start_ms too, so that the traffic is in its steady
                # state (fraud share as configured) from the first millisecond; their
                # events before start_ms are dropped. Normal arrivals are memoryless.
                origin = start_ms if source == "normal" else start_ms - _EPISODE_WARMUP_MS
                first = origin + rngs[source].expovariate(rate)
                heapq.heappush(heap, (first, next(seq), source, None))

        def labelled(t: float, pattern: str, fields: dict[str, Any]) -> LabelledEvent:
            # Zero-padded counter: (event_time_ms, event_id) order equals stream order.
            head = {"event_id": f"evt-{seed}-{next(counter):010d}", "event_time_ms": int(t)}
            return LabelledEvent({**head, **fields}, pattern != "normal", pattern)

        while heap:
            t, _, source, fields = heapq.heappop(heap)
            if fields is not None:  # a scheduled fraud event
                yield labelled(t, source, fields)
                continue
            rng = rngs[source]
            heapq.heappush(heap, (t + rng.expovariate(rates[source]), next(seq), source, None))
            if source == "normal":
                yield labelled(t, "normal", self._normal(rng))  # t is the heap minimum
            else:
                for offset, pattern, draft in episodes[source](rng):
                    if t + offset >= start_ms:
                        heapq.heappush(heap, (t + offset, next(seq), pattern, draft))

    def events_between(self, start_ms: int, end_ms: int) -> list[LabelledEvent]:
        """Events with ``start_ms <= event_time_ms < end_ms`` of this generator's timeline.

        The timeline starts at ``config.start_ms``, or else at the first window's start,
        and is shared by successive calls, so a live loop can ask for consecutive
        windows (episodes that straddle a window boundary continue in the next one).
        Windows must not go back in time: what was handed out is gone.
        """
        if end_ms < start_ms:
            raise ValueError("end_ms must not be before start_ms")
        if self._live is None:
            origin = self.config.start_ms if self.config.start_ms is not None else start_ms
            self._live = self.stream(origin)
        elif self._live_end is not None and start_ms < self._live_end:
            raise ValueError(f"window starts at {start_ms}, before the last end {self._live_end}")
        self._live_end = end_ms
        out: list[LabelledEvent] = []
        while True:
            event = self._pending if self._pending is not None else next(self._live)
            self._pending = None
            time_ms = event.event["event_time_ms"]
            if time_ms >= end_ms:
                self._pending = event
                return out
            if time_ms >= start_ms:
                out.append(event)


def generate_log(config: TrafficConfig, duration_s: float) -> list[LabelledEvent]:
    """``duration_s`` seconds of traffic from ``config.start_ms`` (or DEFAULT_START_MS)."""
    start = config.start_ms if config.start_ms is not None else DEFAULT_START_MS
    return TrafficGenerator(config).events_between(start, start + round(duration_s * 1000))
