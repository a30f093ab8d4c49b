"""sd_notify: READY, STOPPING, WATCHDOG and STATUS as datagrams to ``$NOTIFY_SOCKET``; a no-op without it.

Owns the gateway's side of systemd's notification protocol (sd_notify(3)): one datagram of newline-separated
``KEY=value`` assignments per state change, sent to the AF_UNIX datagram socket that the service manager
names in ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). The watchdog follows
sd_watchdog_enabled(3): pings go out only when ``$WATCHDOG_USEC`` asks for them and ``$WATCHDOG_PID``, when
set, is this process. Sending never blocks the event loop and never raises: a manager that went away or
does not keep up costs a datagram, not the gateway.

Imports: stdlib only.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Speaks the sd_notify protocol to the service manager named by the environment.

    Args:
        environ: where to find ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; default
            ``os.environ`` (read once, here).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        self.watchdog_usec = _watchdog_usec(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when started by a service manager that listens."""
        return bool(self.address)

    @property
    def watchdog_enabled(self) -> bool:
        """True when the service manager expects WATCHDOG=1 pings from this process."""
        return self.enabled and self.watchdog_usec is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments (each one line) as one datagram; False when not delivered."""
        if not self.address:
            return False
        if self.address.startswith("@"):  # abstract namespace: a leading NUL instead of the "@"
            target = "\0" + self.address[1:]
        elif self.address.startswith("/"):
            target = self.address
        else:  # e.g. "vsock:CID:PORT" (newer systemd, for a manager outside a VM): not supported here
            self._failed("unsupported address")
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # MSG_DONTWAIT: a manager whose queue is full must not stall the event loop.
                sock.sendto("\n".join(assignments).encode(), socket.MSG_DONTWAIT, target)
        except OSError as exc:
            self._failed(exc.strerror or str(exc))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """The service is up (receiver listening, recovery done)."""
        return self.notify("READY=1", *([_status(status)] if status else []))

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """The event loop is alive; sent only when the watchdog is enabled for this process."""
        return self.watchdog_enabled and self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status`` (newlines become spaces)."""
        return self.notify(_status(text))

    def _failed(self, reason: str) -> None:
        # The first failure is worth an operator's attention (READY may be lost); then one per ping is noise.
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "sd_notify to %s failed: %s", self.address, reason)


def _status(text: str) -> str:
    """A STATUS= assignment; a newline in the text would start another assignment."""
    return "STATUS=" + " ".join(text.splitlines())


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """The watchdog interval asked of this process in microseconds, or None (as sd_watchdog_enabled)."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    try:
        interval, owner = int(usec), int(pid) if pid else None
    except ValueError:
        log.warning("Ignoring an invalid watchdog setting: WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None
    if interval <= 0 or (owner is not None and owner != os.getpid()):
        return None  # meant for another process (a parent that set it and then started us)
    return interval
