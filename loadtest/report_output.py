"""The standard report's output: a measured configuration at one rate, summarised
over rounds (``Summary``), its plots (PNG), and the section it writes into
BENCHMARKS.md between its markers (``write_section``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

BEGIN = "<!-- report:begin -->"
END = "<!-- report:end -->"
PLOTS = {
    "latency": "latency_vs_rate.png",
    "cdf": "latency_cdf.png",
    "cpu": "server_cpu.png",
}


@dataclass
class Summary:
    """One configuration at one offered rate, over the rounds."""

    config: str
    rpc: str
    rate: float
    rounds: int
    achieved: float
    p50: float
    p90: float
    p99: float
    p99_low: float
    p99_high: float
    p999: float
    max: float
    errors: int
    dropped: int
    cpu_us: float | None
    steal_pct: float | None  # the host's CPU steal, median over rounds
    histogram: HdrHistogram = field(repr=False)

    @property
    def clean(self) -> bool:
        return not self.errors and not self.dropped and self.achieved > 0


# -- plots -------------------------------------------------------------------------------


def plot(
    summaries: Sequence[Summary], directory: Path, budget_ms: float, cdf_rate: float
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    names = list(dict.fromkeys(s.config for s in summaries))
    by_name = {name: [s for s in summaries if s.config == name] for name in names}
    written: dict[str, Path] = {}

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    for axis, (label, attr) in zip(
        axes, (("p50", "p50"), ("p99", "p99"), ("p99.9", "p999")), strict=True
    ):
        for name in names:
            points = sorted(by_name[name], key=lambda s: s.rate)
            axis.plot(
                [s.rate for s in points], [getattr(s, attr) for s in points], marker="o", label=name
            )
        if label == "p99":
            axis.axhline(budget_ms, color="grey", linestyle="--", linewidth=1, label="budget")
        axis.set_title(f"{label} latency")
        axis.set_xlabel("offered rate (requests/s)")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (from intended send time)")
    handles, labels = axes[1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    written["latency"] = directory / PLOTS["latency"]
    figure.savefig(written["latency"], dpi=110)
    plt.close(figure)

    figure, (cdf, tail) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in names:
        chosen = [s for s in by_name[name] if s.rate == cdf_rate]
        if not chosen or chosen[0].histogram.get_total_count() == 0:
            continue
        histogram = chosen[0].histogram
        total = histogram.get_total_count()
        xs, ys = [], []
        for item in histogram.get_recorded_iterator():
            xs.append(item.value_iterated_to / 1000)
            ys.append(item.total_count_to_this_value / total)
        cdf.step(xs, ys, where="post", label=name)
        # Complementary CDF on a log scale: the tail the percentiles summarise.
        tail.step(xs, [max(1 - y, 0.5 / total) for y in ys], where="post", label=name)
    cdf.set_xscale("log")
    cdf.xaxis.set_major_formatter(ScalarFormatter())
    cdf.set_xlabel("latency ms")
    cdf.set_ylabel("fraction of requests <= x")
    cdf.set_title(f"CDF at {cdf_rate:.0f} requests/s offered")
    cdf.grid(True, which="both", alpha=0.3)
    tail.set_xscale("log")
    tail.xaxis.set_major_formatter(ScalarFormatter())
    tail.set_yscale("log")
    tail.set_xlabel("latency ms")
    tail.set_ylabel("fraction of requests > x")
    tail.set_title("tail (1 - CDF)")
    tail.axvline(budget_ms, color="grey", linestyle="--", linewidth=1)
    tail.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=8)
    figure.tight_layout()
    written["cdf"] = directory / PLOTS["cdf"]
    figure.savefig(written["cdf"], dpi=110)
    plt.close(figure)

    with_cpu = [n for n in names if any(s.cpu_us is not None for s in by_name[n])]
    if with_cpu:
        figure, axis = plt.subplots(figsize=(8, 4.8))
        for name in with_cpu:
            points = sorted(
                (s for s in by_name[name] if s.cpu_us is not None), key=lambda s: s.rate
            )
            axis.plot(
                [s.rate for s in points], [s.cpu_us or 0.0 for s in points], marker="o", label=name
            )
        axis.set_xlabel("offered rate (requests/s)")
        axis.set_ylabel("server CPU us per request")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        written["cpu"] = directory / PLOTS["cpu"]
        figure.savefig(written["cpu"], dpi=110)
        plt.close(figure)
    return written


# -- the markdown file -------------------------------------------------------------------


def write_section(path: Path, section: str) -> None:
    """Put ``section`` between the markers in ``path``; nothing else in it changes."""
    text = path.read_text() if path.exists() else ""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins == ends == 0:
        if not text or text.endswith("\n\n"):
            separator = ""
        else:
            separator = "\n" if text.endswith("\n") else "\n\n"
        updated = f"{text}{separator}{BEGIN}\n{section}{END}\n"
    elif begins == ends == 1 and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        updated = f"{head}{BEGIN}\n{section}{END}{tail}"
    else:
        raise SystemExit(f"{path}: expected one {BEGIN} before one {END}; not touching it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.report-tmp")
    temporary.write_text(updated)
    os.replace(temporary, path)
