"""The simulators' one place for pynetdicom's process-wide settings and socket tuning.

pynetdicom keeps its options in the module-global `_config`; setting them from several modules would make
behaviour depend on import order, so every simulator calls `configure_pynetdicom()` from here instead.

May import: pynetdicom only.
"""

from __future__ import annotations

import queue
import socket
from typing import TYPE_CHECKING, TypeVar

from pynetdicom import _config, evt

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import EventHandlerType

_Item = TypeVar("_Item")


def configure_pynetdicom() -> None:
    """Set the `_config` flags the simulators rely on; idempotent."""
    # `send_c_store(path)` then streams the file's data set in PDU-sized chunks: memory stays flat for
    # large multi-frame objects and the bytes on the wire are exactly the bytes in the file.
    _config.STORE_SEND_CHUNKED_DATASET = True


def _on_conn_open_set_nodelay(event: evt.Event) -> None:
    """Turn off Nagle's algorithm on a freshly connected association socket (either role).

    pynetdicom leaves Nagle on; a C-STORE ends with a small PDU that then waits for the peer's delayed ACK,
    adding 40-70 ms to every object. EVT_CONN_OPEN fires after connect() and before the first PDU.
    """
    association_socket = event.assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        association_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay_handlers() -> list[EventHandlerType]:
    """Return event handlers to pass to `AE.associate(evt_handlers=...)` or `AE.start_server(...)`."""
    return [(evt.EVT_CONN_OPEN, _on_conn_open_set_nodelay)]


def close_transport(assoc: Association) -> None:
    """Close an ended association's socket for sure.

    pynetdicom's `AssociationSocket._shutdown_socket()` calls `close()` only when `shutdown()` succeeds; on
    a TLS socket the peer has already torn down (a refused client certificate) shutdown raises, the
    socket stays open and leaks. Closing twice is harmless, so this closes whatever is left.
    """
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.close()


class _BlockingGetsOnlyQueue(queue.Queue[_Item]):
    """A queue whose non-blocking gets always come back empty: only a waiting caller takes items."""

    def get(self, block: bool = True, timeout: float | None = None) -> _Item:
        if not block:
            raise queue.Empty
        return super().get(block, timeout)


def keep_responses_for_caller(assoc: Association) -> None:
    """Hand every DIMSE message on a requestor-only association to the blocking `send_*()` caller.

    pynetdicom's association reactor polls the DIMSE queue with non-blocking gets while `send_c_store()`
    waits on it with a blocking get. The reactor is meant to pause meanwhile, but its pause handshake
    (`_reactor_checkpoint` / `_is_paused`) is racy: now and then the reactor takes the C-STORE-RSP, logs
    "Received unexpected C-STORE service message", drops it, and the sender waits out its DIMSE timeout.
    The reactor only needs that queue to serve requests from the peer, which a storage SCU never gets,
    so giving it an always-empty view removes the race. Call right after the association is established,
    before the first request (the queue is empty then).
    """
    assoc.dimse.msg_queue = _BlockingGetsOnlyQueue()
