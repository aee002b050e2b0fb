"""Partition tables: read and write MBR (with EBR logical partitions) and GPT.

:func:`list_partitions` finds the partitions of any :class:`~diskhandler.formats.DiskImage` and returns
each as a :class:`Partition`, itself a ``DiskImage`` over its byte range of the disk. A disk without a
partition table (empty, or a filesystem written to the whole disk — a "superfloppy") gives ``[]``.
:func:`create_partition_table` lays out and writes a new table from :class:`PartitionSpec` items.

Numbering follows Linux: MBR primaries keep their slot (1-4), logical partitions of the extended
container are numbered from 5 in chain order, GPT partitions keep their slot index + 1 (sparse slots
leave gaps). Layouts: MBR/EBR after the IBM PC convention (UEFI 2.10 §5.2.1), GPT after UEFI 2.10 §5.3.

Damage that can be worked around (a damaged primary GPT with a good backup, an entry running past the
end of the disk) gives an :class:`~diskhandler.errors.ImageWarning`; damage that cannot (both GPT copies
bad, a looping EBR chain) raises :class:`~diskhandler.errors.PartitionTableError`.
"""

from __future__ import annotations

import html
import os
import re
import sys
import uuid
import warnings
import zlib
from collections.abc import Sequence
from typing import ClassVar

import attrs
from typing_extensions import override

from diskhandler.errors import ImageFormatError, ImageWarning, PartitionTableError, ReadOnlyImageError
from diskhandler.formats._layout import Layout, binary_layout, ffield
from diskhandler.formats._stream import DiskImage, DiskView
from diskhandler.lvm import LogicalVolume, list_logical_volumes

__all__ = [
    "GPT_TYPES",
    "MBR_TYPES",
    "LogicalVolume",
    "Partition",
    "PartitionSpec",
    "create_partition_table",
    "describe",
    "list_partitions",
]

SECTOR = 512
_SIGNATURE = b"\x55\xaa"
_GPT_MAGIC = b"EFI PART"
_GPT_REVISION = 0x00010000
_MBR_TABLE = 0x1BE
_PROTECTIVE = 0xEE
_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85, 0x1F, 0x91, 0x9B})
_MAX_LOGICALS = 1024  # Linux stops far earlier; this bounds a damaged chain
_MAX_GPT_ARRAY = 4 << 20  # bytes; the spec's minimum is 16 KiB, real tables use 16 KiB-64 KiB
_MAX_GPT_ENTRY = 4096
_GPT_ENTRIES = 128
_ARRAY_SECTORS = _GPT_ENTRIES * 128 // SECTOR  # 32
_MAX_MBR_LBA = 0xFFFFFFFF

# -- on-disk structures -------------------------------------------------------------------------------


@binary_layout("<", name="MBR partition entry")
class MbrEntry(Layout):
    """One 16-byte entry of an MBR or EBR table (offset 0x1BE + 16 x slot)."""

    status: int = ffield("B")  # 0x80 active, 0x00 inactive
    chs_first: bytes = ffield("3s")
    type: int = ffield("B")
    chs_last: bytes = ffield("3s")
    first_lba: int = ffield("I")  # MBR: absolute; EBR entry 1: relative to the EBR; link: to the container
    sectors: int = ffield("I")

    @property
    def empty(self) -> bool:
        return self.type == 0 or self.sectors == 0


@binary_layout("<", name="GPT header")
class GptHeader(Layout):
    """The GPT header (UEFI 2.10 §5.3.2, 92 bytes; the rest of its sector is zero)."""

    signature: bytes = ffield("8s")
    revision: int = ffield("I")
    header_size: int = ffield("I")
    header_crc: int = ffield("I")
    reserved: int = ffield("I")
    my_lba: int = ffield("Q")
    alternate_lba: int = ffield("Q")
    first_usable_lba: int = ffield("Q")
    last_usable_lba: int = ffield("Q")
    disk_guid: bytes = ffield("16s")
    entries_lba: int = ffield("Q")
    entry_count: int = ffield("I")
    entry_size: int = ffield("I")
    entries_crc: int = ffield("I")


@binary_layout("<", name="GPT partition entry")
class GptEntry(Layout):
    """One GPT partition entry (UEFI 2.10 §5.3.3); ``last_lba`` is inclusive."""

    type_guid: bytes = ffield("16s")
    unique_guid: bytes = ffield("16s")
    first_lba: int = ffield("Q")
    last_lba: int = ffield("Q")
    attributes: int = ffield("Q")
    name: bytes = ffield("72s")


# -- type names ---------------------------------------------------------------------------------------

