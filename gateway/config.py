"""The config file: one TOML file -> frozen, typed dataclasses; every problem names its key path.

Owns the file format of DESIGN.md ("The config file"): parsing, validation that reports every problem at
once, defaults, startup warnings and the summary `check-config` prints. It opens TLS and password files only
to check that they are readable; their contents are never kept.

Imports: stdlib, gateway.errors, gateway.model.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.errors import ConfigError
from gateway.model import DuplicatePolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DEFAULT_CONFIG_PATH = Path("/etc/dicom-gateway/gateway.toml")
CONFIG_ENV = "DICOM_GATEWAY_CONFIG"

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class GatewaySection:
    """``[gateway]``: who this box is and where it keeps its state."""

    node_id: str
    ae_title: str
    state_dir: Path
    min_free_bytes: int
    log_level: str
    log_format: str


@dataclass(frozen=True, slots=True)
class ServerTls:
    """``[receiver.tls]``; with ``ca`` set, clients must present a certificate it signed."""

    cert: Path
    key: Path
    ca: Path | None


@dataclass(frozen=True, slots=True)
class ClientTls:
    """Client-side TLS; ``ca`` None: system CA store; ``server_hostname`` None: the peer's host."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    server_hostname: str | None


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """``[receiver]``: the C-STORE listener and who may use it."""

    host: str
    port: int
    require_called_ae: bool
    allowed_calling_ae: tuple[str, ...]  # () admits nobody, ("*",) admits any
    allowed_networks: tuple[IPNetwork, ...]  # () admits any address
    max_associations: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    duplicate_policy: DuplicatePolicy
    max_pdu_length: int
    shutdown_timeout: float
    tls: ServerTls | None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``[destination.retry]``: capped exponential backoff with jitter."""

    initial_delay: float
    max_delay: float
    factor: float
    jitter: float
    max_attempts: int


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """One ``[[destination]]``; ``tls`` None means plain TCP, asked for explicitly."""

    name: str
    kind: str
    host: str
    port: int
    called_ae: str
    calling_ae: str
    max_parallel: int
    batch_size: int
    connect_timeout: float
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    tls: ClientTls | None
    retry: RetryPolicy


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``[retention]``: how long fully delivered files stay in the spool (seconds)."""

    keep_forwarded: float


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: where /metrics, /healthz and /readyz listen."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """``[mqtt]``: the telemetry broker. The password is read from ``password_file`` at connect time."""

    host: str
    port: int
    topic_prefix: str
    client_id: str
    health_interval: float
    keepalive: float
    username: str | None
    password_file: Path | None
    queue_size: int
    tls: ClientTls | None


@dataclass(frozen=True, slots=True)
class SerialConfig:
    """One ``[[serial]]`` device polled for telemetry."""

    name: str
    port: str
    baudrate: int
    bytesize: int
    parity: str
    stopbits: float
    protocol: str
    poll_interval: float
    read_timeout: float


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``source`` is the file it came from, if any."""

    gateway: GatewaySection
    receiver: ReceiverConfig
    destinations: tuple[DestinationConfig, ...]
    retention: RetentionConfig
    metrics: MetricsConfig | None
    mqtt: MqttConfig | None
    serial: tuple[SerialConfig, ...]
    source: Path | None


# --- units ---

