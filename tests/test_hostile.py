"""Hostile input (DESIGN.md invariant 5): fuzzed data sets, UIDs that would escape the spool, floods.

`tests/test_receiver_protocol.py` already covers malformed PDUs, the length guards, slow and idle peers,
refused C-STOREs (invalid UIDs among them), `max_associations` one over the limit and access control
byte for byte; this file covers what it does not:

- the gateway's own parsing of received data sets and file meta, fuzzed in-process with hypothesis
  (`Spool.open_object` + `write` + `finish`, as the receiver drives them) and over the wire;
- UIDs built to escape the spool, in the command and in the data set;
- floods of associations beyond `max_associations`, and of TCP connections that never speak.

`CHAOS_LONG=1` (as a long chaos run sets it) raises the number of examples tenfold; each fuzzing and
flood test prints one summary line.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import random
import secrets
import socket
import stat
import struct
import sys
import threading
import time
import tracemalloc
import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import build_context
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import Verification

from gateway.errors import StoreError
from gateway.model import DuplicatePolicy
from gateway.spool import TEMP_PREFIX, FileMetaSpec, FinishedObject, Spool
from simulators.datasets import InstanceRef, StudySpec, build_dataset, encode_dataset
from simulators.harness import ManagedProcess
from simulators.scanner import ScanOptions, ScanResult, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    READY_LINE,
    REPO,
    SCANNER_AE,
    dataset_bytes,
    wait_until,
    write_config,
)
from tests.test_receiver_protocol import echo

if TYPE_CHECKING:
    from tests.conftest import GatewaySetup

CHAOS_LONG: Final = os.environ.get("CHAOS_LONG") == "1"
FUZZ_EXAMPLES: Final = 25_000 if CHAOS_LONG else 2_500
WIRE_OBJECTS: Final = 3_000 if CHAOS_LONG else 300
# Every status the spool may answer a hostile object with (PS3.4 B.2.3 families).
FAILURE_STATUSES: Final = frozenset({0xA700, 0xA900, 0xC000, 0xC001, 0x0111})
PATIENT_NAME: Final = "Hostile^Horatio^Fuzz"
PATIENT_ID: Final = "PHI-FUZZ-271828"
PHI: Final = (PATIENT_NAME, "Horatio", PATIENT_ID)
READ_TIMEOUT: Final = 10.0

_PDU = struct.Struct(">BxL")  # PDU type, reserved, length (PS3.8 9.3.1)
_PDV = struct.Struct(">LBB")  # PDV item length, presentation context ID, message control header
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ITEM: Final = b"\xfe\xff\x00\xe0"
ITEM_DELIMITER: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def summary(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print one summary line past pytest's capture: what the run tried and what held."""
    with capsys.disabled():
        sys.stdout.write(f"\n[hostile] {line}\n")


def tree(directory: Path) -> set[str]:
    """Every path under `directory` except the index's own files (they change with every commit)."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if "index.sqlite" not in p.name}


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure (VmRSS, VmHWM) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def gateway_process(setup: GatewaySetup) -> ManagedProcess:
    """As `GatewaySetup.process()`, keeping the whole log: the tests read every line of it."""
    return ManagedProcess(
        [sys.executable, "-m", "gateway", "-c", str(setup.config), "run"],
        ready_line=READY_LINE,
        timeout=30.0,
        env={"PYTHONUNBUFFERED": "1"},
        cwd=REPO,
        tail_lines=1_000_000,
    )


# ---------------------------------------------------------------- seeds: valid objects to mutate


@dataclass(frozen=True)
class Seed:
    """One valid object: UIDs, transfer syntax, the encoded data set (inflated) and where headers start."""

    name: str
    modality: str
    syntax: str  # implicit, explicit, rle or deflated
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    plain: bytes
    headers: tuple[int, ...]

    def sibling(self, instance: int) -> Seed:
        """The same kind of object with another SOP Instance UID."""
        return make_seed(self.name, self.modality, self.syntax, instance=instance)

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax_uid == ImplicitVRLittleEndian

    @property
    def deflated(self) -> bool:
        return self.transfer_syntax_uid == DeflatedExplicitVRLittleEndian

    def wire(self, plain: bytes) -> bytes:
        """The bytes a peer sends for `plain`: deflated for the deflated transfer syntax."""
        return deflate(plain) if self.deflated else plain


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def add_sequences(ds: Dataset) -> None:
    """A small undefined-length SQ holding a defined-length one: both encodings get mutated too."""
    code = Dataset()
    code.CodeValue = "121311"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Localizer"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = True


def make_seed(name: str, modality: str, syntax: str, *, seed: int = 20261122, instance: int = 1) -> Seed:
    """A small object of `modality` in `syntax` (implicit, explicit, rle or deflated), with sequences."""
    spec = StudySpec(
        modality=modality,  # type: ignore[arg-type]
        images_per_series=1,
        rows=8,
        columns=8,
        transfer_syntax="explicit" if syntax == "deflated" else syntax,  # type: ignore[arg-type]
        seed=seed,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
    )
    ds = build_dataset(spec, InstanceRef(1, 1, instance))
    add_sequences(ds)
    plain = encode_dataset(ds)
    tags = {int(element.tag) for element in ds.iterall()} | {0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD}
    headers = set()
    for tag in tags:
        pattern = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        start = plain.find(pattern)
        while start >= 0:
            headers.add(start)
            start = plain.find(pattern, start + 1)
    transfer_syntax = (
        DeflatedExplicitVRLittleEndian if syntax == "deflated" else ds.file_meta.TransferSyntaxUID
    )
    return Seed(
        name,
        modality,
        syntax,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(transfer_syntax),
        plain,
        tuple(sorted(headers)),
    )


SEEDS: Final = (
    make_seed("ct-explicit", "CT", "explicit"),
    make_seed("mr-implicit", "MR", "implicit"),
    make_seed("ct-rle", "CT", "rle"),
    make_seed("mr-explicit", "MR", "explicit"),
    make_seed("ct-deflated", "CT", "deflated"),
)
# Transfer syntaxes a peer may claim for bytes encoded in another one (all are negotiable at the gateway).
CLAIMABLE: Final = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
)


# ---------------------------------------------------------------- mutations


KINDS: Final = (
    "flip",
    "truncate",
    "insert",
    "duplicate",
    "delete",
    "huge-length",
    "undefined-length",
    "strip-delimiters",
    "garbage-vr",
)


@dataclass(frozen=True)
class Mutation:
    """One change to an encoded data set; `at` picks a byte (or an element header) modulo what exists."""

    kind: str
    at: int
    size: int
    blob: bytes


def _length_field(data: bytes, header: int, implicit: bool) -> tuple[int, int]:
    """Where an element header's length field is, and its width (explicit short VRs have 2 bytes)."""
    if implicit or data[header + 2 : header + 4] == b"\xe0\xff" or data[header : header + 2] == b"\xfe\xff":
        return header + 4, 4
    if data[header + 4 : header + 6] in _LONG_VRS:
        return header + 8, 4
    return header + 6, 2


