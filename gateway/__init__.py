"""dicom-gateway: a durable DICOM edge gateway (receive, spool, index, forward, report)."""

__version__ = "0.1.0"
