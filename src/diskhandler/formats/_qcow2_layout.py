"""qcow2 on-disk structures: header, header extensions, snapshot table, and their validation.

Layouts follow qemu's ``docs/interop/qcow2.txt`` (qcow2 format specification, versions 2 and 3):
all integers are big-endian. Nothing here allocates memory sized by a header field before that field
has been checked against a sanity cap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from diskhandler.errors import ImageFormatError, UnsupportedImageError
from diskhandler.formats._layout import Layout, binary_layout, ffield
from diskhandler.formats._stream import pread_exact

__all__ = [
    "AUTOCLEAR_OFFSET",
    "COMPAT_LAZY_REFCOUNTS",
    "EXT_BACKING_FORMAT",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT",
    "INCOMPAT_DATA_FILE",
    "INCOMPAT_DIRTY",
    "INCOMPAT_EXTENDED_L2",
    "INCOMPAT_OFFSET",
    "KNOWN_INCOMPAT",
    "L1_OFFSET_FIELD",
    "MAGIC",
    "MAX_L1_BYTES",
    "MAX_REFTABLE_BYTES",
    "REFTABLE_OFFSET_FIELD",
    "HeaderExtension",
    "QCow2Header",
    "QCow2HeaderV2",
    "QCow2HeaderV3",
    "SnapshotEntryHeader",
    "SnapshotInfo",
    "parse_header",
    "parse_snapshots",
]

MAGIC = b"QFI\xfb"

# Incompatible feature bits (header offset 72).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0

# Byte offsets of header fields that a writer patches in place.
L1_OFFSET_FIELD = 36  # l1_size (u32) followed by l1_table_offset (u64)
REFTABLE_OFFSET_FIELD = 48  # refcount_table_offset (u64) followed by refcount_table_clusters (u32)
INCOMPAT_OFFSET = 72
AUTOCLEAR_OFFSET = 88

# Header extension types.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Sanity caps (the same limits qemu enforces).
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_BACKING_NAME = 1023
MAX_VIRTUAL_SIZE = 1 << 61


# mypy's attrs plugin knows ``attrs.frozen`` but not ``binary_layout``, which applies it: let the type
# checker see the former so that the generated __init__ is checked.
if TYPE_CHECKING:
    from attrs import frozen as _big_endian
else:
    _big_endian = binary_layout(">")


@_big_endian
class QCow2HeaderV2(Layout):
    """The first 72 bytes, common to versions 2 and 3."""

    magic: bytes = ffield("4s")
    version: int = ffield("I")
    backing_file_offset: int = ffield("Q")
    backing_file_size: int = ffield("I")
    cluster_bits: int = ffield("I")
    size: int = ffield("Q")
    crypt_method: int = ffield("I")
    l1_size: int = ffield("I")
    l1_table_offset: int = ffield("Q")
    refcount_table_offset: int = ffield("Q")
    refcount_table_clusters: int = ffield("I")
    nb_snapshots: int = ffield("I")
    snapshots_offset: int = ffield("Q")


@_big_endian
class QCow2HeaderV3(Layout):
    """Bytes 72..104 of a version 3 header."""

    incompatible_features: int = ffield("Q")
    compatible_features: int = ffield("Q")
    autoclear_features: int = ffield("Q")
    refcount_order: int = ffield("I")
    header_length: int = ffield("I")


@_big_endian
class HeaderExtension(Layout):
    """The 8 bytes before each header extension's data (padded to 8 bytes)."""

    type: int = ffield("I")
    length: int = ffield("I")


@_big_endian
class SnapshotEntryHeader(Layout):
    """The fixed 40 bytes of a snapshot table entry; extra data, id and name follow."""

    l1_table_offset: int = ffield("Q")
    l1_size: int = ffield("I")
    id_str_size: int = ffield("H")
    name_size: int = ffield("H")
    date_sec: int = ffield("I")
    date_nsec: int = ffield("I")
    vm_clock_nsec: int = ffield("Q")
    vm_state_size: int = ffield("I")
    extra_data_size: int = ffield("I")