def mutate(seed: Seed, data: bytes, mutation: Mutation) -> bytes:  # noqa: C901, PLR0911 - one branch per kind
    """Apply one mutation; header-aimed kinds use the seed's header offsets (they may have shifted: fine)."""
    out = bytearray(data)
    position = mutation.at % (len(out) + 1)
    size, blob = mutation.size, mutation.blob
    kind = mutation.kind
    if kind == "flip":
        if out:
            out[position % len(out)] ^= 1 << (size % 8)
        return bytes(out)
    if kind == "truncate":
        return bytes(out[:position])
    if kind == "insert":
        return bytes(out[:position] + blob * (1 + size % 4) + out[position:])
    if kind == "duplicate":
        return bytes(out[: position + size] + out[position : position + size] + out[position + size :])
    if kind == "delete":
        return bytes(out[:position] + out[position + size :])
    if kind == "strip-delimiters":
        return bytes(out).replace(SEQUENCE_DELIMITER, b"").replace(ITEM_DELIMITER, b"")
    header = seed.headers[mutation.at % len(seed.headers)]
    if header + 12 > len(out):
        return bytes(out)
    where, width = _length_field(bytes(out), header, seed.implicit)
    if kind == "huge-length":
        choices = (
            (0xFFFFFFFE, 0x7FFFFFFF, 0x00FFFFFF, len(out) + size, size) if width == 4 else (0xFFFF, 0xFFFE)
        )
        value = choices[size % len(choices)]
        out[where : where + width] = value.to_bytes(width, "little")
        return bytes(out)
    if kind == "undefined-length":
        # An undefined length with no delimiter anywhere after it: the reader must stop at the end.
        if width == 2:  # a short VR cannot say "undefined": retype it to UN, which can
            out[header + 4 : header + 8] = b"UN\x00\x00"
            where = header + 8
        out[where : where + 4] = b"\xff\xff\xff\xff"
        tail = bytes(out[where + 4 :]).replace(SEQUENCE_DELIMITER, b"").replace(ITEM_DELIMITER, b"")
        return bytes(out[: where + 4]) + tail
    # garbage-vr: a known VR in the wrong place, or two arbitrary bytes
    vrs = (b"SQ", b"UN", b"OB", b"OW", b"UT", b"IS", b"US", b"FD", b"AT", b"XX", b"\x00\x00")
    vr = vrs[size % len(vrs)] if size % 3 else (blob * 2)[:2]
    out[header + 4 : header + 6] = vr
    return bytes(out)


def mutate_all(seed: Seed, mutations: list[Mutation] | tuple[Mutation, ...]) -> bytes:
    data = seed.plain
    for mutation in mutations:
        data = mutate(seed, data, mutation)
    return data


def random_mutations(rng: random.Random) -> list[Mutation]:
    """The over-the-wire run draws its mutations from a seeded PRNG (hypothesis drives the in-process one)."""
    return [
        Mutation(
            rng.choice(KINDS), rng.randrange(1 << 16), rng.randint(1, 512), rng.randbytes(rng.randint(1, 32))
        )
        for _ in range(rng.randint(1, 3))
    ]


# ---------------------------------------------------------------- in-process: the spool's own parsing


@dataclass(frozen=True)
class FuzzCase:
    seed: Seed
    mutations: tuple[Mutation, ...]
    claimed_syntax: str
    source_ae: str
    split: int
    stream_flip: int | None  # deflated seeds: a bit flipped in the compressed stream itself

    def wire_bytes(self) -> bytes:
        data = self.seed.wire(mutate_all(self.seed, self.mutations))
        if self.stream_flip is not None and data:
            flipped = bytearray(data)
            flipped[self.stream_flip % len(flipped)] ^= 1 << (self.stream_flip % 8)
            data = bytes(flipped)
        return data


