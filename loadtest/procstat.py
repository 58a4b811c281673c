"""CPU time from /proc (Linux): a process's, its descendants', and the machine's
time stolen by the hypervisor. What the load tools report beside latency."""

from __future__ import annotations

import os


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes and theirs (Linux /proc)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                for child in children.read().split():
                    found += [int(child), *descendants(int(child))]
        except FileNotFoundError:
            continue
    return found


def cpu_jiffies() -> tuple[int, int] | None:
    """The machine's (stolen, total) CPU time so far, from /proc/stat; None where
    there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of the machine's CPU time stolen between two ``cpu_jiffies()``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100 * (after[0] - before[0]) / (after[1] - before[1])


def format_steal(pct: float | None) -> str:
    return "" if pct is None else f"{pct:.1f} %"
