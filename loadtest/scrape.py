"""Read a server's Prometheus /metrics from a load tool: one scrape as a table of
samples, sums over label sets, and a histogram quantile over the time between two
scrapes (what ``histogram_quantile(rate(...))`` would say for that window)."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted (label, value) pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def parse(text: str) -> Samples:
    """Prometheus text exposition format -> samples."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of ``name`` over every label set that has ``labels``; ``default`` if
    there is none (a labelled series appears on its first use), else KeyError."""
    wanted = set(labels.items())
    values = [v for (n, ls), v in samples.items() if n == name and wanted <= set(ls)]
    if not values:
        if default is not None:
            return default
        raise KeyError(f"{name}{labels or ''} is not in the scrape")
    return sum(values)


def histogram_quantile(
    before: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
    after: Samples,
    name: str,
    q: float,
) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of the observations made
    between two scrapes of histogram ``name`` (no labels besides ``le``); None if
    there were none. inf when it lies above the last finite bound."""
    buckets = sorted(
        (float(dict(ls)["le"]), value - before.get((n, ls), 0.0))
        for (n, ls), value in after.items()
        if n == name + "_bucket"
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= rank:
            return bound
    return float("inf")
