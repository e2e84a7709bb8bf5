"""CPU accounting of processes from /proc/<pid>/stat (Linux): how much CPU time (user +
system, every thread of the process) each named process used between two readings.

Wall-clock throughput on a shared machine says little about cost; CPU time per request says
which process pays for a feature, whatever else the machine is doing meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")
# utime and stime are counted in clock ticks (usually 100 a second, so 10 ms resolution:
# measure for seconds, not milliseconds).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available() -> bool:
    """Whether this system has /proc (Linux); elsewhere CPU figures are reported as n/a."""
    return (PROC / "self" / "stat").exists()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far, all threads included (not its children:
    every process we measure is a child of ours and is measured on its own)."""
    stat = (PROC / str(pid) / "stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces or parentheses
    # itself: the fixed fields start after the last ")". There, index 0 is field 3 (state),
    # so utime (field 14) and stime (field 15) are at 11 and 12.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuWindow:
    """CPU seconds each named process used inside a `with` block:

        with CpuWindow({"quota": pid}) as cpu:
            ...
        cpu.used["quota"]

    Without /proc, `used` stays empty and callers print n/a."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids) if available() else {}
        self.used: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

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