@attrs.frozen
class QCow2Header:
    """A validated qcow2 header with its extensions."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)


@attrs.frozen
class SnapshotInfo:
    """One internal snapshot, as ``qemu-img snapshot -l`` lists it.

    Attributes:
        id: the snapshot's id string (qemu numbers them ``"1"``, ``"2"``, ...).
        name: the snapshot's name (the tag given to ``qemu-img snapshot -c``).
        date: seconds since the epoch when it was taken (float, with the nanoseconds).
        vm_clock_nsec: the guest's run time at that moment, in nanoseconds.
        vm_state_size: bytes of saved VM state (0 for a disk-only snapshot).
        disk_size: the virtual disk size at that moment.
        l1_table_offset: where the snapshot's L1 table is.
        l1_size: entries in that L1 table.
    """

    id: str
    name: str
    date: float
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    l1_table_offset: int
    l1_size: int


def _err(path: Path, field: str, message: str) -> ImageFormatError:
    return ImageFormatError(path, field, message)


def parse_header(head: bytes, file_size: int, path: Path) -> QCow2Header:
    """Parse and validate a header from the first cluster's bytes (``head``, at least 4 KiB if present)."""
    base = QCow2HeaderV2.from_bytes(head, path)
    if base.magic != MAGIC:
        raise _err(path, "magic", f"not a qcow2 image (magic {base.magic!r}, expected {MAGIC!r})")
    if base.version not in (2, 3):
        hint = " (the old qcow format: convert it with qemu-img convert -O qcow2)"
        raise UnsupportedImageError(
            path, "version", f"qcow2 version {base.version} is not 2 or 3{hint if base.version == 1 else ''}"
        )
    if not 9 <= base.cluster_bits <= 21:
        raise _err(path, "cluster_bits", f"{base.cluster_bits} is outside 9..21 (512 B to 2 MiB clusters)")
    cs = 1 << base.cluster_bits
    if base.crypt_method != 0:
        kind = {1: "AES", 2: "LUKS"}.get(base.crypt_method, f"method {base.crypt_method}")
        raise UnsupportedImageError(
            path,
            "crypt_method",
            f"encrypted qcow2 ({kind}) is not supported; decrypt it with qemu-img convert",
        )
    if base.version == 3:
        v3 = QCow2HeaderV3.from_bytes(head[QCow2HeaderV2.SIZE :], path)
        header_length = v3.header_length
        if header_length < 104 or header_length % 8 or header_length > cs:
            raise _err(path, "header_length", f"{header_length} must be >= 104, a multiple of 8, <= cluster")
        incompat, compat, autoclear = v3.incompatible_features, v3.compatible_features, v3.autoclear_features
        refcount_order = v3.refcount_order
    else:
        header_length, incompat, compat, autoclear, refcount_order = 72, 0, 0, 0, 4
    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        raise UnsupportedImageError(
            path,
            "incompatible_features",
            f"unknown incompatible feature bits {unknown:#x}; refusing it",
        )
    if incompat & INCOMPAT_DATA_FILE:
        raise UnsupportedImageError(
            path, "incompatible_features", "images with an external data file are not supported"
        )
    if refcount_order > 6:
        raise _err(path, "refcount_order", f"{refcount_order} is above 6 (64-bit refcounts)")
    compression_type = 0
    if header_length > 104:
        if len(head) <= 104:
            raise _err(path, "header_length", "header is truncated")
        compression_type = head[104]
    if compression_type not in (0, 1):
        raise UnsupportedImageError(path, "compression_type", f"unknown compression type {compression_type}")
    if bool(compression_type) != bool(incompat & INCOMPAT_COMPRESSION):
        raise _err(path, "compression_type", "compression type and its incompatible feature bit disagree")
    if incompat & INCOMPAT_EXTENDED_L2 and base.cluster_bits < 14:
        raise _err(path, "cluster_bits", "extended L2 entries need clusters of at least 16 KiB")
    if base.size > MAX_VIRTUAL_SIZE:
        raise _err(path, "size", f"virtual size {base.size} is absurd")
    l2_entries = cs // (16 if incompat & INCOMPAT_EXTENDED_L2 else 8)
    needed_l1 = -(-base.size // (cs * l2_entries))
    if base.l1_size * 8 > MAX_L1_BYTES:
        raise _err(path, "l1_size", f"{base.l1_size} entries exceed the {MAX_L1_BYTES >> 20} MiB cap")
    if base.l1_size < needed_l1:
        raise _err(path, "l1_size", f"{base.l1_size} entries cannot map {base.size} bytes (need {needed_l1})")
    for name, value in (
        ("l1_table_offset", base.l1_table_offset),
        ("refcount_table_offset", base.refcount_table_offset),
        ("snapshots_offset", base.snapshots_offset),
    ):
        if value % cs:
            raise _err(path, name, f"{value:#x} is not aligned to the {cs}-byte cluster size")
        if value > file_size + (1 << 40):
            raise _err(path, name, f"{value:#x} lies far beyond the end of the file")
    if base.l1_size and not base.l1_table_offset:
        raise _err(path, "l1_table_offset", "0 with a non-empty L1 table")
    if base.refcount_table_clusters * cs > MAX_REFTABLE_BYTES or base.refcount_table_clusters == 0:
        raise _err(path, "refcount_table_clusters", f"{base.refcount_table_clusters} is not a sane size")
    if base.nb_snapshots > MAX_SNAPSHOTS:
        raise _err(path, "nb_snapshots", f"{base.nb_snapshots} exceeds {MAX_SNAPSHOTS}")

    backing_file: str | None = None
    if base.backing_file_offset:
        if base.backing_file_size > MAX_BACKING_NAME or base.backing_file_size == 0:
            raise _err(path, "backing_file_size", f"{base.backing_file_size} is not within 1..1023")
        end = base.backing_file_offset + base.backing_file_size
        if base.backing_file_offset < header_length or end > cs:
            raise _err(path, "backing_file_offset", "backing file name lies outside the first cluster")
        if end > len(head):
            raise _err(path, "backing_file_offset", "file ends inside the backing file name")
        raw_name = head[base.backing_file_offset : end]
        if b"\0" in raw_name:
            raise _err(path, "backing_file_offset", "backing file name contains a NUL byte")
        backing_file = os.fsdecode(raw_name)

    backing_format = _parse_extensions(head, header_length, base, cs, path)
    return QCow2Header(
        version=base.version,
        cluster_bits=base.cluster_bits,
        size=base.size,
        l1_size=base.l1_size,
        l1_table_offset=base.l1_table_offset,
        refcount_table_offset=base.refcount_table_offset,
        refcount_table_clusters=base.refcount_table_clusters,
        nb_snapshots=base.nb_snapshots,
        snapshots_offset=base.snapshots_offset,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        backing_file=backing_file,
        backing_format=backing_format,
    )


def _parse_extensions(
    head: bytes, header_length: int, base: QCow2HeaderV2, cs: int, path: Path
) -> str | None:
    """Walk the header extensions; return the backing format name, if any."""
    end = base.backing_file_offset if base.backing_file_offset else min(cs, len(head))
    pos = header_length
    backing_format: str | None = None
    while pos + HeaderExtension.SIZE <= end:
        ext = HeaderExtension.from_bytes(head[pos:], path)
        pos += HeaderExtension.SIZE
        if ext.type == EXT_END:
            break
        if pos + ext.length > end:
            raise _err(path, "header extension", f"extension {ext.type:#x} runs past the header area")
        data = head[pos : pos + ext.length]
        if ext.type == EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", "replace")
        pos += (ext.length + 7) & ~7
    return backing_format


def parse_snapshots(fd: int, header: QCow2Header, path: Path) -> list[SnapshotInfo]:
    """Read the snapshot table (bounded by qemu's caps)."""
    result: list[SnapshotInfo] = []
    pos = header.snapshots_offset
    if header.nb_snapshots and not pos:
        raise _err(path, "snapshots_offset", "0 although the image has snapshots")
    limit = pos + MAX_SNAPSHOT_TABLE_BYTES
    for index in range(header.nb_snapshots):
        field = f"snapshot table entry {index}"
        fixed = SnapshotEntryHeader.from_bytes(
            pread_exact(fd, pos, SnapshotEntryHeader.SIZE, path, field), path
        )
        if fixed.l1_size * 8 > MAX_L1_BYTES:
            raise _err(path, field, f"L1 size {fixed.l1_size} exceeds the cap")
        if fixed.l1_table_offset % header.cluster_size:
            raise _err(path, field, f"L1 table offset {fixed.l1_table_offset:#x} is not cluster aligned")
        if fixed.extra_data_size > 1024:
            raise _err(path, field, f"extra data size {fixed.extra_data_size} exceeds 1024")
        var_len = fixed.extra_data_size + fixed.id_str_size + fixed.name_size
        var = pread_exact(fd, pos + SnapshotEntryHeader.SIZE, var_len, path, field)
        extra = var[: fixed.extra_data_size]
        disk_size = header.size
        vm_state_size = fixed.vm_state_size
        if len(extra) >= 8:
            vm_state_size = int.from_bytes(extra[0:8], "big")
        if len(extra) >= 16:
            disk_size = int.from_bytes(extra[8:16], "big")
        ids = var[fixed.extra_data_size : fixed.extra_data_size + fixed.id_str_size]
        name = var[fixed.extra_data_size + fixed.id_str_size :]
        result.append(
            SnapshotInfo(
                id=ids.decode("utf-8", "replace"),
                name=name.decode("utf-8", "replace"),
                date=fixed.date_sec + fixed.date_nsec / 1e9,
                vm_clock_nsec=fixed.vm_clock_nsec,
                vm_state_size=vm_state_size,
                disk_size=disk_size,
                l1_table_offset=fixed.l1_table_offset,
                l1_size=fixed.l1_size,
            )
        )
        pos += (SnapshotEntryHeader.SIZE + var_len + 7) & ~7
        if pos > limit:
            raise _err(path, "snapshots_offset", "snapshot table exceeds 64 MiB")
    return result
