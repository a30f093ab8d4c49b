"""Start, await and stop a simulator, the gateway or a third-party peer (storescp) as a subprocess.

Tests and demos need the same few things from every peer process: start it, know when it serves (a line
in its output or a port that accepts), see its output when it does not, and stop it for sure. The process
runs in its own session, so stop() and kill() reach anything it spawned and nothing else.

May import: stdlib only.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

log = logging.getLogger(__name__)

_PORT_PROBE_INTERVAL = 0.05


class ProcessStartError(RuntimeError):
    """A managed process exited, or did not become ready, before its start timeout."""

    def __init__(self, message: str, *, argv: Sequence[str], returncode: int | None, output: str) -> None:
        super().__init__(f"{message}: {' '.join(argv)}\n--- output tail ---\n{output}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output = output


# Ports are a process-wide resource: the kernel may hand the same free port to two probes moments apart,
# before either server has bound it, so the ports handed out lately are remembered and skipped.
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=512)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now (and not handed out lately)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Return True when a TCP connection to `host:port` succeeds (and close it at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ManagedProcess:
    """One subprocess with readiness, captured output and a sure stop; a context manager.

    Args:
        argv: the command; never run through a shell.
        ready_line: the process is ready once a line of its stdout/stderr matches this regex
            (flush it: a block-buffered child never gets there).
        ready_port: the process is ready once this TCP port on `ready_host` accepts connections.
        timeout: seconds to wait for readiness in `start()`.
        env: variables added to (or overriding) this process's environment.
        cwd: working directory.
        tail_lines: how many lines of output to keep for `output()` and errors.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready_line: str | None = None,
        ready_port: int | None = None,
        ready_host: str = "127.0.0.1",
        timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        tail_lines: int = 200,
    ) -> None:
        self.argv = tuple(argv)
        self._ready_pattern = re.compile(ready_line) if ready_line is not None else None
        self._ready_port = ready_port
        self._ready_host = ready_host
        self._timeout = timeout
        self._env = {**os.environ, **(env or {})}
        self._cwd = cwd
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._tail_lock = threading.Lock()  # the reader thread appends while callers read
        self._line_matched = threading.Event()
        self._wakeup = threading.Event()  # set on a matching line and when output closes
        self._output_closed = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return self._process.poll() if self._process is not None else None

    @property
    def running(self) -> bool:
        """True between start() and the process's end."""
        return self._process is not None and self._process.poll() is None

    def output(self) -> str:
        """Return the last `tail_lines` lines of combined stdout and stderr."""
        with self._tail_lock:
            return "".join(self._tail)

    def start(self) -> Self:
        """Start the process and wait until it is ready; raise ProcessStartError (and stop it) if not."""
        if self._process is not None:
            raise RuntimeError(f"already started: {self.argv[0]}")
        # start_new_session: signals go to the child's own process group, never to ours.
        self._process = subprocess.Popen(  # noqa: S603 - argv is the caller's, never run through a shell
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read_output_blocking, name=f"harness-reader[{self.argv[0]}]", daemon=True
        )
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:  # not ready, or interrupted while waiting: never leave it running
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        process = self._process
        if process is None:
            raise RuntimeError("not started")
        deadline = time.monotonic() + self._timeout
        while True:
            line_ok = self._ready_pattern is None or self._line_matched.is_set()
            port_ok = self._ready_port is None or port_accepts(self._ready_host, self._ready_port)
            if line_ok and port_ok:
                return
            if process.poll() is not None:
                self._output_closed.wait(1.0)  # let the reader collect the last words for the error
                raise ProcessStartError(
                    "exited before it was ready",
                    argv=self.argv,
                    returncode=process.returncode,
                    output=self.output(),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessStartError(
                    f"not ready within {self._timeout:g} s",
                    argv=self.argv,
                    returncode=None,
                    output=self.output(),
                )
            # Wake at once on a ready line or closed output; a port can only be polled.
            if self._output_closed.is_set():
                # Nothing more to read: only the exit (or a port, or the deadline) can change things.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(min(remaining, _PORT_PROBE_INTERVAL))
            elif self._ready_port is None:
                self._wakeup.wait(remaining)
            else:
                self._output_closed.wait(min(remaining, _PORT_PROBE_INTERVAL))

    def _read_output_blocking(self) -> None:
        """Reader thread: keep draining the pipe (a full pipe would stall the child), keep the tail."""
        process = self._process
        if process is None or process.stdout is None:
            return
        with process.stdout:
            for line in process.stdout:
                with self._tail_lock:
                    self._tail.append(line)
                log.debug("%s: %s", self.argv[0], line.rstrip())
                if self._ready_pattern is not None and self._ready_pattern.search(line):
                    self._line_matched.set()
                    self._wakeup.set()
        self._output_closed.set()
        self._wakeup.set()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end by itself and return its exit status."""
        if self._process is None:
            raise RuntimeError("not started")
        returncode = self._process.wait(timeout)
        self._join_reader()
        return returncode

    def stop(self, grace: float = 5.0) -> int | None:
        """End the process: SIGTERM, then SIGKILL after `grace` seconds. Idempotent; returns the status."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.1f s; killing it", self.argv[0], grace)
                self._signal(signal.SIGKILL)
                self._process.wait()
        self._join_reader()
        return self._process.returncode

    def kill(self) -> int | None:
        """End the process at once with SIGKILL (a crash, as far as its peers can tell)."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._signal(signal.SIGKILL)
            self._process.wait()
        self._join_reader()
        return self._process.returncode

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is None:
            return
        # The group may already be gone: it can end between poll() and here.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5.0)

    def __enter__(self) -> Self:
        return self if self._process is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
