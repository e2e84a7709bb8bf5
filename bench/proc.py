"""CPU and memory accounting of processes from /proc (Linux): how much CPU time (user +
system, every thread) each named process used between two readings, and how much memory it
holds (RSS).

Wall-clock throughput on a shared machine says little about cost; CPU time per request says
which process pays for a feature, whatever else the machine is doing meanwhile.

A service may run as several processes (a parent and its workers): every figure here is of
the process *and its descendants*, so one pid names the whole service however it is split.
A descendant that exits inside a measuring window takes its CPU time with it (it is no longer
there to be read at the end): measure while the process tree is steady.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")
# utime and stime are counted in clock ticks (usually 100 a second, so 10 ms resolution:
# measure for seconds, not milliseconds).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MB = 1024 * 1024


def available() -> bool:
    """Whether this system has /proc (Linux); elsewhere CPU figures are reported as n/a."""
    return (PROC / "self" / "stat").exists()


def _stat_fields(pid: int) -> list[str]:
    stat = (PROC / str(pid) / "stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces or parentheses
    # itself: the fixed fields start after the last ")". There, index 0 is field 3 (state).
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` alone has used so far, all its threads included."""
    fields = _stat_fields(pid)
    # utime (field 14) and stime (field 15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children, grandchildren...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])  # field 4
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [pid], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its descendants; processes gone meanwhile count as nothing."""
    total = 0.0
    for each in descendants(pid):
        try:
            total += cpu_seconds(each)
        except (OSError, ValueError, IndexError):
            continue
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` alone (VmRSS), in bytes."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    return 0  # a zombie has no VmRSS line


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and its descendants, in bytes (pages shared between them counted once per
    process, as `ps` does: an upper bound for forked workers)."""
    total = 0
    for each in descendants(pid):
        try:
            total += rss_bytes(each)
        except (OSError, ValueError):
            continue
    return total


def rss_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """RSS in MB of each named process tree; n/a (left out) without /proc or once gone."""
    if not available():
        return {}
    snapshot: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            snapshot[name] = tree_rss_bytes(pid) / MB
        except OSError:
            continue
    return snapshot


class CpuWindow:
    """CPU seconds each named process tree used inside a `with` block:

        with CpuWindow({"quota": pid}) as cpu:
            ...
        cpu.used["quota"]

    The names in `alone` are measured without their descendants: this process, whose
    children are the mesh it drives. Without /proc, `used` stays empty and callers print n/a."""

    def __init__(self, pids: Mapping[str, int], alone: Iterable[str] = ()) -> None:
        self.pids = dict(pids) if available() else {}
        self.alone = frozenset(alone)
        self.used: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {
            name: cpu_seconds(pid) if name in self.alone else tree_cpu_seconds(pid)
            for name, pid in self.pids.items()
        }

    def __enter__(self) -> CpuWindow:
        self._start = self._read()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            end = self._read()
            self.used = {name: end[name] - self._start[name] for name in self.pids}
