"""CPU seconds and peak memory of a receiver's process tree, read from /proc (Linux only, no psutil).

CPU: `utime + stime` of the process, plus `cutime + cstime` (children it has already reaped), plus the
`utime + stime` of children it has not reaped yet (alive or zombie: a zombie's /proc/PID/stat still holds
its final times). Taken before and after a run, the difference covers a `storescp --fork` and all its
per-association children, each counted once. Resolution is one clock tick (10 ms here).

Peak RSS: the kernel's high-water mark `VmHWM` (/proc/PID/status), exact for a single process from its
start. For a forking server the peak is the largest `VmHWM` of the parent and of every child a sampler
thread saw (every 100 ms): a child that lives less than that can be missed, which only happens to
children too short to matter. A zombie has no `VmHWM`; its last sampled value is kept.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces), or None if gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (any of its threads), alive or zombie."""
    found: list[int] = []
    task_dir = _PROC / str(pid) / "task"
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid`, its reaped children and its unreaped children (see above)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for child in children(pid):
        child_fields = _stat_fields(child)
        if child_fields is not None:
            ticks += sum(int(child_fields[i]) for i in (11, 12, 13, 14))
    return ticks / _TICK


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of one process in bytes (0 if it is gone or a zombie)."""
    try:
        status = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_children_exited(pid: int, timeout: float = 10.0) -> None:
    """Wait until every child of `pid` has exited (zombie or reaped), so its CPU time is final."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [f[0] for c in children(pid) if (f := _stat_fields(c)) is not None]
        if all(state in {"Z", "X"} for state in states):
            return
        time.sleep(0.05)


@dataclass
class Usage:
    """What a receiver used during one run."""

    cpu_seconds: float
    peak_rss_bytes: int


class TreeMonitor:
    """Measure a process and its children over a `with` block: CPU seconds used and peak RSS.

    `sample_children=False` (single-process receivers) skips the sampler thread: VmHWM is exact there,
    and a thread polling /proc would only take CPU from the receiver on a 2-core machine.
    """

    def __init__(self, pid: int, *, sample_children: bool, interval: float = 0.1) -> None:
        self.pid = pid
        self._sample_children = sample_children
        self._interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_before = 0.0
        self.usage: Usage | None = None

    def __enter__(self) -> Self:
        self._cpu_before = cpu_seconds(self.pid)
        if self._sample_children:
            self._thread = threading.Thread(target=self._sample, name="bench-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            for child in children(self.pid):
                self._peak = max(self._peak, peak_rss_bytes(child))

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            wait_children_exited(self.pid)
        peak = max(self._peak, peak_rss_bytes(self.pid))
        self.usage = Usage(cpu_seconds(self.pid) - self._cpu_before, peak)