_SIZE_UNITS = {"": 1, "B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_DURATION_UNITS: dict[str, int | Decimal] = {
    "": 1,
    "ms": Decimal("0.001"),
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
}
_QUANTITY = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def _quantity(value: object, units: Mapping[str, int | Decimal], what: str, example: str) -> Decimal:
    """Split ``value`` into number x unit; reject bools, non-finite and negative numbers."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        number, unit = Decimal(value), ""
    elif isinstance(value, str) and (match := _QUANTITY.fullmatch(value)):
        number, unit = Decimal(match[1]), match[2]
    else:
        raise ValueError(f"invalid {what} {value!r}: expected a number or a string like {example}")
    if unit not in units:
        raise ValueError(
            f"unknown unit {unit!r} in {what} {value!r}: use one of {', '.join(filter(None, units))}"
        )
    if number < 0:
        raise ValueError(f"{what} {value!r} must not be negative")
    return number * units[unit]


def parse_size(value: object) -> int:
    """Parse a size: integer bytes or a string such as ``"2GiB"``, ``"500MB"``, ``"10 kB"``.

    Raises:
        ValueError: not a size, an unknown unit, a fraction of a byte, or negative.
    """
    size = _quantity(value, _SIZE_UNITS, "size", '"2GiB" or "500MB"')
    if size != int(size):
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(size)


def parse_duration(value: object) -> float:
    """Parse a duration: seconds as a number or a string such as ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h"``.

    Raises:
        ValueError: not a duration, an unknown unit, or negative.
    """
    return float(_quantity(value, _DURATION_UNITS, "duration", '"30s", "5m" or "1h"'))


# --- converters: each takes a raw TOML value and returns it typed, or raises ValueError ---

_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _wrong_type(expected: str, value: object) -> ValueError:
    return ValueError(f"expected {expected}, got {_TOML_TYPES.get(type(value), 'date/time')}")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type("a string", value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type("a boolean (true or false)", value)
    return value


def _array(value: object) -> list[object]:
    if not isinstance(value, list):
        raise _wrong_type("an array", value)
    return value


def _check_range(value: float, low: float, high: float | None) -> None:
    if high is None and not value >= low:
        raise ValueError(f"must be at least {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{value} is out of range {low}..{high}")


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass in Python
            raise _wrong_type("an integer", value)
        _check_range(value, low, high)
        return value

    return convert


def _number(low: float, high: float | None = None) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type("a number", value)
        _check_range(value, low, high)
        return float(value)

    return convert


def _choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if _text(value) not in options:
            raise ValueError(f"expected one of {' | '.join(options)}, got {value!r}")
        return str(value)

    return convert


_port = _integer(1, 65535)


def _name(value: object) -> str:
    if not _NAME.fullmatch(_text(value)):
        raise ValueError(f"{value!r} is not a name: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return str(value)


def _ae_title(value: object) -> str:
    title = _text(value).strip(" ")  # leading and trailing spaces are not significant in an AE title
    if len(title) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    if any(not " " <= c <= "~" or c == "\\" for c in title):
        raise ValueError(f"AE title {title!r} may hold only printable ASCII without backslash")
    return title


def _calling_ae(value: object) -> str:
    return "*" if value == "*" else _ae_title(value)


def _network(value: object) -> IPNetwork:
    return ipaddress.ip_network(_text(value).strip())  # strict: "10.1.2.5/24" (host bits set) is refused


def _interval(value: object) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError("must be longer than zero")
    return seconds


def _kind(value: object) -> str:
    if value == "stow-rs":
        raise ValueError("stow-rs is not supported yet")
    return _choice("dimse")(value)


def _stopbits(value: object) -> float:
    if (bits := _number(1, 2)(value)) not in (1, 1.5, 2):
        raise ValueError(f"expected 1, 1.5 or 2, got {value!r}")
    return bits


def _topic_prefix(value: object) -> str:
    prefix = _text(value)
    if "+" in prefix or "#" in prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError("must not contain '+' or '#', nor start or end with '/'")
    return prefix


def _listen(value: object) -> tuple[str, int]:
    host, sep, port = _text(value).strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port such as '127.0.0.1:9707', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = str(ipaddress.IPv6Address(host[1:-1]))
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. '[::1]:9707', got {value!r}")
    return host or "0.0.0.0", _port(int(port))


def _duplicate_policy(value: object) -> DuplicatePolicy:
    return DuplicatePolicy(_choice(*DuplicatePolicy)(value))


class _Reader:
    """One TOML table being read: tracks its key path and the keys used, and collects problems.

    On a problem a getter records it and returns the default (for a required key: a placeholder), so
    reading goes on and the admin sees every mistake at once; `parse_config` raises before anything uses
    a placeholder.
    """

    def __init__(
        self, table: dict[str, Any], path: str, problems: list[tuple[str, str]], base: Path | None
    ) -> None:
        self._table, self._path, self._problems, self._base = table, path, problems, base
        self._used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def problem(self, key: str, message: str) -> None:
        self._problems.append((self.where(key), message))

    def has(self, key: str) -> bool:
        return key in self._table

    def raw(self, key: str) -> object:
        return self._table.get(key)

    def field(self, key: str, convert: Callable[[object], T], default: T, *, required: bool = False) -> T:
        self._used.add(key)
        if key not in self._table:
            if required:
                self.problem(key, "required key is missing")
            return default
        try:
            return convert(self._table[key])
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def items(self, key: str, convert: Callable[[object], T]) -> tuple[T, ...]:
        values = []
        raw: list[object] = self.field(key, _array, [])
        for i, value in enumerate(raw):
            try:
                values.append(convert(value))
            except ValueError as exc:
                self._problems.append((f"{self.where(key)}[{i}]", str(exc)))
        return tuple(values)

    def table(self, key: str, *, required: bool = False) -> _Reader:
        """The sub-table at ``key``; absent (or not a table): an empty one, so its defaults apply."""
        self._used.add(key)
        value = self._table.get(key, {})
        if required and key not in self._table:
            self.problem(key, "required table is missing")
            # A throwaway problem list: "required key is missing" for each key in it would be noise.
            return _Reader({}, self.where(key), [], self._base)
        if not isinstance(value, dict):
            self.problem(key, str(_wrong_type("a table", value)))
            value = {}
        return _Reader(value, self.where(key), self._problems, self._base)

    def tables(self, key: str) -> list[_Reader]:
        """The array of tables at ``key`` (``[[key]]``)."""
        if isinstance(self._table.get(key), dict):
            self._used.add(key)
            self.problem(key, f"write [[{key}]] (an array of tables), not [{key}]")
            return []
        readers = []
        raw: list[object] = self.field(key, _array, [])
        for i, value in enumerate(raw):
            if isinstance(value, dict):
                readers.append(_Reader(value, f"{self.where(key)}[{i}]", self._problems, self._base))
            else:
                self._problems.append((f"{self.where(key)}[{i}]", str(_wrong_type("a table", value))))
        return readers

    def to_path(self, value: object) -> Path:
        path = Path(_text(value))
        return self._base / path if self._base is not None else path

    def to_file(self, value: object) -> Path:
        path = self.to_path(value)
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read file: {exc.strerror or exc} ({path})") from None
        return path

    def done(self) -> None:
        """Report every key of this table that nothing asked for."""
        for key in self._table:
            if key not in self._used:
                self.problem(key, "unknown key")


# --- sections ---


def _gateway(r: _Reader) -> GatewaySection:
    section = GatewaySection(
        node_id=r.field("node_id", _name, "", required=True),
        ae_title=r.field("ae_title", _ae_title, "", required=True),
        state_dir=r.field("state_dir", r.to_path, Path("/var/lib/dicom-gateway")),
        min_free_bytes=r.field("min_free_bytes", parse_size, 2 * 2**30),
        log_level=r.field("log_level", _choice("debug", "info", "warning", "error"), "info"),
        log_format=r.field("log_format", _choice("text", "json"), "text"),
    )
    r.done()
    return section


def _receiver(r: _Reader) -> ReceiverConfig:
    if not r.has("allowed_calling_ae"):
        r.problem(
            "allowed_calling_ae",
            'required key is missing: list the calling AE titles to admit ([] admits nobody, ["*"] any)',
        )
    allowed = r.items("allowed_calling_ae", _calling_ae)
    if "*" in allowed and len(allowed) > 1:
        r.problem("allowed_calling_ae", '"*" must be the only entry when given')
    tls = None
    if r.has("tls"):
        t = r.table("tls")
        tls = ServerTls(
            cert=t.field("cert", t.to_file, Path(), required=True),
            key=t.field("key", t.to_file, Path(), required=True),
            ca=t.field("ca", t.to_file, None),
        )
        t.done()
    section = ReceiverConfig(
        host=r.field("host", _text, "0.0.0.0"),
        port=r.field("port", _port, 11112),
        require_called_ae=r.field("require_called_ae", _flag, default=True),
        allowed_calling_ae=allowed,
        allowed_networks=r.items("allowed_networks", _network),
        max_associations=r.field("max_associations", _integer(1), 10),
        acse_timeout=r.field("acse_timeout", _interval, 30.0),
        dimse_timeout=r.field("dimse_timeout", _interval, 60.0),
        network_timeout=r.field("network_timeout", _interval, 60.0),
        duplicate_policy=r.field("duplicate_policy", _duplicate_policy, DuplicatePolicy.REPLACE),
        max_pdu_length=r.field("max_pdu_length", _integer(4096, 16777216), 262144),
        shutdown_timeout=r.field("shutdown_timeout", parse_duration, 20.0),
        tls=tls,
    )
    r.done()
    return section


def _client_tls(r: _Reader, *, required: bool) -> ClientTls | None:
    """``tls``: a table, ``true`` (system CA store) or ``false`` (plain TCP); absent: error if required."""
    if not r.has("tls"):
        if required:
            r.problem(
                "tls",
                "TLS settings are required: add a [destination.tls] table, or tls = false for plain TCP",
            )
        return None
    if isinstance(r.raw("tls"), bool):
        return ClientTls(None, None, None, None) if r.field("tls", _flag, default=False) else None
    t = r.table("tls")
    if t.has("cert") != t.has("key"):
        t.problem("key" if t.has("cert") else "cert", "cert and key must be given together")
    tls = ClientTls(
        ca=t.field("ca", t.to_file, None),
        cert=t.field("cert", t.to_file, None),
        key=t.field("key", t.to_file, None),
        server_hostname=t.field("server_hostname", _text, None),
    )
    t.done()
    return tls


def _retry(r: _Reader) -> RetryPolicy:
    policy = RetryPolicy(
        initial_delay=r.field("initial_delay", parse_duration, 5.0),
        max_delay=r.field("max_delay", parse_duration, 600.0),
        factor=r.field("factor", _number(1), 2.0),
        jitter=r.field("jitter", _number(0, 1), 0.2),
        max_attempts=r.field("max_attempts", _integer(1), 5),
    )
    if policy.max_delay < policy.initial_delay:
        r.problem("max_delay", "must not be shorter than initial_delay")
    r.done()
    return policy


def _destination(r: _Reader, gateway: GatewaySection) -> DestinationConfig:
    destination = DestinationConfig(
        name=r.field("name", _name, "", required=True),
        kind=r.field("kind", _kind, "dimse"),
        host=r.field("host", _text, "", required=True),
        port=r.field("port", _port, 0, required=True),
        called_ae=r.field("called_ae", _ae_title, "", required=True),
        calling_ae=r.field("calling_ae", _ae_title, gateway.ae_title),
        max_parallel=r.field("max_parallel", _integer(1, 16), 2),
        batch_size=r.field("batch_size", _integer(1, 1000), 50),
        connect_timeout=r.field("connect_timeout", _interval, 10.0),
        acse_timeout=r.field("acse_timeout", _interval, 30.0),
        dimse_timeout=r.field("dimse_timeout", _interval, 60.0),
        network_timeout=r.field("network_timeout", _interval, 60.0),
        tls=_client_tls(r, required=True),
        retry=_retry(r.table("retry")),
    )
    r.done()
    return destination


def _mqtt(r: _Reader, gateway: GatewaySection) -> MqttConfig:
    tls = _client_tls(r, required=False)
    if r.has("password_file") and not r.has("username"):
        r.problem("password_file", "a password needs a username")
    mqtt = MqttConfig(
        host=r.field("host", _text, "", required=True),
        port=r.field("port", _port, 8883 if tls else 1883),
        topic_prefix=r.field("topic_prefix", _topic_prefix, "dicom-gateway"),
        client_id=r.field("client_id", _text, f"dicom-gateway-{gateway.node_id}"),
        health_interval=r.field("health_interval", _interval, 30.0),
        keepalive=r.field("keepalive", _interval, 60.0),
        username=r.field("username", _text, None),
        password_file=r.field("password_file", r.to_file, None),
        queue_size=r.field("queue_size", _integer(1), 1000),
        tls=tls,
    )
    r.done()
    return mqtt


def _serial(r: _Reader) -> SerialConfig:
    device = SerialConfig(
        name=r.field("name", _name, "", required=True),
        port=r.field("port", _text, "", required=True),
        baudrate=r.field("baudrate", _integer(1), 9600),
        bytesize=r.field("bytesize", _integer(5, 8), 8),
        parity=r.field("parity", _choice("N", "E", "O", "M", "S"), "N"),
        stopbits=r.field("stopbits", _stopbits, 1.0),
        protocol=r.field("protocol", _choice("megatec-q1", "keyvalue"), "", required=True),
        poll_interval=r.field("poll_interval", _interval, 10.0),
        read_timeout=r.field("read_timeout", _interval, 2.0),
    )
    r.done()
    return device


def _check_unique(readers: list[_Reader], names: list[str]) -> None:
    first: dict[str, str] = {}
    for reader, name in zip(readers, names, strict=True):
        if not name:  # missing or invalid: already reported
            continue
        if name in first:
            reader.problem("name", f"duplicate name {name!r} (also {first[name]})")
        first.setdefault(name, reader.where("name"))


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate an already-parsed TOML document.

    Args:
        data: the document, as `tomllib` returns it.
        base_dir: relative paths are resolved against it (the config file's directory); None keeps them.

    Raises:
        ConfigError: with every problem found, each as (key path, message).
    """
    problems: list[tuple[str, str]] = []
    root = _Reader(data, "", problems, base_dir)
    gateway = _gateway(root.table("gateway", required=True))
    receiver = _receiver(root.table("receiver", required=True))
    dest_readers, serial_readers = root.tables("destination"), root.tables("serial")
    destinations = tuple(_destination(r, gateway) for r in dest_readers)
    _check_unique(dest_readers, [d.name for d in destinations])
    serial = tuple(_serial(r) for r in serial_readers)
    _check_unique(serial_readers, [s.name for s in serial])
    retention = root.table("retention")
    keep_forwarded = retention.field("keep_forwarded", parse_duration, 0.0)
    retention.done()
    metrics_table = root.table("metrics")
    metrics: MetricsConfig | None = MetricsConfig(
        *metrics_table.field("listen", _listen, ("127.0.0.1", 9707))
    )
    if not metrics_table.field("enabled", _flag, default=True):
        metrics = None
    metrics_table.done()
    mqtt = _mqtt(root.table("mqtt"), gateway) if root.has("mqtt") else None
    root.done()
    if problems:
        raise ConfigError(problems)
    return Config(
        gateway=gateway,
        receiver=receiver,
        destinations=destinations,
        retention=RetentionConfig(keep_forwarded),
        metrics=metrics,
        mqtt=mqtt,
        serial=serial,
        source=None,
    )


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``.

    Raises:
        ConfigError: the file is unreadable, is not TOML (the message has line and column), or has problems.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read file: {exc.strerror or exc}")]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([(str(path), f"invalid TOML: {exc}")]) from exc
    return dataclasses.replace(parse_config(data, path.absolute().parent), source=path)


