"""Serial device simulators on a pty pair: a Megatec/Voltronic "Q1" UPS and a key=value line device.

The reader under test opens `path` (the pty's slave end) as if it were `/dev/ttyUSB0`; the simulator
serves the master end from one thread that answers polls, sends periodic lines and runs a scripted
scenario (`run_script`). Knobs change what the device reports (`set_state`, `power_fail`, ...) or make it
silent (`silence`), as an unplugged cable would. The simulator keeps its own slave descriptor open, so
the pty lives on while the reader closes and reopens it.

May import: stdlib only (never gateway).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import select
import threading
import time
import tty
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

__all__ = ["KeyValueSimulator", "UpsSimulator", "UpsState", "parse_script"]

log = logging.getLogger(__name__)

_MAX_COMMAND = 256  # bytes of input kept without a CR: more is garbage
_JOIN_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class UpsState:
    """What the simulated UPS reports; defaults: a healthy standby UPS on 230 V / 50 Hz mains."""

    input_voltage: float = 230.0
    input_fault_voltage: float = 230.0
    output_voltage: float = 230.0
    load_percent: int = 21
    input_frequency_hz: float = 50.0
    battery_voltage: float = 2.27  # per cell
    temperature_celsius: float = 30.0
    utility_fail: bool = False
    battery_low: bool = False
    bypass_active: bool = False
    ups_failed: bool = False
    standby_type: bool = True
    test_in_progress: bool = False
    shutdown_active: bool = False
    beeper_on: bool = False

    def q1_line(self) -> bytes:
        """The answer to a ``Q1`` poll, CR included."""
        bits = (
            self.utility_fail,
            self.battery_low,
            self.bypass_active,
            self.ups_failed,
            self.standby_type,
            self.test_in_progress,
            self.shutdown_active,
            self.beeper_on,
        )
        return (
            f"({self.input_voltage:05.1f} {self.input_fault_voltage:05.1f} {self.output_voltage:05.1f} "
            f"{self.load_percent:03d} {self.input_frequency_hz:04.1f} {self.battery_voltage:04.2f} "
            f"{self.temperature_celsius:04.1f} {''.join('1' if bit else '0' for bit in bits)}\r"
        ).encode("ascii")


def parse_script(text: str) -> list[tuple[float, str]]:
    """Parse ``"10:power_fail,20:battery_low"`` into ``[(10.0, "power_fail"), (20.0, "battery_low")]``."""
    steps = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        at, separator, action = item.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not separator or not action.strip() or seconds < 0:
            raise ValueError(f"a script step is SECONDS:ACTION, not {item!r}")
        steps.append((seconds, action.strip()))
    return steps


class _PtyDevice:
    """A pty pair served by one thread; subclasses say what the device answers and sends."""

    actions: ClassVar[tuple[str, ...]] = ("silence", "resume")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards state that callers change while the thread serves
        self._silent = False
        self._polls = 0
        self._script: list[tuple[float, int, str]] = []  # (monotonic deadline, order, action): a heap
        self._order = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._fds: list[int] = []
        self._master = self._slave = self._wake_r = self._wake_w = -1
        self._path = ""

    @property
    def path(self) -> str:
        """The pty slave's device path, e.g. ``/dev/pts/7``: what the reader opens."""
        if not self._path:
            raise RuntimeError("serial simulator not started")
        return self._path

    @property
    def polls(self) -> int:
        """Polls so far (answered or not while silent); see the subclass for what counts as one."""
        with self._lock:
            return self._polls

    @property
    def silent(self) -> bool:
        """True between `silence()` and `resume()`."""
        return self._is_silent()

    def start(self) -> Self:
        """Open the pty pair and serve it; ready when this returns."""
        if self._thread is not None:
            raise RuntimeError("serial simulator already started")
        self._master, self._slave = os.openpty()
        self._wake_r, self._wake_w = os.pipe()
        self._fds = [self._master, self._slave, self._wake_r, self._wake_w]
        tty.setraw(self._slave)  # no CR/LF translation, no echo, until the reader sets its own mode
        os.set_blocking(self._master, False)  # nobody reading must never block the thread (or stop())
        self._path = os.ttyname(self._slave)
        self._thread = threading.Thread(
            target=self._serve_blocking, name=f"serialdev[{self._path}]", daemon=True
        )
        self._thread.start()
        log.info("%s on %s", type(self).__name__, self._path)
        return self

    def stop(self) -> None:
        """Stop serving and close the pty; idempotent."""
        if self._stopping.is_set():
            return
        with self._lock:
            self._stopping.set()
            if self._thread is not None:
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds = []

    def silence(self) -> None:
        """Stop answering and sending (the cable is pulled, as far as the reader can tell)."""
        with self._lock:
            self._silent = True
        log.info("%s: silent", self._path)

    def resume(self) -> None:
        """Answer and send again."""
        with self._lock:
            self._silent = False
        log.info("%s: answering again", self._path)

    def write(self, data: bytes) -> None:
        """Send raw bytes to the reader (garbage, odd lines), silent or not."""
        self._send(data)

    def run_script(self, steps: Iterable[tuple[float, str]]) -> None:
        """Run each ``(seconds from now, action)`` at its time; actions are names in `actions`."""
        steps = list(steps)
        unknown = sorted({action for _, action in steps} - set(self.actions))
        if unknown:
            raise ValueError(f"unknown action(s) {', '.join(unknown)}; known: {', '.join(self.actions)}")
        now = time.monotonic()
        with self._lock:
            if self._thread is None or self._stopping.is_set():
                raise RuntimeError("serial simulator not running")
            for at, action in steps:
                self._order += 1
                heapq.heappush(self._script, (now + at, self._order, action))
            os.write(self._wake_w, b"x")  # the thread recomputes its next deadline

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- the serving thread ---

    def _serve_blocking(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            deadline = self._run_due_actions(now)
            periodic = self._tick(now)
            if periodic is not None:
                deadline = periodic if deadline is None else min(deadline, periodic)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._master, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                os.read(self._wake_r, 64)
            if self._master in readable:
                try:
                    data = os.read(self._master, 4096)
                except BlockingIOError:
                    continue
                except OSError:  # the pty is gone: nothing more to serve
                    log.exception("%s: read failed", self._path)
                    return
                self._received(data)

    def _run_due_actions(self, now: float) -> float | None:
        """Run the script's due actions; return the next one's deadline."""
        while True:
            with self._lock:
                if not self._script:
                    return None
                at, _, action = self._script[0]
                if at > now:
                    return at
                heapq.heappop(self._script)
            log.info("%s: script: %s", self._path, action)
            self._action(action)()

    def _action(self, name: str) -> Callable[[], None]:
        method: Callable[[], None] = getattr(self, name)
        return method

    def _send(self, data: bytes) -> None:
        with self._lock:  # never write to a closed (or by now reused) descriptor number after stop()
            if not self._fds:
                raise RuntimeError("serial simulator not running")
            try:
                os.write(self._master, data)
            except (
                BlockingIOError
            ):  # the reader's input queue is full (nobody reading): drop it, as a line would
                log.debug("%s: dropped %d bytes", self._path, len(data))

    def _is_silent(self) -> bool:
        with self._lock:
            return self._silent

    def _count_poll(self) -> None:
        with self._lock:
            self._polls += 1

    def _received(self, data: bytes) -> None:
        """Bytes from the reader arrived."""

    def _tick(self, now: float) -> float | None:  # noqa: ARG002 - for subclasses that send on their own
        """Send what is due; return when to be called again (None: only on input)."""
        return None


class UpsSimulator(_PtyDevice):
    """A Megatec/Voltronic UPS: answers each ``Q1<CR>`` with its `state`; `polls` counts the Q1s received.

    Other commands are echoed back, as some models do.
    """

    actions: ClassVar[tuple[str, ...]] = ("power_fail", "battery_low", "power_restore", "silence", "resume")

    def __init__(self, state: UpsState | None = None) -> None:
        super().__init__()
        self._state = state or UpsState()
        self._input = bytearray()

    @property
    def state(self) -> UpsState:
        """What the UPS reports now."""
        with self._lock:
            return self._state

    def set_state(self, state: UpsState) -> None:
        """Report `state` from the next poll on."""
        with self._lock:
            self._state = state

    def power_fail(self) -> None:
        """Mains gone: on battery, the beeper sounds."""
        self._change(utility_fail=True, input_voltage=0.0, beeper_on=True)

    def battery_low(self) -> None:
        """The battery runs low (on mains power this flags a worn battery)."""
        self._change(battery_low=True, battery_voltage=1.85)

    def power_restore(self) -> None:
        """Mains back: off battery, battery recharging (no longer low), beeper off."""
        normal = UpsState()
        self._change(
            utility_fail=False,
            battery_low=False,
            beeper_on=False,
            input_voltage=normal.input_voltage,
            battery_voltage=normal.battery_voltage,
        )

    def _change(self, **changes: float | bool) -> None:
        with self._lock:
            self._state = dataclasses.replace(self._state, **changes)  # type: ignore[arg-type]

    def _received(self, data: bytes) -> None:
        self._input += data
        *commands, rest = self._input.split(b"\r")
        self._input[:] = rest if len(rest) <= _MAX_COMMAND else b""
        for raw in commands:
            command = raw.strip(b"\n ")
            if not command:
                continue
            if command == b"Q1":
                self._count_poll()
            if self._is_silent():
                continue
            self._send(self.state.q1_line() if command == b"Q1" else bytes(command) + b"\r")


class KeyValueSimulator(_PtyDevice):
    """A room sensor: sends ``key=value ...`` lines (CR LF) every `interval`; `polls` counts the intervals."""

    def __init__(self, values: dict[str, float | str] | None = None, *, interval: float = 1.0) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._values: dict[str, float | str] = dict(values or {"temp": 21.5, "humidity": 40.2, "door": 0})
        self._next_send: float | None = None

    @property
    def values(self) -> dict[str, float | str]:
        """What the next line reports."""
        with self._lock:
            return dict(self._values)

    def set_values(self, **values: float | str) -> None:
        """Change (or add) reported keys from the next line on."""
        with self._lock:
            self._values.update(values)

    def line(self) -> bytes:
        """The next line to send, CR LF included."""
        pairs = (
            f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in self.values.items()
        )
        return (" ".join(pairs) + "\r\n").encode("ascii")

    def _tick(self, now: float) -> float | None:
        if self._next_send is None:
            self._next_send = now  # the first line at once
        if now >= self._next_send:
            self._count_poll()
            if not self._is_silent():
                self._send(self.line())
            self._next_send += self.interval
            if self._next_send <= now:  # a stalled thread skips the missed beats rather than bursting
                self._next_send = now + self.interval
        return self._next_send
