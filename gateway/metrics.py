"""Every Prometheus metric of the gateway, on one explicit registry, and the HTTP endpoint.

Metrics are instrumented where things happen (the receiver counts a store when it answers it); gauges of
state that lives in the index (queue depths, oldest pending age) are refreshed by the status poller.
Labels have bounded cardinality: destination names come from the config, calling AE titles from the
allow list (anything else is counted as "other"), reasons from fixed sets. Never a UID, never PHI.

The endpoint is prometheus_client's WSGI app behind stdlib wsgiref, in one daemon thread:
``/metrics``, ``/healthz`` (process and event loop alive) and ``/readyz`` (ready to receive, or 503 with
the reasons). The HTTP thread only reads plain attributes that the event loop writes.

Imports: prometheus_client, stdlib.
"""

from __future__ import annotations

import logging
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

PREFIX: Final = "dicom_gateway"
OTHER_AE: Final = "other"
LATENCY_BUCKETS: Final = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
    14400,
    86400,
)
HEARTBEAT_STALE: Final = 10.0  # seconds without a loop heartbeat before /healthz fails


class Metrics:
    """The gateway's metrics and health state; one per process, handed to each component by `app`."""

    def __init__(self, *, allowed_calling_ae: Iterable[str] = (), version: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known_callers = frozenset(ae for ae in allowed_calling_ae if ae != "*")
        r = self.registry
        self.build_info = Info(f"{PREFIX}_build", "Version of the gateway.", registry=r)
        self.build_info.info({"version": version})
        # receiver
        self.associations_active = Gauge(f"{PREFIX}_associations_active", "Open associations.", registry=r)
        self.associations_accepted = Counter(
            f"{PREFIX}_associations_accepted_total", "Associations accepted.", ["calling_ae"], registry=r
        )
        self.associations_rejected = Counter(
            f"{PREFIX}_associations_rejected_total",
            "Associations rejected, by reason.",
            ["reason"],
            registry=r,
        )
        self.instances_received = Counter(
            f"{PREFIX}_instances_received_total",
            "Instances stored and acknowledged.",
            ["calling_ae"],
            registry=r,
        )
        self.bytes_received = Counter(
            f"{PREFIX}_received_bytes_total", "Bytes of stored instances (files).", ["calling_ae"], registry=r
        )
        self.store_failures = Counter(
            f"{PREFIX}_store_failures_total",
            "C-STOREs answered with a failure, by reason.",
            ["reason"],
            registry=r,
        )
        # forwarding
        self.instances_forwarded = Counter(
            f"{PREFIX}_instances_forwarded_total", "Instances delivered.", ["destination"], registry=r
        )
        self.bytes_forwarded = Counter(
            f"{PREFIX}_forwarded_bytes_total", "Bytes of delivered instances.", ["destination"], registry=r
        )
        self.forward_failures = Counter(
            f"{PREFIX}_forward_failures_total",
            "Failed forwarding attempts, by kind (transient, refused, failed, association).",
            ["destination", "kind"],
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "Deliveries by state.", ["destination", "state"], registry=r
        )
        self.oldest_pending_age = Gauge(
            f"{PREFIX}_oldest_pending_age_seconds",
            "Age of the oldest undelivered instance (0 when none).",
            ["destination"],
            registry=r,
        )
        self.destination_up = Gauge(
            f"{PREFIX}_destination_up", "1 when the destination answers.", ["destination"], registry=r
        )
        self.forward_latency = Histogram(
            f"{PREFIX}_forward_latency_seconds",
            "From receipt to delivery, per instance.",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # spool and process
        self.spool_free_bytes = Gauge(f"{PREFIX}_spool_free_bytes", "Free bytes on the spool.", registry=r)
        self.spool_used_bytes = Gauge(f"{PREFIX}_spool_used_bytes", "Bytes of spool files.", registry=r)
        self.spool_reserve_bytes = Gauge(
            f"{PREFIX}_spool_reserve_bytes", "Free space kept in reserve (min_free_bytes).", registry=r
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the gateway accepts associations.", registry=r)
        # telemetry
        self.mqtt_enabled = Gauge(
            f"{PREFIX}_mqtt_enabled", "1 when an [mqtt] broker is configured.", registry=r
        )
        self.mqtt_connected = Gauge(
            f"{PREFIX}_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.mqtt_dropped = Counter(
            f"{PREFIX}_mqtt_dropped_messages_total", "Telemetry dropped (queue full or offline).", registry=r
        )
        self.mqtt_published = Counter(
            f"{PREFIX}_mqtt_published_messages_total", "Telemetry messages published.", registry=r
        )
        # serial devices
        self.device_up = Gauge(
            f"{PREFIX}_device_up", "1 while the serial device answers.", ["device"], registry=r
        )
        self.device_value = Gauge(
            f"{PREFIX}_device_value",
            "Latest numeric reading of a serial device.",
            ["device", "quantity"],
            registry=r,
        )
        self.ups_on_battery = Gauge(
            f"{PREFIX}_ups_on_battery",
            "1 while the UPS runs on battery (utility failed).",
            ["device"],
            registry=r,
        )
        self.ups_battery_low = Gauge(
            f"{PREFIX}_ups_battery_low", "1 while the UPS reports its battery low.", ["device"], registry=r
        )
        self.power_hold = Gauge(
            f"{PREFIX}_power_hold",
            "1 while new associations are refused because of a power failure.",
            registry=r,
        )
        # health state written by the loop, read by the HTTP thread
        self.heartbeat = time.monotonic()
        self.not_ready_reasons: tuple[str, ...] = ("starting",)

    def set_known_callers(self, allowed_calling_ae: Iterable[str]) -> None:
        """The calling AE titles that get their own label (a reload may change the allow list)."""
        self._known_callers = frozenset(ae for ae in allowed_calling_ae if ae != "*")

    def calling_ae(self, title: str) -> str:
        """The label value for a calling AE title: itself when allow-listed by name, else "other"."""
        return title if title in self._known_callers else OTHER_AE

    def set_readiness(self, reasons: Iterable[str]) -> None:
        """Record why the gateway is not ready (empty: ready)."""
        self.not_ready_reasons = tuple(reasons)
        self.ready.set(0 if self.not_ready_reasons else 1)

    def beat(self) -> None:
        """The event loop is alive (called every second from a loop task)."""
        self.heartbeat = time.monotonic()

    def wsgi_app(self) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
        """/metrics from prometheus_client; /healthz and /readyz from the health state."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                age = time.monotonic() - self.heartbeat
                ok = age < HEARTBEAT_STALE
                body = b"ok\n" if ok else f"event loop stalled for {age:.0f} s\n".encode()
                return _plain(start_response, 200 if ok else 503, body)
            if path == "/readyz":
                reasons = self.not_ready_reasons
                body = b"ready\n" if not reasons else ("not ready: " + "; ".join(reasons) + "\n").encode()
                return _plain(start_response, 503 if reasons else 200, body)
            if path in {"/metrics", "/"}:
                response: Iterable[bytes] = metrics_app(environ, start_response)
                return response
            return _plain(start_response, 404, b"not found\n")

        return app


def _plain(start_response: StartResponse, code: int, body: bytes) -> list[bytes]:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
    start_response(f"{code} {reason}", [("Content-Type", "text/plain; charset=utf-8")])
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http: " + format, *args)  # noqa: G003 - the stdlib hands us a %-format


class MetricsServer:
    """The HTTP endpoint in a daemon thread; `start()` raises at once if the address is taken."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._server = make_server(
            host, port, metrics.wsgi_app(), server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()
        log.info("Metrics on http://%s:%d/metrics", self._server.server_address[0], self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