#: MBR partition type byte → human name (the common ones).
MBR_TYPES: dict[int, str] = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "extended",
    0x06: "FAT16",
    0x07: "NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "extended",
    0x11: "hidden FAT12",
    0x1F: "extended",
    0x27: "Windows recovery",
    0x82: "Linux swap",
    0x83: "Linux filesystem",
    0x85: "extended",
    0x8E: "Linux LVM",
    0x91: "extended",
    0x9B: "extended",
    0xA5: "FreeBSD",
    0xA6: "OpenBSD",
    0xA9: "NetBSD",
    0xEE: "GPT protective",
    0xEF: "EFI System",
    0xFD: "Linux RAID",
}

#: GPT type GUID (upper case) → human name (the common ones).
GPT_TYPES: dict[str, str] = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
}

# spec.type alias → (MBR type byte, GPT type GUID); ``None`` where the scheme has no such type.
_ALIASES: dict[str, tuple[int | None, str | None]] = {
    "linux": (0x83, "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    "swap": (0x82, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
    "efi": (0xEF, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
    "fat32": (0x0C, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
    "ntfs": (0x07, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
    "basic-data": (0x07, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
    "lvm": (0x8E, "E6D6D379-F507-44C2-A23C-238F2A3DF928"),
    "raid": (0xFD, "A19D880F-05FC-4D3B-A006-743F0F84911E"),
    "bios-boot": (None, "21686148-6449-6E6F-744E-656564454649"),
}

_GUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
_HEX_RE = re.compile(r"^0[xX][0-9A-Fa-f]{1,2}$")


def _mbr_type_name(code: int) -> str:
    return MBR_TYPES.get(code, "unknown")


def _gpt_type_name(guid: str) -> str:
    return GPT_TYPES.get(guid, "unknown")


# -- the partition view -------------------------------------------------------------------------------


class Partition(DiskView):
    """One partition: a ``DiskImage`` over ``disk[start : start + size]``.

    Reads and writes go to the disk (writable iff the disk is). Closing a partition does not close the
    disk; closing the disk makes its partitions unusable.

    Attributes:
        number: MBR primaries 1-4 (their slot), logical partitions 5, 6, … in chain order;
            GPT: slot index + 1.
        start: byte offset of the partition in the disk.
        size: size in bytes.
        scheme: ``"mbr"`` or ``"gpt"``.
        type: MBR: the type byte as ``"0x83"``; GPT: the type GUID in upper case.
        type_name: a human name (``"Linux filesystem"``, ``"EFI System"``, ``"extended"``, …).
        name: the GPT partition name (``""`` on MBR).
        guid: the GPT unique partition GUID (``None`` on MBR).
        bootable: MBR active flag (0x80), or GPT attribute bit 2 (legacy BIOS bootable).
        attributes: the raw GPT attribute bits (0 on MBR).
    """

    format: ClassVar[str] = "partition"

    def __init__(
        self,
        disk: DiskImage,
        *,
        number: int,
        start: int,
        size: int,
        scheme: str,
        type: str,
        type_name: str,
        name: str = "",
        guid: str | None = None,
        bootable: bool = False,
        attributes: int = 0,
    ) -> None:
        super().__init__(disk, size=size, writable=disk.writable())
        self.number = number
        self.start = start
        self.scheme = scheme
        self.type = type
        self.type_name = type_name
        self.name = name
        self.guid = guid
        self.bootable = bootable
        self.attributes = attributes

    @property
    def end(self) -> int:
        """Byte offset just past the partition."""
        return self.start + self.size

    @property
    def key(self) -> str:
        """How to ask for it: ``"1"``, ``"5"``, ... (a logical volume's key is ``"VG/LV"``)."""
        return str(self.number)

    @property
    def view_name(self) -> str:
        """Its file name in a vdfuse view: ``PartitionN``."""
        return f"Partition{self.number}"

    @property
    def is_extended(self) -> bool:
        """Whether this is an MBR extended container (it holds the logical partitions, not data)."""
        return self.type_name == "extended"

    @override
    def _readinto_at(self, offset: int, buf: memoryview) -> None:
        self.disk.readinto_at(self.start + offset, buf)

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        self.disk.write_at(self.start + offset, data)

    @override
    def _view_label(self) -> str:
        return f"partition {self.number}"

    def _summary(self) -> str:
        label = f" name={self.name!r}" if self.name else ""
        boot = " bootable" if self.bootable else ""
        return (
            f"{self.scheme} #{self.number} start={self.start} size={self.size}"
            f" type={self.type} ({self.type_name}){label}{boot}"
        )

    @override
    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Partition {self._summary()} of {str(self.path)!r}{state}>"

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(repr(self))}</code>"


@attrs.frozen
class PartitionSpec:
    """One partition to create with :func:`create_partition_table`.

    Attributes:
        size: bytes (rounded up to whole 512-byte sectors); ``None`` = the rest of the disk (only the
            last partition may say so).
        type: ``"linux"``, ``"swap"``, ``"efi"``, ``"fat32"``, ``"ntfs"``/``"basic-data"``, ``"lvm"``,
            ``"raid"``, ``"bios-boot"`` (GPT only), a raw MBR type ``"0x83"`` (MBR only) or a type GUID
            (GPT only).
        name: the GPT partition name (at most 36 UTF-16 code units); must be empty on MBR.
        bootable: MBR active flag; GPT legacy-BIOS-bootable attribute (bit 2).
    """

    size: int | None = None
    type: str = "linux"
    name: str = ""
    bootable: bool = False


# -- reading --------------------------------------------------------------------------------------------


def _warn(disk: DiskImage, message: str) -> None:
    """Warn with ``ImageWarning``, pointing at the first caller outside this module."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    warnings.warn(f"{disk.path}: {message}", ImageWarning, stacklevel=level)


def _read(disk: DiskImage, offset: int, length: int) -> bytes:
    if offset < 0 or offset + length > disk.size:
        return b""
    return disk.read_at(offset, length)


def _mbr_entries(sector: bytes) -> list[MbrEntry]:
    return [MbrEntry.from_bytes(sector[_MBR_TABLE + 16 * i : _MBR_TABLE + 16 * (i + 1)]) for i in range(4)]


def _looks_like_boot_sector(sector: bytes) -> bool:
    """A filesystem boot sector (FAT, NTFS, exFAT) rather than an MBR: the disk is a superfloppy."""
    oem = sector[3:11]
    if oem in (b"NTFS    ", b"EXFAT   "):
        return True
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    if bytes_per_sector not in (512, 1024, 2048, 4096) or sector[0] not in (0xEB, 0xE9):
        return False
    return sector[0x36:0x39] == b"FAT" or sector[0x52:0x57] == b"FAT32"


def list_partitions(disk: DiskImage, *, lvm: bool = True) -> list[Partition | LogicalVolume]:
    """The partitions of ``disk`` in the order of their numbers, then its LVM logical volumes.

    Logical volumes (``VG/LV``, see :mod:`diskhandler.lvm`) are those of the volume groups whose
    physical volumes are on a partition of ``disk`` or on the whole disk; ``lvm=False`` leaves them
    out. ``[]`` when the disk has neither.

    GPT wins over MBR when the MBR holds a protective (0xEE) entry, hybrid MBRs included. GPT is looked
    for with 512- and 4096-byte logical sectors. An MBR extended container is listed too (its
    ``type_name`` is ``"extended"``), followed by its logical partitions numbered from 5.

    Raises:
        PartitionTableError: the table is damaged beyond use (both GPT copies bad, an EBR chain that
            loops or leaves its container, …); the message names the structure.

    Warns:
        ImageWarning: recoverable damage (the backup GPT was used, an entry was cut at the disk's end),
            or damaged LVM metadata (its volumes are left out; the partitions are still listed).
    """
    parts = _list_table(disk)
    if not lvm:
        return list(parts)
    try:
        volumes = list_logical_volumes(disk, parts)
    except ImageFormatError as exc:
        _warn(disk, f"LVM volumes left out: {exc}")
        volumes = []
    return [*parts, *volumes]


def _list_table(disk: DiskImage) -> list[Partition]:
    sector0 = _read(disk, 0, SECTOR)
    if len(sector0) < SECTOR:
        return []
    has_sig = sector0[510:512] == _SIGNATURE
    entries = _mbr_entries(sector0) if has_sig else []
    protective = any(e.type == _PROTECTIVE for e in entries)
    gpt_magic = {ss for ss in (SECTOR, 4096) if _read(disk, ss, 8) == _GPT_MAGIC}
    if protective:
        found = _read_gpt(disk, entries, gpt_magic, required=True)
        if isinstance(found, str):
            raise PartitionTableError(
                f"{disk.path}: the MBR is GPT-protective but no valid GPT header was found: {found}"
            )
        return found
    if gpt_magic and all(e.empty for e in entries):
        # A GPT whose protective MBR was wiped: still a GPT (Linux would need gpt= to see it).
        found = _read_gpt(disk, entries, gpt_magic, required=False)
        if isinstance(found, str):
            _warn(disk, f"an 'EFI PART' signature without a usable GPT: {found}")
        else:
            _warn(disk, "the disk has a GPT but no protective MBR in sector 0; the GPT was used")
            return found
    elif gpt_magic:
        # Like Linux: a GPT only counts behind a protective MBR. A real MBR with GPT leftovers is an MBR
        # disk that was repartitioned by a tool which did not clear the old GPT.
        _warn(disk, "an old GPT header was found behind a regular MBR; the MBR was used")
    if not has_sig:
        return []
    return _read_mbr(disk, sector0, entries)


# MBR --------------------------------------------------------------------------------------------------


def _read_mbr(disk: DiskImage, sector0: bytes, entries: list[MbrEntry]) -> list[Partition]:
    total = disk.size // SECTOR
    plausible = all(e.status in (0x00, 0x80) for e in entries) and all(
        e.empty or 1 <= e.first_lba < total for e in entries
    )
    if _looks_like_boot_sector(sector0) and (not plausible or all(e.empty for e in entries)):
        return []  # a filesystem on the whole disk ("superfloppy")
    bad = [i + 1 for i, e in enumerate(entries) if e.status not in (0x00, 0x80)]
    if bad:
        _warn(
            disk,
            f"sector 0 ends in 55AA but MBR entries {bad} have invalid status bytes (neither 0x00 nor"
            " 0x80); treating the disk as having no partition table",
        )
        return []
    parts: list[Partition] = []
    extended: MbrEntry | None = None
    for slot, e in enumerate(entries, start=1):
        if e.empty:
            continue
        if e.first_lba >= total:
            _warn(disk, f"MBR entry {slot} starts at LBA {e.first_lba}, past the disk's end; skipped")
            continue
        part = _clipped(disk, slot, e.first_lba, e.sectors, f"MBR entry {slot}")
        is_ext = e.type in _EXTENDED_TYPES
        if is_ext:
            if extended is not None:
                _warn(disk, f"MBR entry {slot} is a second extended container; its contents are ignored")
            else:
                extended = e
        parts.append(
            Partition(
                disk,
                number=slot,
                start=part[0],
                size=part[1],
                scheme="mbr",
                type=f"0x{e.type:02x}",
                type_name="extended" if is_ext else _mbr_type_name(e.type),
                bootable=e.status == 0x80,
            )
        )
    if extended is not None:
        parts.extend(_read_ebr_chain(disk, extended))
    return parts


def _clipped(disk: DiskImage, number: int, first_lba: int, sectors: int, what: str) -> tuple[int, int]:
    start = first_lba * SECTOR
    size = sectors * SECTOR
    if start + size > disk.size:
        _warn(
            disk,
            f"{what} (partition {number}) ends at byte {start + size}, past the {disk.size}-byte disk;"
            " cut at the disk's end",
        )
        size = disk.size - start
    return start, size


def _read_ebr_chain(disk: DiskImage, container: MbrEntry) -> list[Partition]:
    base = container.first_lba
    limit = min(base + container.sectors, disk.size // SECTOR)
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr = base
    number = 5
    for _ in range(_MAX_LOGICALS):
        if ebr in seen:
            raise PartitionTableError(
                f"{disk.path}: the EBR chain loops (the EBR at LBA {ebr} is linked twice)"
            )
        seen.add(ebr)
        if not base <= ebr < limit:
            raise PartitionTableError(
                f"{disk.path}: an EBR link points to LBA {ebr}, outside the extended container"
                f" (LBA {base}-{limit - 1})"
            )
        sector = _read(disk, ebr * SECTOR, SECTOR)
        if sector[510:512] != _SIGNATURE:
            raise PartitionTableError(f"{disk.path}: the EBR at LBA {ebr} lacks the 55AA signature")
        table = _mbr_entries(sector)
        # Like Linux: every data entry of an EBR is a logical partition (entries 3-4 only when they fit
        # the container, as they sometimes hold garbage); the first extended-type entry links onwards.
        for slot, data in enumerate(table):
            if data.empty or data.type in _EXTENDED_TYPES:
                continue
            first = ebr + data.first_lba
            inside = data.first_lba > 0 and first < limit
            if slot >= 2 and not (inside and first + data.sectors <= limit):
                continue
            if not inside:
                raise PartitionTableError(
                    f"{disk.path}: logical partition {number} (EBR at LBA {ebr}) starts at LBA {first},"
                    f" outside the extended container (LBA {base + 1}-{limit - 1})"
                )
            start, size = _clipped(
                disk, number, first, data.sectors, f"logical partition in EBR at LBA {ebr}"
            )
            parts.append(
                Partition(
                    disk,
                    number=number,
                    start=start,
                    size=size,
                    scheme="mbr",
                    type=f"0x{data.type:02x}",
                    type_name=_mbr_type_name(data.type),
                    bootable=data.status == 0x80,
                )
            )
            number += 1
        link = next((e for e in table if not e.empty and e.type in _EXTENDED_TYPES), None)
        if link is None:
            return parts
        ebr = base + link.first_lba
    raise PartitionTableError(f"{disk.path}: the EBR chain has more than {_MAX_LOGICALS} links")


# GPT --------------------------------------------------------------------------------------------------


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


def _header_problem(disk: DiskImage, raw: bytes, lba: int, ss: int) -> str | GptHeader:
    """The header at ``lba`` if it is valid, else what is wrong with it."""
    if len(raw) < GptHeader.SIZE:
        return "it lies beyond the end of the disk"
    h = GptHeader.from_bytes(raw)
    if h.signature != _GPT_MAGIC:
        return "no 'EFI PART' signature"
    if not GptHeader.SIZE <= h.header_size <= ss:
        return f"header size {h.header_size} is not within 92-{ss}"
    check = bytearray(raw[: h.header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != h.header_crc:
        return "header CRC32 mismatch"
    if h.my_lba != lba:
        return f"its my-LBA field says {h.my_lba}, but it was read from LBA {lba}"
    if h.entry_size < 128 or h.entry_size % 8 or h.entry_size > _MAX_GPT_ENTRY:
        return f"entry size {h.entry_size} is not a multiple of 8 within 128-{_MAX_GPT_ENTRY}"
    if h.entry_count * h.entry_size > _MAX_GPT_ARRAY:
        return f"{h.entry_count} entries of {h.entry_size} bytes exceed the {_MAX_GPT_ARRAY}-byte cap"
    total = disk.size // ss
    if not h.first_usable_lba <= h.last_usable_lba + 1 or h.last_usable_lba >= total:
        return f"usable LBAs {h.first_usable_lba}-{h.last_usable_lba} do not fit the {total}-sector disk"
    array_sectors = -(-h.entry_count * h.entry_size // ss)
    if h.entries_lba < 1 or h.entries_lba + array_sectors > total:
        return f"the entry array at LBA {h.entries_lba} does not fit the disk"
    return h


def _load_gpt(disk: DiskImage, lba: int, ss: int) -> tuple[GptHeader, bytes] | str:
    raw = _read(disk, lba * ss, ss)
    found = _header_problem(disk, raw, lba, ss)
    if isinstance(found, str):
        return found
    h = found
    array = _read(disk, h.entries_lba * ss, h.entry_count * h.entry_size)
    if zlib.crc32(array) != h.entries_crc:
        return f"entry array CRC32 mismatch (array at LBA {h.entries_lba})"
    return h, array


def _read_gpt(
    disk: DiskImage, entries: list[MbrEntry], magic: set[int], *, required: bool
) -> list[Partition] | str:
    """The GPT partitions, or (no valid GPT found) what is wrong with each header that was tried."""
    problems: list[str] = []
    sizes = sorted(magic) + [ss for ss in (SECTOR, 4096) if ss not in magic]
    for ss in sizes:
        total = disk.size // ss
        if total < 3:
            continue
        primary = _load_gpt(disk, 1, ss)
        if not isinstance(primary, str):
            _check_backup(disk, primary[0], ss)
            return _gpt_partitions(disk, *primary, ss)
        if ss in magic or required:
            problems.append(f"primary GPT header (LBA 1, {ss}-byte sectors): {primary}")
        # Where is the backup? The primary's alternate LBA when its header is readable, the protective
        # entry's end (the disk size when the table was made), and the last LBA.
        candidates: list[int] = []
        raw = _read(disk, ss, GptHeader.SIZE)
        if len(raw) == GptHeader.SIZE:
            alt = GptHeader.from_bytes(raw)
            if alt.signature == _GPT_MAGIC and 1 < alt.alternate_lba < total:
                candidates.append(alt.alternate_lba)
        for e in entries:
            if e.type == _PROTECTIVE and e.first_lba == 1 and 1 < e.sectors < total:
                candidates.append(e.sectors)
        candidates.append(total - 1)
        for lba in dict.fromkeys(candidates):
            backup = _load_gpt(disk, lba, ss)
            if isinstance(backup, str):
                if ss in magic or required:
                    problems.append(f"backup GPT header (LBA {lba}, {ss}-byte sectors): {backup}")
                continue
            if backup[0].alternate_lba != 1:
                problems.append(f"backup GPT header (LBA {lba}): its alternate LBA is not 1")
                continue
            _warn(
                disk,
                f"the primary GPT is damaged ({primary}); using the backup at LBA {lba}."
                " Repair it (e.g. by rewriting the table) before the backup is damaged too",
            )
            return _gpt_partitions(disk, *backup, ss)
    return "; ".join(problems) or "no GPT header found"


def _check_backup(disk: DiskImage, primary: GptHeader, ss: int) -> None:
    """Warn when the backup GPT the primary points to is damaged (the table still reads fine)."""
    backup = _load_gpt(disk, primary.alternate_lba, ss) if primary.alternate_lba > 1 else "it points to LBA 1"
    if isinstance(backup, str):
        _warn(
            disk,
            f"the backup GPT (alternate LBA {primary.alternate_lba}) is damaged: {backup};"
            " the primary is fine and was used",
        )
    elif backup[1] != _read(disk, primary.entries_lba * ss, primary.entry_count * primary.entry_size):
        _warn(disk, "the backup GPT entry array differs from the primary one; the primary was used")


def _gpt_partitions(disk: DiskImage, header: GptHeader, array: bytes, ss: int) -> list[Partition]:
    parts: list[Partition] = []
    for slot in range(header.entry_count):
        raw = array[slot * header.entry_size : slot * header.entry_size + GptEntry.SIZE]
        e = GptEntry.from_bytes(raw)
        if e.type_guid == bytes(16):
            continue
        number = slot + 1
        if e.last_lba < e.first_lba:
            raise PartitionTableError(
                f"{disk.path}: GPT partition {number} ends (LBA {e.last_lba}) before it starts"
                f" (LBA {e.first_lba})"
            )
        if e.first_lba < header.first_usable_lba or e.last_lba > header.last_usable_lba:
            _warn(
                disk,
                f"GPT partition {number} (LBA {e.first_lba}-{e.last_lba}) lies outside the usable LBAs"
                f" {header.first_usable_lba}-{header.last_usable_lba}",
            )
        start = e.first_lba * ss
        size = (e.last_lba - e.first_lba + 1) * ss
        if start >= disk.size:
            _warn(disk, f"GPT partition {number} starts past the disk's end; skipped")
            continue
        if start + size > disk.size:
            _warn(disk, f"GPT partition {number} runs past the disk's end; cut at the end")
            size = disk.size - start
        type_guid = _guid(e.type_guid)
        name = e.name.decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        parts.append(
            Partition(
                disk,
                number=number,
                start=start,
                size=size,
                scheme="gpt",
                type=type_guid,
                type_name=_gpt_type_name(type_guid),
                name=name,
                guid=_guid(e.unique_guid),
                bootable=bool(e.attributes & 0b100),
                attributes=e.attributes,
            )
        )
    return parts


def describe(disk: DiskImage) -> str:
    """A human-readable table of the partitions and logical volumes of ``disk`` (one line each)."""
    parts = list_partitions(disk)
    try:
        if not parts:
            return f"{disk.path}: no partition table ({disk.size} bytes)"
        scheme = next((p.scheme for p in parts if isinstance(p, Partition)), "lvm")
        lines = [f"{disk.path}: {scheme.upper()}, {disk.size} bytes"]
        for p in parts:
            if isinstance(p, Partition):
                lines.append(
                    f"  {p.number:>3}  {p.start:>14}  {p.size:>14}  {p.type_name}"
                    + (f" [{p.name}]" if p.name else "")
                    + (" *" if p.bootable else "")
                )
            else:
                note = f" ({p.reason})" if p.reason else ""
                lines.append(f"  {p.name}  {p.size:>14}  LVM {p.layout}{note}")
        return "\n".join(lines)
    finally:
        for p in parts:
            p.close()


# -- writing --------------------------------------------------------------------------------------------


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _sectors(size: int) -> int:
    return -(-size // SECTOR)


def _resolve_type(spec: PartitionSpec, scheme: str, index: int) -> int | str:
    t = spec.type.strip()
    alias = _ALIASES.get(t.lower())
    if alias is not None:
        code = alias[0] if scheme == "mbr" else alias[1]
        if code is None:
            raise PartitionTableError(f"partition {index}: type {spec.type!r} does not exist on {scheme}")
        return code
    if _HEX_RE.match(t):
        if scheme != "mbr":
            raise PartitionTableError(
                f"partition {index}: {spec.type!r} is an MBR type byte; a GPT needs an alias or a type GUID"
            )
        code = int(t, 16)
        if code == 0 or code in _EXTENDED_TYPES or code == _PROTECTIVE:
            raise PartitionTableError(
                f"partition {index}: type {spec.type!r} is reserved (empty, extended or GPT-protective)"
            )
        return code
    if _GUID_RE.match(t):
        if scheme != "gpt":
            raise PartitionTableError(f"partition {index}: a type GUID needs scheme='gpt'")
        if uuid.UUID(t).int == 0:
            raise PartitionTableError(f"partition {index}: the all-zero type GUID marks an unused slot")
        return t.upper()
    raise PartitionTableError(
        f"partition {index}: unknown type {spec.type!r}; use one of {sorted(_ALIASES)}, '0xNN' or a GUID"
    )


def _chs(lba: int) -> bytes:
    """The CHS address of ``lba`` for 255 heads x 63 sectors, saturated at cylinder 1023."""
    cylinder, rest = divmod(lba, 255 * 63)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head, sector = divmod(rest, 63)
    sector += 1
    return bytes([head, ((cylinder >> 2) & 0xC0) | sector, cylinder & 0xFF])


def _mbr_entry(status: int, type_code: int, first: int, sectors: int, *, relative_to: int = 0) -> bytes:
    """An MBR entry for absolute LBAs ``first``… (stored relative to ``relative_to``)."""
    return MbrEntry(
        status=status,
        chs_first=_chs(first),
        type=type_code,
        chs_last=_chs(first + sectors - 1),
        first_lba=first - relative_to,
        sectors=sectors,
    ).to_bytes()


def _table_sector(boot_code: bytes, entries: Sequence[bytes], signature: int | None = None) -> bytes:
    sector = bytearray(SECTOR)
    sector[: len(boot_code)] = boot_code
    if signature is not None:
        sector[0x1B8:0x1BC] = signature.to_bytes(4, "little")
    for i, e in enumerate(entries):
        sector[_MBR_TABLE + 16 * i : _MBR_TABLE + 16 * (i + 1)] = e
    sector[510:512] = _SIGNATURE
    return bytes(sector)


def _plan(
    specs: Sequence[PartitionSpec],
    first: int,
    end: int,
    alignment: int,
    *,
    gap: int = 0,
    number_from: int = 1,
) -> list[tuple[int, int]]:
    """(first LBA, sector count) per spec, each start aligned and ``gap`` sectors before it kept free."""
    align = alignment // SECTOR
    out: list[tuple[int, int]] = []
    pos = first
    for i, spec in enumerate(specs, start=number_from):
        start = _align_up(pos + gap, align)
        if spec.size is None:
            if i != number_from + len(specs) - 1:
                raise PartitionTableError(
                    f"partition {i}: size=None (the rest of the disk) is only allowed for the last one"
                )
            count = end - start
        else:
            if spec.size <= 0:
                raise PartitionTableError(f"partition {i}: size must be positive, got {spec.size}")
            count = _sectors(spec.size)
        if count <= 0 or start + count > end:
            raise PartitionTableError(
                f"partition {i} ({spec.size} bytes at byte {start * SECTOR}) does not fit: the usable space"
                f" ends at byte {end * SECTOR}"
            )
        out.append((start, count))
        pos = start + count
    return out


def create_partition_table(
    disk: DiskImage,
    scheme: str,
    partitions: Sequence[PartitionSpec],
    *,
    alignment: int = 1 << 20,
) -> list[Partition]:
    """Write a new ``scheme`` (``"mbr"`` or ``"gpt"``) partition table with ``partitions`` to ``disk``.

    Partitions are laid out in order, each starting on a multiple of ``alignment`` bytes. On MBR, more
    than four partitions become three primaries plus an extended container holding the rest as logical
    partitions (numbered from 5); each logical partition's EBR sits ``alignment`` bytes before it. On GPT,
    a protective MBR, the primary header and entry array (128 entries) and their backups at the end of
    the disk are written with their CRCs and a random disk GUID.

    Only the table sectors are written (and, when switching scheme, the other scheme's signatures are
    cleared); partition contents are left as they are.

    Returns:
        the new partitions, as :func:`list_partitions` reads them back.

    Raises:
        PartitionTableError: the partitions do not fit, a type does not exist on ``scheme``, an MBR
            would need addresses beyond 2 TiB, …
        ReadOnlyImageError: ``disk`` is open read-only.
    """
    if not disk.writable():
        raise ReadOnlyImageError(f"{disk.path}: open the image with writable=True to write a partition table")
    if alignment < SECTOR or alignment % SECTOR:
        raise PartitionTableError(
            f"{disk.path}: alignment must be a positive multiple of {SECTOR} bytes, got {alignment}"
        )
    scheme = scheme.lower()
    if scheme not in ("gpt", "mbr"):
        raise PartitionTableError(
            f"{disk.path}: unknown partition table scheme {scheme!r}; use 'mbr' or 'gpt'"
        )
    try:
        if scheme == "gpt":
            _write_gpt(disk, partitions, alignment)
        else:
            _write_mbr(disk, partitions, alignment)
    except PartitionTableError as exc:
        # The layout helpers describe the request; say which disk it was for.
        raise PartitionTableError(f"{disk.path}: cannot write the {scheme} table: {exc}") from None
    disk.flush()
    return _list_table(disk)


def _clear_gpt(disk: DiskImage) -> None:
    for ss in (SECTOR, 4096):
        for lba in (1, disk.size // ss - 1):
            if lba >= 1 and _read(disk, lba * ss, 8) == _GPT_MAGIC:
                disk.write_at(lba * ss, bytes(ss))


def _write_mbr(disk: DiskImage, specs: Sequence[PartitionSpec], alignment: int) -> None:
    total = disk.size // SECTOR
    align = alignment // SECTOR
    for i, spec in enumerate(specs, start=1):
        if spec.name:
            raise PartitionTableError(f"partition {i}: MBR partitions have no name (got {spec.name!r})")
    if len(specs) > 3 + _MAX_LOGICALS:
        raise PartitionTableError(
            f"{len(specs)} partitions asked for; an MBR holds at most {3 + _MAX_LOGICALS} (use 'gpt')"
        )
    codes = [_resolve_type(s, "mbr", i) for i, s in enumerate(specs, start=1)]
    end = min(total, _MAX_MBR_LBA + 1)
    if len(specs) <= 4:
        primaries = _plan(specs, 1, end, alignment)
        logicals: list[tuple[int, int]] = []
        container: tuple[int, int] | None = None
    else:
        primaries = _plan(specs[:3], 1, end, alignment)
        cstart = _align_up(primaries[-1][0] + primaries[-1][1], align)
        logicals = _plan(specs[3:], cstart, end, alignment, gap=1, number_from=4)
        container = (cstart, logicals[-1][0] + logicals[-1][1] - cstart)
    for start, count in primaries + logicals:
        if start + count > _MAX_MBR_LBA + 1:
            raise PartitionTableError(
                f"a partition ends beyond 2 TiB (LBA {start + count}); MBR cannot address it, use 'gpt'"
            )
    old = _read(disk, 0, SECTOR)
    boot_code = old[:440] if old[510:512] == _SIGNATURE and not _looks_like_boot_sector(old) else b""
    entries = [
        _mbr_entry(0x80 if s.bootable else 0, int(c), first, count)
        for s, c, (first, count) in zip(specs, codes, primaries, strict=False)
    ]
    if container is not None:
        entries.append(_mbr_entry(0, 0x0F, container[0], container[1]))
        cstart = container[0]
        # EBR j sits in the first sector after the previous logical partition (the container's first
        # sector for j = 0); _plan kept at least that sector free before each logical partition.
        ebrs = [cstart] + [first + count for first, count in logicals[:-1]]
        for j, ((first, count), ebr) in enumerate(zip(logicals, ebrs, strict=True)):
            spec = specs[3 + j]
            table = [
                _mbr_entry(0x80 if spec.bootable else 0, int(codes[3 + j]), first, count, relative_to=ebr)
            ]
            if j + 1 < len(logicals):
                nxt_ebr = ebrs[j + 1]
                nxt_end = logicals[j + 1][0] + logicals[j + 1][1]
                table.append(_mbr_entry(0, 0x05, nxt_ebr, nxt_end - nxt_ebr, relative_to=cstart))
            disk.write_at(ebr * SECTOR, _table_sector(b"", table))
    signature = int.from_bytes(os.urandom(4), "little") or 1
    _clear_gpt(disk)
    disk.write_at(0, _table_sector(boot_code, entries, signature))


def _write_gpt(disk: DiskImage, specs: Sequence[PartitionSpec], alignment: int) -> None:
    total = disk.size // SECTOR
    if len(specs) > _GPT_ENTRIES:
        raise PartitionTableError(f"{len(specs)} partitions asked for; this GPT holds {_GPT_ENTRIES}")
    first_usable = 2 + _ARRAY_SECTORS
    last_usable = total - 2 - _ARRAY_SECTORS
    if last_usable < first_usable:
        raise PartitionTableError(f"a {disk.size}-byte disk is too small for a GPT")
    codes = [_resolve_type(s, "gpt", i) for i, s in enumerate(specs, start=1)]
    entries = bytearray(_GPT_ENTRIES * 128)
    for i, (spec, code, (first, count)) in enumerate(
        zip(specs, codes, _plan(specs, first_usable, last_usable + 1, alignment), strict=True)
    ):
        encoded = spec.name.encode("utf-16-le")
        if len(encoded) > 72:
            raise PartitionTableError(f"partition {i + 1}: name {spec.name!r} is longer than 36 UTF-16 units")
        entries[i * 128 : (i + 1) * 128] = GptEntry(
            type_guid=uuid.UUID(str(code)).bytes_le,
            unique_guid=uuid.uuid4().bytes_le,
            first_lba=first,
            last_lba=first + count - 1,
            attributes=0b100 if spec.bootable else 0,
            name=encoded.ljust(72, b"\x00"),
        ).to_bytes()
    array_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4().bytes_le
    backup_lba = total - 1

    def header(my_lba: int, alternate: int, entries_lba: int) -> bytes:
        def make(crc: int) -> GptHeader:
            return GptHeader(
                signature=_GPT_MAGIC,
                revision=_GPT_REVISION,
                header_size=GptHeader.SIZE,
                header_crc=crc,
                reserved=0,
                my_lba=my_lba,
                alternate_lba=alternate,
                first_usable_lba=first_usable,
                last_usable_lba=last_usable,
                disk_guid=disk_guid,
                entries_lba=entries_lba,
                entry_count=_GPT_ENTRIES,
                entry_size=128,
                entries_crc=array_crc,
            )

        h = make(zlib.crc32(make(0).to_bytes()))
        return h.to_bytes().ljust(SECTOR, b"\x00")

    pmbr = _table_sector(
        b"",
        [
            MbrEntry(
                status=0,
                chs_first=b"\x00\x02\x00",
                type=_PROTECTIVE,
                chs_last=b"\xff\xff\xff",
                first_lba=1,
                sectors=min(total - 1, _MAX_MBR_LBA),
            ).to_bytes()
        ],
    )
    disk.write_at(SECTOR * 2, bytes(entries))
    disk.write_at(SECTOR, header(1, backup_lba, 2))
    backup_array = backup_lba - _ARRAY_SECTORS
    disk.write_at(backup_array * SECTOR, bytes(entries))
    disk.write_at(backup_lba * SECTOR, header(backup_lba, 1, backup_array))
    # A 4096-byte-sector GPT signature left from an earlier table would confuse readers.
    if disk.size >= 2 * 4096 and _read(disk, 4096, 8) == _GPT_MAGIC:
        disk.write_at(4096, bytes(8))
    disk.write_at(0, pmbr)
