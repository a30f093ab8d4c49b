"""Startup recovery: make the spool and the index agree again after a crash.

Cheap on a large spool: one directory scan and one query; only files without a row (a crash between
rename and commit) are read and hashed, never every file.

Imports: spool, index, model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.model import StoredInstance
from gateway.spool import SUFFIX, file_sha256, read_stored_file

if TYPE_CHECKING:
    from gateway.index import Index
    from gateway.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What the sweep found and did."""

    temp_files_removed: int
    files_reindexed: int
    files_unreadable: int
    rows_missing_file: int
    claims_released: int


async def recover(spool: Spool, index: Index) -> RecoveryReport:
    """Remove temporary files, index orphan files, flag rows without files, release dead claims."""
    removed = await asyncio.to_thread(spool.remove_temp_files)
    on_disk = set(await asyncio.to_thread(lambda: set(spool.stored_uids())))
    indexed = await index.stored_uids()
    reindexed = unreadable = 0
    for uid in sorted(on_disk - indexed):
        instance = await asyncio.to_thread(_describe_orphan, spool, uid)
        if instance is None:
            unreadable += 1
            continue
        await index.record(instance)
        reindexed += 1
    missing = await index.mark_missing(indexed - on_disk)
    released = await index.release_claims()
    report = RecoveryReport(removed, reindexed, unreadable, missing, released)
    log.info(
        "Recovery: %d temp files removed, %d files re-indexed, %d unreadable, %d rows missing their file, "
        "%d claims released",
        removed,
        reindexed,
        unreadable,
        missing,
        released,
    )
    if missing:
        log.error("%d indexed instances have no spool file: their deliveries are marked failed", missing)
    return report


def _describe_orphan(spool: Spool, uid: str) -> StoredInstance | None:
    """Build the row of a file that was renamed into place but never committed (blocking)."""
    path = spool.path_for(uid + SUFFIX)
    try:
        header, transfer_syntax, source_ae = read_stored_file(path)
        sha256 = file_sha256(path)
        stat = path.stat()
    except Exception:  # an unreadable orphan is left for an operator, never deleted
        log.exception("Spool file %s is unreadable; left in place", path.name)
        return None
    if header.sop_instance_uid != uid:
        log.error(
            "Spool file %s holds SOP Instance UID %s; left in place", path.name, header.sop_instance_uid
        )
        return None
    return StoredInstance(
        header=header,
        transfer_syntax_uid=transfer_syntax,
        size_bytes=stat.st_size,
        sha256=sha256,
        file_name=path.name,
        calling_ae=source_ae,
        peer_address="",
        received_at=stat.st_mtime,
    )
