"""CPU time and memory of a process tree, read from ``/proc`` (Linux).

A Celery prefork worker is a main process and its pool children; what it costs is the whole tree.
CPU is ``utime + stime`` of every live process in the tree plus ``cutime + cstime`` (children that
exited and were reaped, such as a replaced pool child), in seconds. Memory is the sum of the
processes' resident set sizes (``VmRSS``): forked children share pages with their parent, so the
sum over-counts what the tree holds, but a difference between two readings (growth) is what the
benchmarks report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: Clock ticks per second, the unit of the times in ``/proc/<pid>/stat``.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the benchmarks use (times in clock ticks)."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line. The command name (field 2) is in parentheses and may
    itself hold spaces or parentheses, so the fields are counted from the last ``)``."""
    head, _, tail = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = tail.split()
    # tail starts at field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def parse_vmrss(status_text: str) -> int:
    """Bytes of ``VmRSS`` in a ``/proc/<pid>/status`` text (0 for a zombie, which has none)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", f"unexpected VmRSS unit {unit!r}"
            return int(value) * 1024
    return 0


def _all_stats(proc: Path) -> dict[int, ProcStat]:
    stats = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return stats


def tree(root: int, proc: Path = PROC) -> list[ProcStat]:
    """``root`` and all its descendants that are alive now (empty if ``root`` is gone)."""
    stats = _all_stats(proc)
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(stats[pid])
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root: int, proc: Path = PROC) -> float:
    """CPU seconds (user + system) the tree of ``root`` has used so far, reaped children included."""
    return sum(stat.ticks for stat in tree(root, proc)) / CLOCK_TICKS


def tree_rss_by_pid(root: int, proc: Path = PROC) -> dict[int, int]:
    """The resident set size of each process of ``root``'s tree (bytes, by pid)."""
    sizes = {}
    for stat in tree(root, proc):
        try:
            sizes[stat.pid] = parse_vmrss((proc / str(stat.pid) / "status").read_text())
        except OSError:
            continue
    return sizes


def tree_rss_bytes(root: int, proc: Path = PROC) -> int:
    """The sum of the resident set sizes of ``root``'s tree (see the module docstring)."""
    return sum(tree_rss_by_pid(root, proc).values())
