"""Synthetic pixel data, native or RLE Lossless, cheap enough for load tests and with no numpy.

Each frame is stacked from a few dozen rotations of one seeded row (a noisy gradient), so making a frame is
a join of cached rows, and RLE encoding (PackBits per row, PS3.5 Annex G) is a join of cached encodings.

May import: stdlib only.
"""

from __future__ import annotations

import functools
import random
import struct
from dataclasses import dataclass

# Frames are built from this many rotations of one row: enough to look varied, few enough to cache.
_ROW_SHIFTS = 64


@dataclass(frozen=True)
class ImageGeometry:
    """The Image Pixel module's shape: what a buffer of pixels means."""

    rows: int
    columns: int
    frames: int
    samples: int  # 1 (MONOCHROME2) or 3 (RGB, interleaved: Planar Configuration 0)
    bits_stored: int  # 8 or fewer: 8 bits allocated; more: 16

    @property
    def bytes_per_sample(self) -> int:
        """Bytes allocated per sample."""
        return 1 if self.bits_stored <= 8 else 2


def native_pixel_data(key: str, geometry: ImageGeometry, variant: int) -> bytes:
    """Return every frame uncompressed (little endian), padded to even length as the value is sent.

    `key` seeds the row pattern; `variant` (an instance number) shifts it, so objects differ.
    """
    rotations = _row_rotations(key, geometry)
    data = b"".join(
        rotations[(row + offset) % _ROW_SHIFTS]
        for offset in _frame_offsets(geometry, variant)
        for row in range(geometry.rows)
    )
    # Odd-length values are padded to even length (PS3.5 7.1.1); pad here so the value is what is sent.
    return data + b"\x00" * (len(data) % 2)


def rle_frames(key: str, geometry: ImageGeometry, variant: int) -> list[bytes]:
    """Return the same pixels as `native_pixel_data`, one RLE Lossless frame each, ready to encapsulate."""
    packed = _packed_rotations(key, geometry)
    return [_rle_frame(packed, geometry.rows, offset) for offset in _frame_offsets(geometry, variant)]


def _frame_offsets(geometry: ImageGeometry, variant: int) -> list[int]:
    return [7 * variant + 3 * frame for frame in range(geometry.frames)]


@functools.lru_cache(maxsize=8)
def _row_rotations(key: str, geo: ImageGeometry) -> tuple[bytes, ...]:
    """Return rotations of one seeded row: a noisy gradient, samples interleaved, little endian."""
    rng = random.Random(key)  # noqa: S311 - seeded test data, not secrets
    max_value = (1 << geo.bits_stored) - 1
    noise = max_value // 24 + 1
    values = [
        min(
            max_value,
            ((x + sample * geo.columns // 3) % geo.columns) * max_value // geo.columns + rng.randrange(noise),
        )
        for x in range(geo.columns)
        for sample in range(geo.samples)
    ]
    row = bytes(values) if geo.bytes_per_sample == 1 else struct.pack(f"<{len(values)}H", *values)
    pixel_size = geo.samples * geo.bytes_per_sample
    doubled = row + row
    return tuple(doubled[(shift % geo.columns) * pixel_size :][: len(row)] for shift in range(_ROW_SHIFTS))


@functools.lru_cache(maxsize=8)
def _packed_rotations(key: str, geo: ImageGeometry) -> tuple[tuple[bytes, ...], ...]:
    """Return the PackBits encoding of every rotation, one tuple per RLE segment (byte plane)."""
    planes = geo.samples * geo.bytes_per_sample
    rotations = _row_rotations(key, geo)
    # PS3.5 G.2: segments run sample by sample, most significant byte first within a sample.
    order = [
        s * geo.bytes_per_sample + b
        for s in range(geo.samples)
        for b in reversed(range(geo.bytes_per_sample))
    ]
    return tuple(tuple(_packbits(row[plane::planes]) for row in rotations) for plane in order)


def _rle_frame(packed: tuple[tuple[bytes, ...], ...], rows: int, offset: int) -> bytes:
    """Return one RLE Lossless frame: the 64-byte header, then one segment per byte plane."""
    segments = []
    for plane in packed:
        segment = b"".join(plane[(row + offset) % _ROW_SHIFTS] for row in range(rows))
        segments.append(segment + b"\x00" * (len(segment) % 2))
    offsets = [64]
    for segment in segments[:-1]:
        offsets.append(offsets[-1] + len(segment))
    header = struct.pack(f"<{1 + len(offsets)}L", len(segments), *offsets).ljust(64, b"\x00")
    return header + b"".join(segments)


def _packbits(row: bytes) -> bytes:
    """Encode one row with the PackBits scheme of PS3.5 G.3.1 (runs never cross a row boundary)."""
    out = bytearray()
    size, i = len(row), 0
    while i < size:
        run_end = i + 1
        while run_end < size and run_end - i < 128 and row[run_end] == row[i]:
            run_end += 1
        if run_end - i > 1:
            out += bytes((257 - (run_end - i), row[i]))  # replicate run: header is 1 - count
            i = run_end
            continue
        start = i
        i += 1
        # Extend the literal run until two equal bytes start a replicate run, or 128 bytes are taken.
        while i < size and i - start < 128 and not (i + 1 < size and row[i] == row[i + 1]):
            i += 1
        out.append(i - start - 1)
        out += row[start:i]
    return bytes(out)