def resolve_config_path(cli_value: str | None) -> Path:
    """The config file to use: the command line's, else ``$DICOM_GATEWAY_CONFIG``, else the default."""
    return Path(cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


# --- for people ---


def warnings(cfg: Config) -> list[str]:
    """Startup warnings: settings that are valid but weaken security or do less than an admin may expect."""
    found = []
    if cfg.receiver.allowed_calling_ae == ("*",):
        found.append('receiver.allowed_calling_ae = ["*"]: any calling AE title may store images')
    elif not cfg.receiver.allowed_calling_ae:
        found.append("receiver.allowed_calling_ae is empty: no calling AE title may store images")
    if not cfg.receiver.require_called_ae:
        found.append("receiver.require_called_ae = false: associations with any called AE title are accepted")
    if not cfg.destinations:
        found.append("no [[destination]]: receive-only, nothing is forwarded")
    found += [
        f"destination {d.name!r} uses plain TCP (tls = false): images cross the network unencrypted"
        for d in cfg.destinations
        if d.tls is None
    ]
    return found


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bytes(count: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:g} {unit}"
    return f"{count} B"


def _tls(tls: ClientTls | None) -> str:
    return "off" if tls is None else "on, mutual" if tls.cert else "on"


def summarize(cfg: Config) -> str:
    """A short human summary for ``dicom-gateway check-config``; it never shows secrets."""
    g, r, metrics, mqtt = cfg.gateway, cfg.receiver, cfg.metrics, cfg.mqtt
    receiver_tls = "off" if r.tls is None else "on, client certificates required" if r.tls.ca else "on"
    topics = f"{mqtt.topic_prefix}/{g.node_id}/" if mqtt else ""
    lines = [
        f"config:       {cfg.source or '(not from a file)'}",
        f"node:         {g.node_id}, AE title {g.ae_title}",
        f"state:        {g.state_dir}, keeps {_bytes(g.min_free_bytes)} free",
        f"logging:      {g.log_level}, {g.log_format}",
        f"receiver:     {_address(r.host, r.port)}, TLS {receiver_tls}",
        f"  calling AEs: {', '.join(r.allowed_calling_ae) or 'none (admits nobody)'}",
        f"  networks:    {', '.join(map(str, r.allowed_networks)) or 'any'}",
        f"destinations: {len(cfg.destinations) or 'none (receive-only)'}",
        *(
            f"  {d.name}: {d.called_ae} at {_address(d.host, d.port)}, TLS {_tls(d.tls)}"
            for d in cfg.destinations
        ),
        f"metrics:      http://{_address(metrics.host, metrics.port)}/metrics"
        if metrics
        else "metrics:      off",
        f"mqtt:         {_address(mqtt.host, mqtt.port)}, TLS {_tls(mqtt.tls)}, topics {topics}"
        if mqtt
        else "mqtt:         off",
        f"serial:       {len(cfg.serial) or 'none'}",
        *(f"  {s.name}: {s.port} at {s.baudrate} baud, {s.protocol}" for s in cfg.serial),
    ]
    return "\n".join(lines)