MUTATIONS = st.builds(
    Mutation,
    kind=st.sampled_from(KINDS),
    at=st.integers(0, 1 << 16),
    size=st.integers(1, 600),
    blob=st.binary(min_size=1, max_size=32),
)


@st.composite
def fuzz_cases(draw: st.DrawFn) -> FuzzCase:
    seed = draw(st.sampled_from(SEEDS))
    return FuzzCase(
        seed=seed,
        mutations=tuple(draw(st.lists(MUTATIONS, min_size=1, max_size=4))),
        # Mostly the syntax the bytes are in; sometimes another one the gateway would negotiate too.
        claimed_syntax=draw(st.sampled_from((seed.transfer_syntax_uid,) * 4 + CLAIMABLE)),
        # The calling AE names the file meta's Source AE; pynetdicom admits ASCII only.
        source_ae=draw(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=16)),
        split=draw(st.integers(0, 1 << 16)),
        stream_flip=draw(st.none() | st.integers(0, 1 << 20)) if seed.deflated else None,
    )


def feed(spool: Spool, uid: str, meta: FileMetaSpec, data: bytes, split: int) -> FinishedObject | StoreError:
    """Drive one object through the spool as the receiver does: chunks written, the rest given to finish()."""
    cut = split % (len(data) + 1)
    writer = spool.open_object(uid, meta)
    try:
        if cut:
            writer.write(data[:cut])
        return writer.finish(DuplicatePolicy.REPLACE, data[cut:])
    except StoreError as exc:
        return exc


def check_accepted(spool: Spool, result: FinishedObject, uid: str, syntax: str, data: bytes) -> None:
    path = spool.path_for(result.file_name)
    assert result.file_name == f"{uid}.dcm"
    assert dataset_bytes(path) == data, "stored data set differs from the bytes received"
    meta = read_file_meta_info(path)
    assert (meta.TransferSyntaxUID, meta.MediaStorageSOPInstanceUID) == (syntax, uid)
    raw = path.read_bytes()
    assert raw[:128] == bytes(128), "preamble not zeroed"
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == (result.size_bytes, result.sha256)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_fuzzed_data_sets_end_stored_byte_exact_or_with_a_failure_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each mutated object ends stored byte for byte or refused with a failure status: nothing else."""
    root = tmp_path / "fuzz"
    spool = Spool(root / "state" / "spool", min_free_bytes=0)
    spool.prepare()
    empty_tree = tree(root)
    tally: collections.Counter[str] = collections.Counter()
    phi_in_warnings = 0

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=fuzz_cases())
    def check(case: FuzzCase) -> None:
        nonlocal phi_in_warnings
        uid = case.seed.sop_instance_uid
        data = case.wire_bytes()
        meta = FileMetaSpec(case.seed.sop_class_uid, uid, case.claimed_syntax, case.source_ae)
        # As in production: pydicom's warnings are printed, never raised (pytest would raise them here).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome = feed(spool, uid, meta, data, case.split)
        phi_in_warnings += any(secret in str(w.message) for w in caught for secret in PHI)
        files = sorted(path.name for path in spool.directory.iterdir())
        assert not [name for name in files if name.startswith(TEMP_PREFIX)], files
        if isinstance(outcome, StoreError):
            assert outcome.status in FAILURE_STATUSES, f"0x{outcome.status:04X} {outcome}"
            assert files == [], files
            assert tree(root) == empty_tree
            assert not any(secret in str(outcome) for secret in PHI), f"PHI in the error comment: {outcome}"
            tally[f"0x{outcome.status:04X} {outcome.reason}"] += 1
            return
        assert files == [f"{uid}.dcm"]
        assert tree(root) == empty_tree | {f"state/spool/{uid}.dcm"}
        check_accepted(spool, outcome, uid, case.claimed_syntax, data)
        spool.delete(outcome.file_name)
        tally["0x0000 stored byte-exact"] += 1

    check()
    tried = tally.total()
    kinds = ", ".join(f"{key}: {count}" for key, count in sorted(tally.items()))
    summary(
        capsys,
        f"spool fuzz: {tried} mutated objects ({len(SEEDS)} seeds, {len(KINDS)} mutation kinds) -> {kinds}; "
        f"other exceptions: 0; files outside the spool: 0; temp files left: 0; "
        f"examples whose pydicom warnings quoted PHI: {phi_in_warnings}",
    )
    assert tried >= FUZZ_EXAMPLES // 2  # hypothesis may stop early only on exhausting its search space
    assert tally["0x0000 stored byte-exact"] > 0, "no mutated object was stored: the harness tests nothing"
    assert tally.total() > tally["0x0000 stored byte-exact"], "nothing was refused: the mutations do nothing"


def _nested_sequences(depth: int) -> bytes:
    """(0008,1140) SQ of undefined length, `depth` levels deep, every level properly delimited."""
    opening = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + ITEM + b"\xff\xff\xff\xff"
    return opening * depth + (ITEM_DELIMITER + SEQUENCE_DELIMITER) * depth


def _swallowing_uid(data: bytes, until_tag: tuple[int, int]) -> bytes:
    """Stretch (0008,0018)'s 2-byte length over every element up to and including `until_tag`."""
    start = data.index(b"\x08\x00\x18\x00UI")
    target = data.index(struct.pack("<HH", *until_tag))
    (length,) = struct.unpack_from("<H", data, target + 6)
    end = target + 8 + length
    return data[: start + 6] + struct.pack("<H", end - start - 8) + data[start + 8 :]


