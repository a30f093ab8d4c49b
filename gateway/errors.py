"""The gateway's exceptions: a small, flat hierarchy carrying structured attributes.

Imports: stdlib only.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration file is unusable; ``problems`` lists each one as (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


class StoreError(GatewayError):
    """Storing one object failed; ``status`` is the DIMSE status the peer gets for it.

    ``reason`` is a short fixed word for metrics labels (reserve, disk_full, io_error, index, unreadable,
    mismatch, invalid_uid, duplicate, sop_class, unsupported).
    """

    def __init__(self, status: int, message: str, uid: str = "", *, reason: str = "error") -> None:
        self.status = status
        self.uid = uid
        self.reason = reason
        super().__init__(message)


class ProtocolError(GatewayError):
    """A peer broke the DICOM upper layer or DIMSE protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = 0) -> None:
        self.reason = reason
        super().__init__(message)


class IndexDatabaseError(GatewayError):
    """The SQLite index could not record or read something."""
