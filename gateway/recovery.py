"""Startup recovery: make the spool and the index agree again after a crash.

Cheap on a large spool: one directory scan and one query; only files without a row (a crash between
rename and commit) are read and hashed, never every file.

Imports: spool, index, model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.model import StoredInstance
from gateway.spool import SUFFIX, file_sha256, read_stored_file

if TYPE_CHECKING:
    from gateway.index import Index
    from gateway.spool import Spool

log = logging.getLogger(__name__)

CHUNK = 1000  # files or rows looked at per step


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What the sweep found and did."""

    temp_files_removed: int
    files_reindexed: int
    files_unreadable: int
    rows_missing_file: int
    claims_released: int


async def recover(spool: Spool, index: Index) -> RecoveryReport:
    """Remove temporary files, index orphan files, flag rows without files, release dead claims.

    Memory stays flat whatever the backlog: the directory and the index are both walked in chunks.
    """
    removed = await asyncio.to_thread(spool.remove_temp_files)
    orphans = await _files_without_rows(spool, index)
    reindexed = unreadable = 0
    for uid in orphans:
        instance = await asyncio.to_thread(_describe_orphan, spool, uid)
        if instance is None:
            unreadable += 1
            continue
        await index.record(instance)
        reindexed += 1
    missing = await index.mark_missing(await _rows_without_files(spool, index))
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


async def _files_without_rows(spool: Spool, index: Index) -> list[str]:
    """UIDs of spool files the index does not list as stored (a crash between rename and commit)."""
    files = iter(spool.stored_uids())
    orphans: list[str] = []
    while chunk := await asyncio.to_thread(lambda: list(itertools.islice(files, CHUNK))):
        marks = ",".join("?" * len(chunk))
        query = "SELECT sop_instance_uid FROM instances WHERE file_state = 'stored' AND sop_instance_uid IN "
        rows = await index.fetchall(query + f"({marks})", chunk)
        known = {row[0] for row in rows}
        orphans += [uid for uid in chunk if uid not in known]
    return sorted(orphans)


async def _rows_without_files(spool: Spool, index: Index) -> list[str]:
    """UIDs of rows listed as stored whose file is gone, paging through the index by id."""
    missing: list[str] = []
    last_id = 0
    while rows := await index.fetchall(
        "SELECT id, sop_instance_uid, file_name FROM instances WHERE file_state = 'stored' AND id > ? "
        "ORDER BY id LIMIT ?",
        (last_id, CHUNK),
    ):
        last_id = rows[-1][0]
        missing += await asyncio.to_thread(_gone, spool, [(row[1], row[2]) for row in rows])
    return missing


def _gone(spool: Spool, page: list[tuple[str, str]]) -> list[str]:
    """The UIDs of (UID, file name) pairs whose file is not in the spool (blocking)."""
    return [uid for uid, file_name in page if not spool.path_for(file_name).exists()]


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