_CT = SEEDS[0]
_PIXEL_HEADER = _CT.plain.index(b"\xe0\x7f\x10\x00")
EXTREMES: Final = {
    "empty": b"",
    "one-byte": b"\x08",
    "sequence-delimiter-only": SEQUENCE_DELIMITER,
    "item-at-top-level": ITEM + b"\x00\x00\x00\x00" + _CT.plain,
    "nested-sequences-3000-deep": _nested_sequences(3000) + _CT.plain,
    "pixel-data-undefined-length-no-delimiter": (
        _CT.plain[: _PIXEL_HEADER + 8] + b"\xff\xff\xff\xff" + _CT.plain[_PIXEL_HEADER + 12 :]
    ),
    "pixel-data-length-4-gib": _CT.plain[: _PIXEL_HEADER + 8]
    + b"\xfe\xff\xff\xff"
    + _CT.plain[_PIXEL_HEADER + 12 :],
    "uid-length-swallows-patient-module": _swallowing_uid(_CT.plain, (0x0010, 0x0020)),
    "trailing-garbage": _CT.plain + b"\x01\x02\x03",
    "zeros-256-kib": bytes(256 * 1024),
}


@pytest.mark.parametrize("name", list(EXTREMES))
def test_structural_extremes_end_in_a_failure_status_or_exact_storage(tmp_path: Path, name: str) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    data = EXTREMES[name]
    meta = FileMetaSpec(_CT.sop_class_uid, _CT.sop_instance_uid, _CT.transfer_syntax_uid, SCANNER_AE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # production prints pydicom's warnings; pytest would raise them
        outcome = feed(spool, _CT.sop_instance_uid, meta, data, split=len(data) // 2)
    if isinstance(outcome, StoreError):
        assert outcome.status in FAILURE_STATUSES, f"0x{outcome.status:04X} {outcome}"
        assert list(spool.directory.iterdir()) == []
    else:  # only a structure pydicom can walk is stored, and then byte for byte
        check_accepted(spool, outcome, _CT.sop_instance_uid, _CT.transfer_syntax_uid, data)


def test_deflated_data_set_cannot_inflate_beyond_a_bound(tmp_path: Path) -> None:
    """A 130 KB deflated object that inflates to 128 MiB must not cost 128 MiB of memory (invariant 4).

    Deflated Explicit VR Little Endian is negotiable at the receiver; the header walk inflates the whole
    data set into memory before walking it, so a peer controls the gateway's memory with a zip bomb.
    """
    header = SEEDS[0].plain[:_PIXEL_HEADER]
    inflated_size = 128 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(header + struct.pack("<HH2sxxI", 0x7FE0, 0x0010, b"OB", inflated_size))]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(inflated_size >> 20)]
    bomb = b"".join(parts) + compressor.flush()
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    meta = FileMetaSpec(
        SEEDS[0].sop_class_uid, SEEDS[0].sop_instance_uid, DeflatedExplicitVRLittleEndian, "X"
    )
    writer = spool.open_object(SEEDS[0].sop_instance_uid, meta)
    writer.write(bomb)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(StoreError):  # refusing it is fine; the memory is the point
                writer.finish(DuplicatePolicy.REPLACE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(bomb) < 200_000
    assert peak < 32 << 20, (
        f"finishing a {len(bomb)} byte deflated object peaked at {peak / 2**20:.0f} MiB "
        f"(it inflates to {inflated_size >> 20} MiB)"
    )


# ---------------------------------------------------------------- a requestor that writes every byte itself


def association_request(
    contexts: list[tuple[str, str]], calling: str = SCANNER_AE, max_pdu: int = 16384
) -> bytes:
    """An A-ASSOCIATE-RQ with one presentation context (IDs 1, 3, 5, ...) per (abstract, transfer) pair."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = GATEWAY_AE
    for number, (abstract, syntax) in enumerate(contexts):
        context = build_context(abstract, [syntax])
        context.context_id = 2 * number + 1
        primitive.presentation_context_definition_list.append(context)
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _element(group: int, element: int, value: bytes) -> bytes:
    """Implicit VR little endian, padded to even length (with NUL, as UIDs are)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", group, element, len(value)) + value


def _us(element: int, number: int) -> bytes:
    return struct.pack("<HHIH", 0, element, 2, number)


def store_command(message_id: int, sop_class_uid: bytes, sop_instance_uid: bytes) -> bytes:
    """A C-STORE-RQ command set whose UIDs are whatever bytes the caller gives."""
    body = (
        _element(0, 0x0002, sop_class_uid)
        + _us(0x0100, 0x0001)  # C-STORE-RQ
        + _us(0x0110, message_id)
        + _us(0x0700, 0)  # medium priority
        + _us(0x0800, 0x0000)  # a data set follows
        + _element(0, 0x1000, sop_instance_uid)
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def echo_command(message_id: int) -> bytes:
    body = _element(0, 0x0002, Verification.encode()) + _us(0x0100, 0x0030) + _us(0x0110, message_id)
    body += _us(0x0800, 0x0101)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


class RawScu:
    """A requestor speaking PS3.8 and PS3.7 byte for byte, so any bytes can stand where a UID belongs.

    `store()` returns the response's status, or None when the gateway aborted or closed the association.
    `answer` is how the request was met: accepted, rejected <result>,<source>,<reason>, or closed.
    Unless `require_accept` is False, anything but an A-ASSOCIATE-AC fails the test.
    """

    def __init__(
        self,
        port: int,
        contexts: list[tuple[str, str]],
        calling: str = SCANNER_AE,
        *,
        require_accept: bool = True,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~40 ms per request
        self.message_id = 0
        self.accepted: set[int] = set()
        self.peer_max = 16384
        self.aborted = True  # until the A-ASSOCIATE-AC is in
        self.ending = ""
        self.sock.sendall(association_request(contexts, calling))
        try:
            pdu_type, body = self.read_pdu()
        except (EOFError, ConnectionError):
            pdu_type, body = 0, b""
        if pdu_type != 0x02:
            self.close()
            self.answer = f"rejected {body[1]},{body[2]},{body[3]}" if pdu_type == 0x03 else "closed"
            if require_accept:
                pytest.fail(f"association not accepted: {self.answer} (PDU type 0x{pdu_type:02x})")
            return
        self.answer = "accepted"
        accept = A_ASSOCIATE_AC()
        accept.decode(_PDU.pack(pdu_type, len(body)) + body)
        primitive = accept.to_primitive()
        results = primitive.presentation_context_definition_results_list
        self.accepted = {int(cx.context_id or 0) for cx in results if cx.result == 0}
        self.peer_max = int(primitive.maximum_length_received or 16384)
        self.aborted = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, length = _PDU.unpack(self.read_exactly(6))
        return pdu_type, self.read_exactly(length)

    def send_message(self, context_id: int, payload: bytes, *, command: bool) -> None:
        room = self.peer_max - 6
        chunks = [payload[i : i + room] for i in range(0, len(payload), room)] or [b""]
        for number, chunk in enumerate(chunks):
            control = (0x01 if command else 0x00) | (0x02 if number == len(chunks) - 1 else 0x00)
            self.send_raw_pdv(context_id, control, chunk)

    def send_raw_pdv(
        self, context_id: int, control: int, fragment: bytes, pdv_length: int | None = None
    ) -> None:
        """One P-DATA-TF with one PDV; `pdv_length` may lie about the fragment's size."""
        length = len(fragment) + 2 if pdv_length is None else pdv_length
        pdv = _PDV.pack(length, context_id, control) + fragment
        self.sock.sendall(_PDU.pack(0x04, len(pdv)) + pdv)

    def response(self) -> int | None:
        """The status of the next response, or None (and `aborted`) if the gateway ends the association.

        `ending` then says how: A-ABORT, another PDU type, or closed.
        """
        command = b""
        try:
            while True:
                pdu_type, body = self.read_pdu()
                if pdu_type != 0x04:
                    self.aborted = True
                    self.ending = "A-ABORT" if pdu_type == 0x07 else f"PDU type 0x{pdu_type:02x}"
                    return None
                offset = 0
                while offset < len(body):
                    length, _, control = _PDV.unpack_from(body, offset)
                    command += body[offset + 6 : offset + 4 + length]
                    offset += 4 + length
                    if control & 0x02:
                        ds = decode(BytesIO(command), is_implicit_vr=True, is_little_endian=True)
                        return int(ds.Status)
        except (EOFError, ConnectionError):
            self.aborted = True
            self.ending = "closed"
            return None
        except TimeoutError:
            pytest.fail(f"no answer within {READ_TIMEOUT:g} s: the gateway neither answered nor aborted")

    def store(
        self, context_id: int, sop_class_uid: bytes, sop_instance_uid: bytes, dataset: bytes
    ) -> int | None:
        self.message_id += 1
        command = store_command(self.message_id, sop_class_uid, sop_instance_uid)
        # Should the gateway close while we send, what it said before that is the answer.
        with contextlib.suppress(ConnectionError):
            self.send_message(context_id, command, command=True)
            self.send_message(context_id, dataset, command=False)
        return self.response()

    def echo(self, context_id: int) -> int | None:
        self.message_id += 1
        self.send_message(context_id, echo_command(self.message_id), command=True)
        return self.response()

    def release(self) -> None:
        self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        pdu_type, _ = self.read_pdu()
        assert pdu_type == 0x06, f"expected A-RELEASE-RP, got PDU type 0x{pdu_type:02x}"
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------- over the wire


WIRE_CONTEXTS: Final = [(seed.sop_class_uid, seed.transfer_syntax_uid) for seed in SEEDS] + [
    (Verification, ImplicitVRLittleEndian)
]
ECHO_CONTEXT: Final = 2 * len(SEEDS) + 1
# The gateway does not negotiate Deflated Explicit VR LE (checking a deflated object means inflating it:
# a deflate bomb); that context must be refused, and the wire fuzz sends the other seeds.
WIRE_SEEDS: Final = tuple(seed for seed in SEEDS if not seed.deflated)
DEFLATED_CONTEXT: Final = 2 * next(n for n, seed in enumerate(SEEDS) if seed.deflated) + 1
FRAMING_FAULTS: Final = ("pdv-longer-than-pdu", "unknown-context", "command-flag-inside-data-set")


def send_framing_fault(scu: RawScu, context_id: int, seed: Seed, fault: str) -> None:
    """A C-STORE whose data set framing is broken: the gateway must abort the association."""
    scu.message_id += 1
    command = store_command(scu.message_id, seed.sop_class_uid.encode(), seed.sop_instance_uid.encode())
    scu.send_message(context_id, command, command=True)
    half = seed.plain[: len(seed.plain) // 2]
    if fault == "pdv-longer-than-pdu":
        scu.send_raw_pdv(context_id, 0x00, half, pdv_length=len(half) + 1000)
    elif fault == "unknown-context":
        scu.send_raw_pdv(0xFF, 0x02, half)
    else:  # a complete command set arrives where the data set's next fragment belongs
        scu.send_raw_pdv(context_id, 0x00, half)
        scu.send_raw_pdv(context_id, 0x03, command)


class HostilePeer:
    """Sends the extremes, then mutated objects on fresh UIDs, on one association after another."""

    def __init__(self, port: int, rng: random.Random) -> None:
        self.port = port
        self.rng = rng
        self.scu = RawScu(port, WIRE_CONTEXTS)
        self.associations = 1
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.accepted: dict[str, bytes] = {}  # UID -> the data set last answered 0x0000

    def object(self, number: int) -> tuple[Seed, Seed, bytes]:
        """(template, seed, bytes to send): the extremes first, all on one UID; then mutated seeds."""
        if number < len(EXTREMES):
            return _CT, _CT, list(EXTREMES.values())[number]
        template = WIRE_SEEDS[number % len(WIRE_SEEDS)]
        seed = template.sibling(number)
        return template, seed, seed.wire(mutate_all(seed, random_mutations(self.rng)))

    def send(self, number: int) -> None:
        if self.scu.aborted:
            self.scu.close()
            self.scu = RawScu(self.port, WIRE_CONTEXTS)
            self.associations += 1
        template, seed, data = self.object(number)
        context_id = 2 * SEEDS.index(template) + 1
        assert context_id in self.scu.accepted, f"{template.name}: context not accepted"
        assert DEFLATED_CONTEXT not in self.scu.accepted, "the deflated context must be refused"
        if number >= len(EXTREMES) and self.rng.random() < 0.05:
            fault = self.rng.choice(FRAMING_FAULTS)
            send_framing_fault(self.scu, context_id, seed, fault)
            status = self.scu.response()
            assert status is None, f"{fault}: answered 0x{status:04X} instead of an abort"
            assert self.scu.ending == "A-ABORT", f"{fault}: {self.scu.ending} instead of an A-ABORT"
            self.outcomes[f"abort ({fault})"] += 1
            return
        uids = seed.sop_class_uid.encode(), seed.sop_instance_uid.encode()
        status = self.scu.store(context_id, *uids, data)
        if status is None:
            self.outcomes[f"association ended ({self.scu.ending})"] += 1
            return
        assert status == 0x0000 or status in FAILURE_STATUSES, f"object {number}: 0x{status:04X}"
        self.outcomes[f"0x{status:04X}"] += 1
        if status == 0x0000:  # duplicate_policy replace: the last accepted copy is the file
            self.accepted[seed.sop_instance_uid] = data

    def finish(self) -> None:
        assert self.scu.echo(ECHO_CONTEXT) == 0x0000  # the hostile peer itself is still served
        self.scu.release()


def test_mutated_objects_over_the_wire_get_a_status_or_an_abort_and_others_are_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = write_config(tmp_path)
    spec = StudySpec(modality="CT", images_per_series=20, rows=16, columns=16, seed=8181)
    # Another peer stores a study at its own pace while the hostile one is at work.
    other = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec, rate=10.0)
    others: list[ScanResult] = []
    other_peer = threading.Thread(target=lambda: others.append(run_scanner(other)), name="other-peer")
    with gateway_process(setup) as gateway:
        assert gateway.pid is not None
        rss_before = proc_status_kib(gateway.pid, "VmRSS")
        before = tree(tmp_path)
        other_peer.start()
        hostile = HostilePeer(setup.port, random.Random(0xD1C0))  # noqa: S311 - reproducible, not secret
        try:
            for number in range(len(EXTREMES) + WIRE_OBJECTS):
                hostile.send(number)
            hostile.finish()
        finally:
            hostile.scu.close()
            other_peer.join(60)
        assert gateway.running
        assert echo(setup.port) == 0x0000
        hwm = proc_status_kib(gateway.pid, "VmHWM")
        log = gateway.output()
    (other_result,) = others
    assert other_result.statuses == {0x0000: 20}, other_result.summary()
    assert {row["sop_instance_uid"] for row in setup.rows()} == set(hostile.accepted) | set(
        other_result.acked
    )
    for uid, data in hostile.accepted.items():
        assert dataset_bytes(setup.spool / f"{uid}.dcm") == data, uid
    assert not [p for p in setup.spool_files() if p.name.startswith(TEMP_PREFIX)]
    assert {path for path in tree(tmp_path) - before if not path.startswith("state/")} == set()
    assert "internal error" not in log
    assert "Traceback" not in log
    outcomes = hostile.outcomes
    statuses = ", ".join(f"{key}: {count}" for key, count in sorted(outcomes.items()))
    summary(
        capsys,
        f"wire fuzz: {outcomes.total()} hostile objects over {hostile.associations} associations -> "
        f"{statuses}; other peer 20/20 stored; gateway alive; RSS {rss_before // 1024} MiB before, "
        f"VmHWM {hwm // 1024} MiB",
    )
    assert outcomes["0x0000"] > 0
    assert outcomes["0xC000"] > 0


# ---------------------------------------------------------------- UIDs built to escape the spool


def hostile_uids(tmp_path: Path, token: str) -> dict[str, bytes]:
    # Lookalike digits are the point here: they must not pass for ASCII digits.
    return {
        "parent-dirs": f"../../../../../../../../../../tmp/dgw-escape-{token}".encode(),
        "absolute-path": f"{tmp_path}/absolute-{token}".encode(),
        "absolute-tmp": f"/tmp/dgw-escape-{token}".encode(),  # noqa: S108 - a hostile UID, never a path we use
        "embedded-parent": f"1.2.3/../../../escape-{token}".encode(),
        "backslash-parent": f"..\\..\\escape-{token}".encode(),
        "dot": b".",
        "dot-dot": b"..",
        "trailing-slash": b"1.2.3/",
        "nul-inside": f"1.2.3\x00/../../escape-{token}".encode(),
        "nul-only": b"\x00\x00",
        "sixty-five-digits": b"1" * 65,
        "very-long": b"1." + b"2" * 1000,
        "arabic-indic-digits": "١٫٢٫٣".encode(),  # noqa: RUF001
        "arabic-indic-digits-with-dots": "١.٢.٣".encode(),  # noqa: RUF001
        "fullwidth-digits": "１．２．３".encode(),  # noqa: RUF001
        "superscript-digits": "¹.².³".encode(),
        "invalid-utf8": b"\xff\xfe\xfd",
        "empty": b"",
        "spaces": b"    ",
        "double-dot": b"1..2",
        "leading-dot": b".1.2",
        "trailing-dot": b"1.2.",
        "newline": b"1.2\n3",
        "temp-file-name": f".tmp.1.2.3.{token}".encode(),
        "percent-encoded": b"%2e%2e%2fescape",
        "tilde": b"~/escape",
        "multi-valued": b"1.2.3\\4.5.6",
    }


def _with_dataset_uid(data: bytes, uid: bytes) -> bytes:
    """The data set with its (0008,0018) value replaced by `uid` (explicit VR, 2-byte length)."""
    start = data.index(b"\x08\x00\x18\x00UI")
    (length,) = struct.unpack_from("<H", data, start + 6)
    value = uid + (b"\x00" if len(uid) % 2 else b"")
    if len(value) > 0xFFFF:
        value = value[:0xFFFE]
    return data[: start + 6] + struct.pack("<H", len(value)) + value + data[start + 8 + length :]


def test_uids_built_to_escape_the_spool_never_name_a_file(tmp_path: Path) -> None:
    token = secrets.token_hex(4)
    uids = hostile_uids(tmp_path, token)
    setup = write_config(tmp_path)
    spec = StudySpec(modality="CT", images_per_series=2, rows=8, columns=8, seed=4242)
    template, good = (build_dataset(spec, InstanceRef(1, 1, n)) for n in (1, 2))
    data = encode_dataset(template)
    class_uid = str(template.SOPClassUID).encode()
    answers: dict[str, tuple[int | None, int | None]] = {}
    with gateway_process(setup) as gateway:
        before = tree(tmp_path)
        contexts = [(str(template.SOPClassUID), ExplicitVRLittleEndian)]
        for name, uid in uids.items():
            with RawScu(setup.port, contexts) as scu:
                in_command = scu.store(1, class_uid, uid, data)
            # The command names a fresh valid UID; the data set's own SOP Instance UID is the hostile one.
            fresh = f"1.2.826.0.1.3680043.10.1234.9.{len(answers)}".encode()
            with RawScu(setup.port, contexts) as scu:
                in_dataset = scu.store(1, class_uid, fresh, _with_dataset_uid(data, uid))
            answers[name] = (in_command, in_dataset)
        with RawScu(setup.port, contexts) as scu:
            uid = str(good.SOPInstanceUID)
            assert scu.store(1, class_uid, uid.encode(), encode_dataset(good)) == 0x0000
            scu.release()
        assert gateway.running
        log = gateway.output()
    # In the command: an invalid UID. In the data set: one that differs from the command's (or, blank, none).
    shown = {
        name: tuple("abort" if a is None else f"0x{a:04X}" for a in pair) for name, pair in answers.items()
    }
    wrong = {
        name: pair
        for name, pair in shown.items()
        if pair[0] != "0xC001" or pair[1] not in {"0xA900", "0xC000"}
    }
    assert wrong == {}, f"expected 0xC001 for the command's UID, 0xA900/0xC000 for the data set's: {wrong}"
    assert [p.name for p in setup.spool_files()] == [f"{good.SOPInstanceUID}.dcm"]
    assert [row["sop_instance_uid"] for row in setup.rows()] == [str(good.SOPInstanceUID)]
    assert tree(tmp_path) - before == {f"state/spool/{good.SOPInstanceUID}.dcm"}
    assert not list(Path("/tmp").glob(f"*{token}*"))  # noqa: S108 - where the absolute UIDs point
    assert not list(Path("/").glob(f"*{token}*"))
    assert "internal error" not in log


# ---------------------------------------------------------------- floods


class Flood:
    """Requestors released at once; each records how it was met, and the accepted ones hold on."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.barrier = threading.Barrier(size)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.met: list[str] = []  # RawScu.answer of each request, in the order they were met
        self.echoes: list[int] = []  # C-ECHO statuses on the accepted ones once the flood was turned away

    def note(self, kind: str) -> None:
        with self.lock:
            self.met.append(kind)

    def associate_blocking(self) -> None:
        self.barrier.wait()
        scu = RawScu(self.port, [(Verification, ImplicitVRLittleEndian)], "ECHOSCU", require_accept=False)
        try:
            self.note(scu.answer)
            if scu.answer == "accepted":
                self.release.wait(READ_TIMEOUT * 3)
                status = scu.echo(1)
                with self.lock:
                    self.echoes.append(-1 if status is None else status)
                scu.release()
        finally:
            scu.close()


def test_association_flood_beyond_max_associations_admits_four_and_turns_away_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = write_config(tmp_path, receiver_extra="max_associations = 4")
    flood = Flood(setup.port, 20)
    with gateway_process(setup) as gateway:
        assert gateway.pid is not None
        rss_before = proc_status_kib(gateway.pid, "VmRSS")
        threads = [threading.Thread(target=flood.associate_blocking, name=f"flood-{n}") for n in range(20)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: len(flood.met) == 20, 30, "all 20 requestors answered")
            rss_flood = proc_status_kib(gateway.pid, "VmRSS")
        finally:
            flood.release.set()
            for thread in threads:
                thread.join(60)
        spec = StudySpec(modality="CT", images_per_series=10, rows=16, columns=16, seed=5151)
        options = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec)
        after = run_scanner(options)
        hwm = proc_status_kib(gateway.pid, "VmHWM")
        log = gateway.output()
    kinds = collections.Counter(flood.met)
    summary(
        capsys,
        f"association flood: 20 concurrent, max_associations 4 -> {dict(kinds)}; echoes on the accepted "
        f"{flood.echoes}; scanner afterwards {dict(after.statuses)}; RSS {rss_before // 1024} MiB before, "
        f"{rss_flood // 1024} MiB at the peak of the flood (VmHWM {hwm // 1024} MiB)",
    )
    assert kinds["accepted"] == 4, kinds
    assert flood.echoes == [0x0000] * 4
    # transient, service provider (presentation), local limit exceeded; or closed at the connection cap
    assert set(kinds) - {"accepted"} <= {"rejected 2,3,2", "closed"}, kinds
    assert kinds["closed"] == log.count("too many open connections")
    assert after.statuses == {0x0000: 10}, after.summary()
    assert rss_flood - rss_before < 50 * 1024, f"RSS grew {(rss_flood - rss_before) // 1024} MiB"


def test_idle_tcp_connections_do_not_take_association_slots(tmp_path: Path) -> None:
    """Eight connections that never send a PDU (fewer than the connection cap, 2 x 4 + 8) hold no slot.

    A connection only becomes an association once its A-ASSOCIATE-RQ is accepted; until then it waits
    under ARTIM. Counting it toward max_associations lets anyone who can open TCP connections, before
    any AE title or address check, turn every scanner away.
    """
    setup = write_config(tmp_path, receiver_extra="max_associations = 4", acse_timeout="30s")
    with gateway_process(setup) as gateway:
        sockets = _sockets(gateway.pid or 0)
        idle = [socket.create_connection(("127.0.0.1", setup.port), timeout=READ_TIMEOUT) for _ in range(8)]
        try:
            wait_until(lambda: _sockets(gateway.pid or 0) >= sockets + 8, 10, "the gateway to take all 8")
            with RawScu(setup.port, [(Verification, ImplicitVRLittleEndian)], calling="ECHOSCU") as scu:
                assert scu.echo(1) == 0x0000
                scu.release()
        finally:
            for sock in idle:
                sock.close()


def _sockets(pid: int) -> int:
    """Open sockets of a process: an accepted connection shows up here once the gateway has taken it."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += str(fd.readlink()).startswith("socket:")
    return count


def test_connection_flood_of_silent_peers_is_dropped_at_artim_and_the_gateway_serves_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = write_config(tmp_path, acse_timeout="1s")  # max_associations 10: connection cap 28
    flood = 60
    with gateway_process(setup) as gateway:
        assert gateway.pid is not None
        rss_before = proc_status_kib(gateway.pid, "VmRSS")
        started = time.monotonic()
        sockets = [
            socket.create_connection(("127.0.0.1", setup.port), timeout=READ_TIMEOUT) for _ in range(flood)
        ]
        ended: list[float] = []
        answers: collections.Counter[str] = collections.Counter()
        for sock in sockets:
            with sock:
                try:
                    data = b""
                    while chunk := sock.recv(64):
                        data += chunk
                except ConnectionResetError:
                    data = b"<reset>"
                ended.append(time.monotonic() - started)
                answers[
                    "A-ABORT" if data.startswith(b"\x07") else "closed" if not data else data[:8].hex()
                ] += 1
        rss_flood = proc_status_kib(gateway.pid, "VmRSS")
        assert echo(setup.port) == 0x0000
        spec = StudySpec(modality="CT", images_per_series=5, rows=16, columns=16, seed=5252)
        options = ScanOptions(port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=spec)
        after = run_scanner(options)
        assert gateway.running
    summary(
        capsys,
        f"connection flood: {flood} silent TCP connections, acse_timeout 1 s -> {dict(answers)}, all gone "
        f"after {max(ended):.2f} s; then C-ECHO 0x0000 and {dict(after.statuses)}; "
        f"RSS {rss_before // 1024} -> {rss_flood // 1024} MiB",
    )
    assert set(answers) <= {"A-ABORT", "closed", "<reset>"}, answers
    assert max(ended) < 1.0 + 2.0, f"the last silent peer was dropped after {max(ended):.2f} s"
    assert after.statuses == {0x0000: 5}, after.summary()
    assert rss_flood - rss_before < 30 * 1024
