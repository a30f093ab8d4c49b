"""Serial device telemetry: the readers of `[[serial]]` devices, their protocol parsers, the power policy.

Owns everything that talks to a serial port. `SerialDevice.run()` opens the port, polls it every
`poll_interval` (a Megatec/Voltronic "Q1" UPS is asked; a key=value device is read for what it sent),
turns each answer into a `DeviceReading` for metrics, events and a callback, and reports a device that is
unplugged or silent (one event per change) before reopening it with capped, jittered backoff. pyserial is
blocking: every open, read, write and close runs in a worker thread (`asyncio.to_thread`), and a cancelled
reader wakes its worker (`cancel_read`) and waits for it before it closes the port. `PowerPolicy` is pure
logic on UPS readings: hold new work while on battery with the battery low, release when utility is back.

Imports: serial (pyserial), gateway.model, gateway.metrics, gateway.config (types only); stdlib.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import termios
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

import serial

from gateway.model import DeviceReading, Event, EventKind

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.config import SerialConfig
    from gateway.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_KEYS: Final = 32  # quantities per device: a chatty device cannot blow up label cardinality
MAX_KEY_LENGTH: Final = 64
MAX_LINE: Final = 1024  # bytes; a longer "line" is garbage (wrong baud rate, binary protocol)
MAX_READ: Final = 65536  # bytes taken from a key=value device per poll
SILENT_AFTER: Final = 3  # consecutive failed polls before a device counts as silent
BACKOFF_BASE: Final = 1.0
BACKOFF_CAP: Final = 60.0

Q1_QUANTITIES: Final = (
    "input_voltage",
    "input_fault_voltage",
    "output_voltage",
    "load_percent",
    "input_frequency_hz",
    "battery_voltage",
    "temperature_celsius",
)
# Status bits b7 .. b0, in the order the UPS sends them.
Q1_FLAGS: Final = (
    "utility_fail",  # b7: on battery
    "battery_low",
    "bypass_active",  # bypass or boost/buck active
    "ups_failed",
    "standby_type",  # 1: standby (offline) UPS, 0: online
    "test_in_progress",
    "shutdown_active",
    "beeper_on",
)
_Q1_UNAVAILABLE: Final = re.compile(r"-+\.?-*")  # "--.-": a quantity this model does not measure
_KV_SEPARATORS: Final = re.compile(r"[\s,;]+")
_NOT_LABEL_SAFE: Final = re.compile(r"[^a-z0-9_]")
_LINE_ENDS: Final = re.compile(rb"[\r\n]")


class Q1Status(NamedTuple):
    """One parsed Q1 answer: quantities and status bits."""

    values: dict[str, float]
    flags: dict[str, bool]


def _text(line: bytes | str) -> str:
    return line.decode("ascii", errors="replace") if isinstance(line, bytes) else line


def parse_q1(line: bytes | str) -> Q1Status:
    """Parse a Q1 answer: ``(MMM.M NNN.N PPP.P QQQ RR.R S.SS TT.T b7b6b5b4b3b2b1b0`` and a CR.

    A quantity sent as dashes (``--.-``, not measured by this model) is left out.

    Raises:
        ValueError: the line is not a Q1 answer (a NAK, an echo of the command, garbage); the message says
            what is wrong with it.
    """
    text = _text(line).strip()
    if text in {"NAK", "(NAK"}:
        raise ValueError("UPS answered NAK (Q1 not supported)")
    if text == "Q1":
        raise ValueError("UPS echoed the command instead of answering")
    if not text.startswith("("):
        raise ValueError(f"Q1 answer must start with '(': {text[:40]!r}")
    fields = text[1:].split()
    if len(fields) != len(Q1_QUANTITIES) + 1:
        raise ValueError(f"Q1 answer has {len(fields)} fields, expected 8: {text[:60]!r}")
    values: dict[str, float] = {}
    for key, field in zip(Q1_QUANTITIES, fields, strict=False):
        if _Q1_UNAVAILABLE.fullmatch(field):
            continue
        try:
            value = float(field)
        except ValueError:
            raise ValueError(f"Q1 {key} is not a number: {field!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"Q1 {key} is not a finite number: {field!r}")
        values[key] = value
    bits = fields[-1]
    if len(bits) != len(Q1_FLAGS) or set(bits) - {"0", "1"}:
        raise ValueError(f"Q1 status must be 8 bits of 0/1: {bits!r}")
    return Q1Status(values, {name: bit == "1" for name, bit in zip(Q1_FLAGS, bits, strict=True)})


def sanitize_key(key: str) -> str:
    """A quantity name safe as a Prometheus label value and an MQTT JSON key: ``[a-z0-9_]``, 64 at most."""
    return _NOT_LABEL_SAFE.sub("_", key.strip().lower())[:MAX_KEY_LENGTH]


def parse_keyvalue(line: bytes | str) -> dict[str, float]:
    """Parse ``key=value`` pairs separated by spaces, commas or semicolons; numeric values only.

    Keys are sanitized (`sanitize_key`); non-numeric and non-finite values and empty keys are ignored; a
    repeated key keeps its last value; only the first `MAX_KEYS` distinct keys are kept.
    """
    values: dict[str, float] = {}
    for token in _KV_SEPARATORS.split(_text(line)):
        raw_key, separator, raw_value = token.partition("=")
        key = sanitize_key(raw_key)
        if not separator or not key.strip("_"):
            continue
        try:
            value = float(raw_value)
        except ValueError:
            continue
        if math.isfinite(value) and (key in values or len(values) < MAX_KEYS):
            values[key] = value
    return values


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds before reopen number `attempt` (from 0): full jitter over ``min(cap, base * 2**attempt)``."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))  # the exponent is bounded: no float overflow
    return random.uniform(0.0, ceiling)  # noqa: S311 - spreading retries needs no cryptographic randomness


class SerialDevice:
    """One `[[serial]]` device: poll it, publish its readings, report and survive its absence.

    Attributes:
        up: True while the device answers.
        latest: the last reading, for the health snapshot (kept while the device is down).
        open_attempts: how often the port was (re)opened, or tried.
    """

    def __init__(
        self,
        config: SerialConfig,
        metrics: Metrics,
        emit: Callable[[Event], None],
        on_reading: Callable[[DeviceReading], None] | None = None,
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        if config.protocol not in {"megatec-q1", "keyvalue"}:
            raise ValueError(f"unknown serial protocol {config.protocol!r}")
        self.config = config
        self.name = config.name
        self._metrics = metrics
        self._emit = emit
        self._on_reading = on_reading
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._poll_once = self._poll_q1 if config.protocol == "megatec-q1" else self._poll_kv
        self.up = False
        self.latest: DeviceReading | None = None
        self.open_attempts = 0
        self._reported: bool | None = None  # the up/down state last announced; None: nothing yet
        self._failures = 0  # sessions in a row that ended without a sign of life: the backoff exponent
        self._quantities: set[str] = set()
        self._capped = False  # warned that the device sends more than MAX_KEYS quantities
        self._pending = bytearray()  # an incomplete key=value line
        metrics.device_up.labels(self.name).set(0)  # the series exists (and alerts can see it) from start

    async def run(self) -> None:
        """Poll the device until cancelled; when it is lost or silent, report it and reopen with backoff."""
        while True:
            try:
                error = await self._session()
            except Exception as exc:  # a driver's odd fault must not end the app's TaskGroup
                log.exception("Serial device %s: unexpected error", self.name)
                error = f"unexpected error: {exc!r}"
            self._set_down(error)
            delay = backoff_delay(self._failures, self._backoff_base, self._backoff_cap)
            self._failures += 1
            log.debug("Serial device %s: reopening %s in %.2f s", self.name, self.config.port, delay)
            await asyncio.sleep(delay)

    async def _session(self) -> str:
        """Open the port and poll it until the device is lost or silent; return why it ended."""
        self.open_attempts += 1
        self._pending.clear()
        try:
            port = await self._open()
        except (serial.SerialException, OSError, termios.error, ValueError) as exc:
            return f"cannot open {self.config.port}: {exc}"
        try:
            return await self._poll(port)
        finally:
            # Closing a tty may wait for unsent output to drain: off the loop, and finished even if
            # cancelled again meanwhile.
            await asyncio.shield(asyncio.to_thread(port.close))

    async def _open(self) -> serial.Serial:
        future = asyncio.ensure_future(asyncio.to_thread(self._open_blocking))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker carries on: wait for it and close what it opened, or the descriptor leaks.
            await asyncio.wait({future})
            if not future.cancelled() and future.exception() is None:
                future.result().close()
            raise

    def _open_blocking(self) -> serial.Serial:
        c = self.config
        return serial.Serial(
            port=c.port,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=c.parity,
            stopbits=c.stopbits,
            timeout=c.read_timeout,
            write_timeout=c.read_timeout,
            exclusive=True,  # flock: a second process polling the same UPS would steal its answers
        )

    async def _poll(self, port: serial.Serial) -> str:
        loop = asyncio.get_running_loop()
        failed = 0
        while True:
            started = loop.time()
            try:
                error = await self._poll_once(port)
            except (serial.SerialException, OSError, termios.error) as exc:  # unplugged: the port failed
                return f"{self.config.port}: {exc}"
            if not error:
                failed = 0
            else:
                failed += 1
                log.debug("Serial device %s: poll failed: %s", self.name, error)
                if failed >= SILENT_AFTER:
                    return f"{error} ({failed} polls in a row)"
            await asyncio.sleep(max(0.0, self.config.poll_interval - (loop.time() - started)))

    async def _poll_q1(self, port: serial.Serial) -> str:
        """Ask once; return "" after a reading, else what went wrong."""
        try:
            answer = await self._in_thread(port, _ask_q1_blocking)
        except serial.SerialTimeoutException:  # a SerialException, but a stuck write is a failed poll
            return "write timed out"
        if not answer.endswith(b"\r"):
            if not answer:
                return f"no answer within {self.config.read_timeout:g} s"
            return f"incomplete answer {answer[:40]!r}"
        try:
            status = parse_q1(answer)
        except ValueError as exc:
            return str(exc)
        self._alive()
        self._publish(status.values, status.flags)
        return ""

    async def _poll_kv(self, port: serial.Serial) -> str:
        """Take what the device sent; return "" if it sent anything, else what went wrong."""
        data = await self._in_thread(port, _drain_blocking)
        if not data:
            return "sent nothing"
        self._alive()
        *lines, rest = _LINE_ENDS.split(bytes(self._pending) + data)
        self._pending[:] = rest if len(rest) <= MAX_LINE else b""  # no line end in sight: garbage
        values: dict[str, float] = {}
        for line in lines:
            values.update(parse_keyvalue(line))
        for key in [k for k in values if k not in self._quantities]:
            if len(self._quantities) < MAX_KEYS:
                self._quantities.add(key)
                continue
            del values[key]
            if not self._capped:  # once: a chatty device would repeat it every poll
                self._capped = True
                log.warning(
                    "Serial device %s: over %d quantities, ignoring %r and more", self.name, MAX_KEYS, key
                )
        if values:
            self._publish(values, {})
        return ""

    async def _in_thread(self, port: serial.Serial, fn: Callable[[serial.Serial], T]) -> T:
        """Run one blocking exchange in a worker; if cancelled, wake the worker and wait for it to end."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, port))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            port.cancel_read()  # select() in the worker returns at once
            port.cancel_write()
            await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # retrieved: we are leaving anyway
            raise

    def _publish(self, values: dict[str, float], flags: dict[str, bool]) -> None:
        for quantity, value in values.items():
            self._metrics.device_value.labels(self.name, quantity).set(value)
        if "utility_fail" in flags:
            self._metrics.ups_on_battery.labels(self.name).set(int(flags["utility_fail"]))
            self._metrics.ups_battery_low.labels(self.name).set(int(flags.get("battery_low", False)))
        reading = DeviceReading(self.name, values, flags)
        self.latest = reading
        self._emit(Event(EventKind.DEVICE, {"values": dict(values), "flags": dict(flags)}, source=self.name))
        if self._on_reading is not None:
            self._on_reading(reading)

    def _alive(self) -> None:
        self._failures = 0
        self.up = True
        self._metrics.device_up.labels(self.name).set(1)
        if self._reported is not True:
            self._reported = True
            log.info("Serial device %s on %s is up", self.name, self.config.port)
            self._emit(Event(EventKind.DEVICE_STATUS, {"up": True}, source=self.name))

    def _set_down(self, error: str) -> None:
        self.up = False
        self._metrics.device_up.labels(self.name).set(0)
        if self._reported is not False:
            self._reported = False
            log.warning("Serial device %s is down: %s", self.name, error)
            self._emit(Event(EventKind.DEVICE_STATUS, {"up": False, "error": error}, source=self.name))
        else:
            log.debug("Serial device %s still down: %s", self.name, error)


def _ask_q1_blocking(port: serial.Serial) -> bytes:
    port.reset_input_buffer()  # a late answer to an earlier poll must not pass for this one
    port.write(b"Q1\r")
    return port.read_until(b"\r", MAX_LINE)


def _drain_blocking(port: serial.Serial) -> bytes:
    data = port.read(max(1, min(port.in_waiting, MAX_READ)))  # waits up to read_timeout for a first byte
    waiting = min(port.in_waiting, MAX_READ - len(data))
    return data + port.read(waiting) if waiting > 0 else data


class PowerPolicy:
    """Decide from UPS readings when the gateway must stop taking new work, and when it may resume.

    Hold when any UPS reports utility failure and battery low at once; release when every UPS that caused
    the hold reports utility power back (a low battery alone, or on battery with charge left, is no reason).
    `on_change(held, reason)` is called once per change. Readings without UPS flags are ignored.
    """

    def __init__(self, on_change: Callable[[bool, str], None]) -> None:
        self._on_change = on_change
        self._failing: set[str] = set()  # UPSes on battery with the battery low

    @property
    def held(self) -> bool:
        """True while new associations should be refused."""
        return bool(self._failing)

    def observe(self, reading: DeviceReading) -> None:
        """Take one reading into account."""
        flags = reading.flags
        if "utility_fail" not in flags:
            return
        was_held = self.held
        if flags["utility_fail"] and flags.get("battery_low", False):
            self._failing.add(reading.device)
        elif not flags["utility_fail"]:
            self._failing.discard(reading.device)
        held = self.held
        if held != was_held:
            reason = "utility power failed and battery low" if held else "utility power is back"
            self._on_change(held, f"UPS {reading.device}: {reason}")
