"""Ingest: storescu (1 or 4 associations) into storescp, Orthanc and the gateway, side by side.

Each run starts a fresh receiver in an empty directory, flushes the page cache's dirty pages
(`os.sync()`, so one run's writeback does not land in the next), then times storescu from its start to
the exit of its last process. With 4 associations the file list is split into 4 contiguous runs, one
storescu process each. The receiver's CPU and peak RSS come from `bench.measure`; the count it stored is
checked after every run (a run that lost an object fails the benchmark). Receivers take turns within a
repetition, so a slow drift of the machine affects all of them alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import TYPE_CHECKING

from bench import peers
from bench.measure import TreeMonitor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from bench.data import FileSet

RECEIVERS = ("storescp", "orthanc", "gateway")


@contextlib.contextmanager
def start_receiver(kind: str, directory: Path, associations: int) -> Iterator[peers.Receiver]:
    """A fresh receiver of `kind`; storescp forks a child per association when there are several."""
    if kind == "storescp":
        with peers.storescp(directory, fork=associations > 1) as receiver:
            yield receiver
    elif kind == "orthanc":
        with peers.orthanc(directory) as receiver:
            yield receiver
    elif kind == "gateway":
        with peers.gateway(directory) as receiver:
            yield receiver
    else:
        raise ValueError(kind)


def ingest_once(kind: str, files: FileSet, associations: int, directory: Path) -> dict[str, float]:
    """One timed run; returns seconds, CPU seconds and peak RSS bytes. Raises if anything was lost."""
    try:
        with start_receiver(kind, directory / "receiver", associations) as receiver:
            os.sync()
            with TreeMonitor(receiver.pid, sample_children=receiver.forks) as monitor:
                seconds, _ = peers.storescu(
                    files.chunks(associations), receiver.port, receiver.ae_title, log_dir=directory / "logs"
                )
            stored = receiver.count()
        if stored != files.count:
            raise RuntimeError(f"{kind} stored {stored} of {files.count} {files.name} objects")
        usage = monitor.usage
        assert usage is not None  # noqa: S101 - set when the with block ends
        return {"seconds": seconds, "cpu_seconds": usage.cpu_seconds, "peak_rss_bytes": usage.peak_rss_bytes}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.sync()


def run_ingest(
    sets: dict[str, FileSet],
    workdir: Path,
    *,
    repetitions: int,
    log: Callable[[str], None],
) -> list[dict[str, object]]:
    """Every (data set, associations, receiver) case, `repetitions` times each; one record per case."""
    cases = [("ct", 1), ("ct", 4), ("small", 1), ("small", 4), ("us", 4)]
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for rep in range(repetitions):
        for name, associations in cases:
            for kind in RECEIVERS:
                files = sets[name]
                result = ingest_once(kind, files, associations, workdir / f"{kind}-{name}-{associations}")
                runs.setdefault((name, associations, kind), []).append(result)
                log(
                    f"ingest {name} x{associations} -> {kind} (run {rep + 1}/{repetitions}): "
                    f"{files.count / result['seconds']:.1f} inst/s, cpu {result['cpu_seconds']:.1f} s, "
                    f"peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB"
                )
    return [
        {
            "section": "ingest",
            "data": name,
            "associations": associations,
            "subject": kind,
            "instances": sets[name].count,
            "bytes": sets[name].total_bytes,
            "runs": results,
        }
        for (name, associations, kind), results in runs.items()
    ]
