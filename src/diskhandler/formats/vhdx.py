"""Hyper-V VHDX images: fixed, dynamic and differencing, per Microsoft's [MS-VHDX] specification.

Layout (structures in :mod:`diskhandler.formats._vhdx_layout`)::

    [1 MiB header section: file identifier | header 1 | header 2 | region table 1 | region table 2]
    then, anywhere and 1 MiB-aligned: the log, the BAT region, the metadata region, payload blocks
    and sector bitmap blocks.

The BAT interleaves one sector bitmap entry after every ``chunk ratio`` payload entries. A payload
block is NOT_PRESENT (zeros; the parent's bytes in a differencing image), ZERO/UNDEFINED/UNMAPPED
(read as zeros), FULLY_PRESENT (all its bytes here) or PARTIALLY_PRESENT (differencing images: the
sector bitmap says, sector by sector, here or parent).

The log: an image whose header names a log (a writer stopped before its metadata updates were
complete) is replayed before anything else is read. On a writable open the replay is written to the
file; on a read-only open it is kept in memory and laid over every read of the file, so a read-only
open never changes the file and never reads metadata the log supersedes.

Writing: data blocks are allocated at the end of the file. Every metadata update (BAT entries, sector
bitmap sectors) goes through the log as the specification requires: log entry, flush, update in place,
flush. The headers are updated (new FileWriteGuid) on a writable open, and get a new DataWriteGuid
before the first change of visible data; on close the log is marked empty again.
"""

from __future__ import annotations

import os
import sys
import uuid
from array import array
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Self

from typing_extensions import override

from diskhandler.errors import ChainError, ImageFormatError, UnsupportedImageError
from diskhandler.formats import _vhdx_layout as L
from diskhandler.formats._blockmap import DATA, PARENT, ZERO, BlockMappedImage, closing_on_error
from diskhandler.formats._stream import DiskImage, pread_exact, pwrite_all, zero_fill
from diskhandler.formats._vhdx_log import LogWrite, build_entry, find_replay
from diskhandler.formats.chain import ChainGuard

__all__ = ["VHDXImage"]

MiB = L.MiB
DEFAULT_BLOCK_SIZE = 32 * MiB  # Hyper-V's default for dynamic disks
DEFAULT_DIFF_BLOCK_SIZE = 2 * MiB  # and for differencing disks
DEFAULT_LOG_SIZE = MiB
MAX_LOG_SIZE = 64 * MiB
MAX_BAT_BYTES = 1 << 30  # 2^27 entries: 64 TiB at 1 MiB blocks needs 2^26 (+ bitmap entries)
_PAGE = 4096  # BAT entries read and checked together (32 KiB)
_CACHED_PAGES = 2048  # at most 64 MiB of BAT in memory
CREATOR = "pyti diskhandler"
_LITTLE = sys.byteorder == "little"
_ZERO_STATES = (L.PAYLOAD_UNDEFINED, L.PAYLOAD_ZERO, L.PAYLOAD_UNMAPPED, L.PAYLOAD_UNMAPPED_V095)
_NULL_GUID = bytes(16)


def _u64_array(data: bytes) -> array[int]:
    table = array("Q")
    table.frombytes(data)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        table.byteswap()
    return table


class _Reader:
    """Reads of the image file with the in-memory log replay laid over them (read-only opens)."""

    def __init__(self, fd: int, path: Path, overlay: list[LogWrite]) -> None:
        self.fd = fd
        self.path = path
        self.overlay = overlay

    def read(self, offset: int, length: int, what: str) -> bytes:
        data = os.pread(self.fd, length, offset)
        if self.overlay:
            buf = bytearray(data.ljust(length, b"\0"))
            self.patch(offset, memoryview(buf))
            return bytes(buf)
        if len(data) != length:
            raise ImageFormatError(
                self.path,
                what,
                f"needs {length} bytes at offset {offset} but the file ends first (truncated?)",
            )
        return data

    def patch(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        for w in self.overlay:
            lo = max(offset, w.offset)
            hi = min(end, w.offset + w.length)
            if lo >= hi:
                continue
            if w.data is None:
                zero_fill(view[lo - offset : hi - offset])
            else:
                view[lo - offset : hi - offset] = w.data[lo - w.offset : hi - w.offset]


class _Bat:
    """The BAT, read and checked a page at a time as reads reach it.

    A 64 TiB disk of 1 MiB blocks has a 512 MiB BAT: loading and checking it whole at open would take a
    minute and the memory with it. Pages of :data:`_PAGE` entries are read on first use, checked
    (:func:`_check_entries`), and kept up to :data:`_CACHED_PAGES` at a time.
    """

    def __init__(
        self, reader: _Reader, offset: int, entries: int, check: Callable[[int, array[int]], None]
    ) -> None:
        self.reader = reader
        self.offset = offset
        self.entries = entries
        self.check = check
        self.pages: dict[int, array[int]] = {}

    def page(self, number: int) -> array[int]:
        table = self.pages.get(number)
        if table is None:
            first = number * _PAGE
            count = min(_PAGE, self.entries - first)
            table = _u64_array(self.reader.read(self.offset + 8 * first, 8 * count, "BAT"))
            self.check(first, table)
            if len(self.pages) >= _CACHED_PAGES:
                self.pages.pop(next(iter(self.pages)))
            self.pages[number] = table
        return table

    def __getitem__(self, index: int) -> int:
        return self.page(index // _PAGE)[index % _PAGE]

    def __setitem__(self, index: int, value: int) -> None:
        self.page(index // _PAGE)[index % _PAGE] = value

    def sector(self, index: int) -> tuple[int, bytes]:
        """File offset and bytes of the 4 KiB sector of the BAT holding entry ``index``."""
        per = L.LOG_SECTOR // 8
        first = index // per * per
        table = self.page(first // _PAGE)
        at = first % _PAGE
        part = array("Q", table[at : at + per])
        if not _LITTLE:  # pragma: no cover
            part.byteswap()
        return self.offset + first * 8, part.tobytes().ljust(L.LOG_SECTOR, b"\0")


def _pick_header(reader: _Reader, path: Path) -> tuple[int, L.Header]:
    """2.2.2: the valid header with the higher sequence number, and its slot (0 or 1)."""
    best: tuple[int, L.Header] | None = None
    problems: list[str] = []
    for slot, offset in enumerate((L.HEADER1_OFFSET, L.HEADER2_OFFSET)):
        raw = os.pread(reader.fd, L.HEADER_SIZE, offset)
        if len(raw) < L.HEADER_SIZE:
            problems.append(f"header {slot + 1} lies past the end of the file")
            continue
        header = L.Header.from_bytes(raw, path)
        if header.signature != L.HEADER_SIGNATURE:
            problems.append(f"header {slot + 1} has no 'head' signature")
            continue
        if L.checksum(raw) != header.checksum:
            problems.append(f"header {slot + 1} checksum is wrong")
            continue
        if best is None or header.sequence_number > best[1].sequence_number:
            best = (slot, header)
    if best is None:
        raise ImageFormatError(path, "headers", "no valid header: " + "; ".join(problems))
    header = best[1]
    if header.version != 1:
        raise UnsupportedImageError(path, "header version", f"VHDX version {header.version} is not 1")
    if header.log_guid != _NULL_GUID and header.log_version != 0:
        raise UnsupportedImageError(
            path, "log version", f"log version {header.log_version} is unknown; only 0 can be replayed"
        )
    return best


def _regions(reader: _Reader, path: Path, file_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """2.2.3: ``(offset, length)`` of the BAT and of the metadata region, from a valid region table."""
    problems: list[str] = []
    for copy, offset in enumerate((L.REGION1_OFFSET, L.REGION2_OFFSET)):
        raw = reader.read(offset, L.REGION_TABLE_SIZE, "region table")
        head = L.RegionTableHeader.from_bytes(raw, path)
        if head.signature != L.REGION_SIGNATURE or L.checksum(raw) != head.checksum:
            problems.append(f"region table {copy + 1} is damaged")
            continue
        if head.entry_count > L.MAX_REGION_ENTRIES:
            raise ImageFormatError(
                path, "region table", f"{head.entry_count} entries; at most 2047 are allowed"
            )
        found: dict[bytes, tuple[int, int]] = {}
        for i in range(head.entry_count):
            at = L.RegionTableHeader.SIZE + i * L.RegionEntry.SIZE
            entry = L.RegionEntry.from_bytes(raw[at : at + L.RegionEntry.SIZE], path)
            if entry.guid not in (L.BAT_GUID, L.METADATA_GUID):
                if entry.required & 1:
                    raise UnsupportedImageError(
                        path, "region table", f"required region {uuid.UUID(bytes_le=entry.guid)} is unknown"
                    )
                continue
            name = "BAT" if entry.guid == L.BAT_GUID else "metadata region"
            if (
                entry.file_offset < L.HEADER_SECTION_SIZE
                or entry.file_offset % MiB
                or entry.length % MiB
                or entry.length == 0
            ):
                raise ImageFormatError(
                    path,
                    name,
                    f"offset {entry.file_offset} / length {entry.length} are not whole MiB past 1 MiB",
                )
            if entry.file_offset + entry.length > file_size:
                raise ImageFormatError(
                    path, name, f"ends at {entry.file_offset + entry.length}, past the {file_size}-byte file"
                )
            found[entry.guid] = (entry.file_offset, entry.length)
        for want, name in ((L.BAT_GUID, "BAT"), (L.METADATA_GUID, "metadata region")):
            if want not in found:
                raise ImageFormatError(path, "region table", f"names no {name}")
        return found[L.BAT_GUID], found[L.METADATA_GUID]
    raise ImageFormatError(path, "region table", "; ".join(problems))


class _Metadata:
    """The metadata items of 2.6.2, validated."""

    def __init__(self, reader: _Reader, path: Path, region: tuple[int, int]) -> None:
        start, length = region
        table = reader.read(start, L.METADATA_TABLE_SIZE, "metadata table")
        head = L.MetadataTableHeader.from_bytes(table, path)
        if head.signature != L.METADATA_SIGNATURE:
            raise ImageFormatError(path, "metadata table", "no 'metadata' signature")
        if head.entry_count > L.MAX_METADATA_ENTRIES:
            raise ImageFormatError(
                path, "metadata table", f"{head.entry_count} entries; at most 2047 are allowed"
            )
        items: dict[bytes, bytes] = {}
        for i in range(head.entry_count):
            at = L.MetadataTableHeader.SIZE + i * L.MetadataEntry.SIZE
            entry = L.MetadataEntry.from_bytes(table[at : at + L.MetadataEntry.SIZE], path)
            name = L.KNOWN_METADATA.get(entry.item_id)
            if name is None or entry.flags & L.META_IS_USER:
                if entry.flags & L.META_IS_REQUIRED:
                    raise UnsupportedImageError(
                        path,
                        "metadata",
                        f"required metadata item {uuid.UUID(bytes_le=entry.item_id)} is unknown",
                    )
                continue
            if entry.length > L.MAX_METADATA_ITEM or (
                entry.length
                and (entry.offset < L.METADATA_TABLE_SIZE or entry.offset + entry.length > length)
            ):
                raise ImageFormatError(
                    path,
                    name,
                    f"item at {entry.offset} of {entry.length} bytes lies outside the metadata region",
                )
            if entry.item_id in items:  # 2.6.1.2: unique; and each copy would be read (up to 1 MiB)
                raise ImageFormatError(path, name, "the metadata table lists this item twice")
            items[entry.item_id] = (
                reader.read(start + entry.offset, entry.length, name) if entry.length else b""
            )
        self.items = items

        def need(item: bytes, size: int) -> bytes:
            name = L.KNOWN_METADATA[item]
            raw = items.get(item)
            if raw is None:
                raise ImageFormatError(path, name, "required metadata item is missing")
            if len(raw) < size:
                raise ImageFormatError(path, name, f"item is {len(raw)} bytes, needs {size}")
            return raw

        params = L.FileParameters.from_bytes(need(L.FILE_PARAMETERS_GUID, 8), path)
        self.block_size = params.block_size
        self.has_parent = bool(params.flags & L.PARAM_HAS_PARENT)
        self.leave_allocated = bool(params.flags & L.PARAM_LEAVE_BLOCKS_ALLOCATED) and not self.has_parent
        self.size = int.from_bytes(need(L.VIRTUAL_DISK_SIZE_GUID, 8)[:8], "little")
        self.disk_id = need(L.VIRTUAL_DISK_ID_GUID, 16)[:16]
        self.logical_sector = int.from_bytes(need(L.LOGICAL_SECTOR_SIZE_GUID, 4)[:4], "little")
        self.physical_sector = int.from_bytes(need(L.PHYSICAL_SECTOR_SIZE_GUID, 4)[:4], "little")
        bs = self.block_size
        if not L.MIN_BLOCK_SIZE <= bs <= L.MAX_BLOCK_SIZE or bs & (bs - 1):
            raise ImageFormatError(
                path, "file parameters", f"block size {bs} is not a power of two of 1-256 MiB"
            )
        if self.logical_sector not in (512, 4096):
            raise ImageFormatError(path, "logical sector size", f"{self.logical_sector} is not 512 or 4096")
        if self.physical_sector not in (512, 4096):
            raise ImageFormatError(path, "physical sector size", f"{self.physical_sector} is not 512 or 4096")
        if not 0 < self.size <= L.MAX_DISK_SIZE or self.size % self.logical_sector:
            raise ImageFormatError(
                path,
                "virtual disk size",
                f"{self.size} bytes is not a positive multiple of the sector up to 64 TiB",
            )
        self.locator: dict[str, str] = {}
        if self.has_parent:
            self.locator = _parse_locator(need(L.PARENT_LOCATOR_GUID, L.ParentLocatorHeader.SIZE), path)


def _parse_locator(raw: bytes, path: Path) -> dict[str, str]:
    """2.6.2.6: the key/value pairs of a VHDX parent locator."""
    head = L.ParentLocatorHeader.from_bytes(raw, path)
    if head.locator_type != L.VHDX_LOCATOR_TYPE:
        raise UnsupportedImageError(
            path, "parent locator", f"parent locator type {uuid.UUID(bytes_le=head.locator_type)} is not VHDX"
        )
    pairs: dict[str, str] = {}
    for i in range(head.key_value_count):
        at = L.ParentLocatorHeader.SIZE + i * L.ParentLocatorEntry.SIZE
        if at + L.ParentLocatorEntry.SIZE > len(raw):
            raise ImageFormatError(path, "parent locator", f"entry {i} lies past the end of the item")
        entry = L.ParentLocatorEntry.from_bytes(raw[at : at + L.ParentLocatorEntry.SIZE], path)
        texts = []
        for offset, length in (
            (entry.key_offset, entry.key_length),
            (entry.value_offset, entry.value_length),
        ):
            if offset == 0 or length == 0 or offset + length > len(raw) or length % 2:
                raise ImageFormatError(path, "parent locator", f"entry {i} points outside the item")
            try:
                texts.append(raw[offset : offset + length].decode("utf-16-le"))
            except UnicodeDecodeError as exc:
                raise ImageFormatError(path, "parent locator", f"entry {i} is not UTF-16") from exc
        pairs[texts[0]] = texts[1]
    if "parent_linkage" not in pairs:
        raise ImageFormatError(path, "parent locator", "has no parent_linkage (the parent's identity)")
    return pairs


def _guid_text(raw: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=raw)) + "}"


def _parse_guid_text(text: str) -> bytes | None:
    try:
        return uuid.UUID(text.strip().strip("{}")).bytes_le
    except ValueError:
        return None


class VHDXImage(BlockMappedImage):
    """A VHDX image (and, for a differencing image, its chain of parents).

    Attributes (besides :class:`DiskImage`'s):
        disk_type: ``"fixed"``, ``"dynamic"`` or ``"differencing"``.
        block_size: bytes per payload block.
        logical_sector_size, physical_sector_size: what the disk reports to its guest (512 or 4096).
        disk_id: the Virtual Disk ID (a UUID).
        replayed: how many log updates were replayed when the image was opened (0 when the log was empty).
    """

    format: ClassVar[str] = "vhdx"

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        writable: bool,
        header: L.Header,
        header_slot: int,
        meta: _Metadata,
        bat: _Bat,
        bat_offset: int,
        log_region: tuple[int, int],
        reader: _Reader,
        replayed: int,
        parent: DiskImage | None,
    ) -> None:
        super().__init__(path, fd, size=meta.size, writable=writable, parent=parent)
        self._header = header
        self._header_slot = header_slot
        self._meta = meta
        self._bat = bat
        self._bat_offset = bat_offset
        self._log_offset, self._log_length = log_region
        self._reader = reader
        self.replayed = replayed
        self.block_size = meta.block_size
        self._block_shift = meta.block_size.bit_length() - 1
        self.logical_sector_size = meta.logical_sector
        self.physical_sector_size = meta.physical_sector
        self.disk_id = uuid.UUID(bytes_le=meta.disk_id)
        self.disk_type = "differencing" if meta.has_parent else "fixed" if meta.leave_allocated else "dynamic"
        self._diff = meta.has_parent
        self._chunk_ratio = (L.SECTORS_PER_BITMAP_BLOCK * meta.logical_sector) // meta.block_size
        self._sectors_per_block = meta.block_size // meta.logical_sector
        self._bitmaps: dict[int, int] = {}
        self._data_guid_new = False
        self._log_used = False
        self._log_pos = 0
        self._log_seq = 1
        self._log_tail: int | None = None
        self._file_end = 0
        self._used_end = 0
        self._grow_to = 0

    # -- identity ---------------------------------------------------------------------------------

    @property
    def data_write_guid(self) -> uuid.UUID:
        """The header's DataWriteGuid: what a differencing child records as its parent's identity."""
        return uuid.UUID(bytes_le=self._header.data_write_guid)

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    @override
    def _from_fd(cls, path: Path, fd: int, *, writable: bool, guard: ChainGuard) -> Self:
        file_size = os.fstat(fd).st_size
        ident = os.pread(fd, 8, 0)
        if ident != L.FILE_SIGNATURE:
            raise ImageFormatError(path, "file identifier", "no 'vhdxfile' signature at offset 0")
        reader = _Reader(fd, path, [])
        slot, header = _pick_header(reader, path)
        log_region = (header.log_offset, header.log_length)
        replayed = 0
        grow = 0
        if header.log_guid != _NULL_GUID:
            if (
                header.log_offset < L.HEADER_SECTION_SIZE
                or header.log_offset % MiB
                or header.log_length % MiB
                or header.log_length == 0
                or header.log_offset + header.log_length > file_size
            ):
                raise ImageFormatError(
                    path,
                    "log",
                    f"log at {header.log_offset} of {header.log_length} bytes is not inside the file",
                )
            writes, grow_to = find_replay(
                lambda off, n: reader.read(off, n, "log"),
                log_offset=header.log_offset,
                log_length=header.log_length,
                log_guid=header.log_guid,
                file_size=file_size,
                path=path,
            )
            replayed = len(writes)
            # replayed in memory first, also for a writable open: the file is written only once the
            # image is locked (_start_writing)
            reader.overlay = writes
            grow = grow_to
            file_size = max(file_size, grow_to)
        bat_region, meta_region = _regions(reader, path, file_size)
        meta = _Metadata(reader, path, meta_region)
        chunk_ratio = (L.SECTORS_PER_BITMAP_BLOCK * meta.logical_sector) // meta.block_size
        payload = -(-meta.size // meta.block_size)
        bitmaps = -(-payload // chunk_ratio)
        entries = bitmaps * (chunk_ratio + 1) if meta.has_parent else payload + (payload - 1) // chunk_ratio
        if entries * 8 > min(bat_region[1], MAX_BAT_BYTES):
            raise ImageFormatError(
                path, "BAT", f"{entries} entries are needed but the BAT region holds {bat_region[1] // 8}"
            )
        file_end = max(file_size, bat_region[0] + bat_region[1], meta_region[0] + meta_region[1])
        if header.log_guid != _NULL_GUID or writable:
            file_end = max(file_end, header.log_offset + header.log_length)

        def check(first: int, table: array[int]) -> None:
            _check_entries(first, table, path, meta, chunk_ratio, file_end)

        bat = _Bat(reader, bat_region[0], entries, check)
        bat.page(0)  # a damaged first page says so at open
        used_end = file_end
        parent: DiskImage | None = None
        if meta.has_parent:
            parent = _open_parent(path, meta, guard)
        with closing_on_error(parent):
            image = cls(
                path,
                fd,
                writable=writable,
                header=header,
                header_slot=slot,
                meta=meta,
                bat=bat,
                bat_offset=bat_region[0],
                log_region=log_region,
                reader=reader,
                replayed=replayed,
                parent=parent,
            )
            image._used_end = used_end
            image._grow_to = grow
            return image

    @override
    def _start_writing(self) -> None:
        """2.2.2.1 and 2.3.3, once the file is locked: a new FileWriteGuid before anything else in the
        file changes, then the log replayed into the file (it was replayed in memory when opened), flushed,
        and marked empty."""
        h = self._header
        if (
            h.log_offset < L.HEADER_SECTION_SIZE
            or h.log_offset % MiB
            or not MiB <= h.log_length <= MAX_LOG_SIZE
            or h.log_length % MiB
        ):
            raise UnsupportedImageError(
                self.path, "log", f"a log of {h.log_length} bytes at {h.log_offset} cannot be written here"
            )
        fd = self._fd
        self._header = _write_headers(fd, self._header_slot, h, file_write_guid=uuid.uuid4().bytes_le)
        if h.log_guid != _NULL_GUID:  # a log to replay (possibly of entries without updates)
            for w in self._reader.overlay:
                pwrite_all(fd, w.data if w.data is not None else bytes(w.length), w.offset)
            if os.fstat(fd).st_size < self._grow_to:
                os.ftruncate(fd, self._grow_to)
            os.fsync(fd)
            self._header = _write_headers(fd, self._header_slot, self._header, log_guid=_NULL_GUID)
            self._reader.overlay = []
        end = max(os.fstat(fd).st_size, self._used_end)
        self._file_end = -(-end // MiB) * MiB

    # -- reading ----------------------------------------------------------------------------------

    @override
    def _lookup(self, offset: int, remaining: int) -> tuple[int, int, int]:
        shift = self._block_shift
        bs = 1 << shift
        index = offset >> shift
        within = offset & (bs - 1)
        entry = self._bat[index + index // self._chunk_ratio]
        state = entry & L.BAT_STATE_MASK
        if state == L.PAYLOAD_FULLY_PRESENT:
            return DATA, ((entry >> L.BAT_OFFSET_SHIFT) << 20) + within, bs - within
        if state == L.PAYLOAD_NOT_PRESENT:
            return (PARENT if self._diff else ZERO), 0, bs - within
        if state != L.PAYLOAD_PARTIALLY_PRESENT:
            return ZERO, 0, bs - within
        lss = self.logical_sector_size
        sector = within // lss
        bits = self._bitmap(index) >> sector
        here = bits & 1
        # the run of equal bits from ``sector`` ends at the lowest set bit of ``flips``
        flips = ~bits if here else bits
        left = self._sectors_per_block - sector
        run = min((flips & -flips).bit_length() - 1, left) if flips else left
        span = run * lss - (within - sector * lss)
        if here:
            return DATA, ((entry >> L.BAT_OFFSET_SHIFT) << 20) + within, span
        return PARENT, 0, span

    def _bitmap(self, index: int) -> int:
        """Block ``index``'s sector bitmap as an int (bit n = sector n is here)."""
        bits = self._bitmaps.get(index)
        if bits is None:
            offset = self._bitmap_offset(index)
            nbytes = self._sectors_per_block // 8
            if offset is None:
                raise ImageFormatError(
                    self.path, "BAT", f"block {index} is partially present but its sector bitmap is not"
                )
            raw = self._reader.read(offset, nbytes, "sector bitmap")
            bits = int.from_bytes(raw, "little")
            if len(self._bitmaps) > 4096:
                self._bitmaps.clear()
            self._bitmaps[index] = bits
        return bits

    def _bitmap_offset(self, index: int) -> int | None:
        """File offset of the bits of payload block ``index`` in its chunk's sector bitmap block."""
        cr = self._chunk_ratio
        chunk = index // cr
        entry = self._bat[chunk * (cr + 1) + cr]
        if entry & L.BAT_STATE_MASK != L.SB_PRESENT:
            return None
        return ((entry >> L.BAT_OFFSET_SHIFT) << 20) + (index % cr) * (self._sectors_per_block // 8)

    @override
    def _fill(self, kind: int, offset: int, view: memoryview, host: int) -> None:
        super()._fill(kind, offset, view, host)
        if kind == DATA and self._reader.overlay:
            self._reader.patch(host, view)

    # -- writing ----------------------------------------------------------------------------------

    @override
    def _write_block(self, index: int, within: int, chunk: memoryview) -> None:
        if not self._data_guid_new:
            self._begin_changes()
        bat_index = index + index // self._chunk_ratio
        entry = self._bat[bat_index]
        state = entry & L.BAT_STATE_MASK
        bs = self.block_size
        if state == L.PAYLOAD_FULLY_PRESENT:
            pwrite_all(self._fd, chunk, ((entry >> L.BAT_OFFSET_SHIFT) << 20) + within)
            return
        if self._diff:
            self._write_diff(index, bat_index, entry, within, chunk)
            return
        # a new block, FULLY_PRESENT: data first (the rest of the block zeros), then the BAT through the log
        block_at = self._allocate(bs)
        pwrite_all(self._fd, chunk, block_at + within)
        self._set_bat(bat_index, (block_at >> 20 << L.BAT_OFFSET_SHIFT) | L.PAYLOAD_FULLY_PRESENT)

    def _begin_changes(self) -> None:
        """2.2.2: a new DataWriteGuid before visible data changes, and a new log.

        The log is initialised before the header names it (an entry without descriptors whose tail
        is itself, 2.3.1.1), so a crash at any point leaves a header whose log is empty or valid."""
        log_guid = uuid.uuid4().bytes_le
        self._log_seq = 1
        self._log_pos = 0
        self._log_tail = None
        self._append_log_entry([], log_guid)
        self._header = _write_headers(
            self._fd,
            self._header_slot,
            self._header,
            data_write_guid=uuid.uuid4().bytes_le,
            log_guid=log_guid,
        )
        self._data_guid_new = True
        self._log_used = True

    def _append_log_entry(self, updates: list[tuple[int, bytes]], log_guid: bytes) -> None:
        """Write one log entry at the next place in the ring and flush it.

        Its tail is the oldest entry whose in-place updates may not be on stable storage yet (2.3.2),
        so a replay after a crash redoes all of them. Entries never cross the end of the ring: before
        one would, the updates applied so far are flushed and a new sequence starts at the ring's start.
        """
        size = len(build_entry(updates, sequence_number=1, log_guid=log_guid, tail=0, file_size=0))
        if size > self._log_length:  # pragma: no cover - a few sectors never fill a 1 MiB log
            raise ImageFormatError(self.path, "log", "a metadata update does not fit in the log")
        if self._log_pos + size > self._log_length:
            os.fdatasync(self._fd)  # every update applied so far is stable: no older entry is needed
            self._log_pos = 0
            self._log_tail = None
        tail = self._log_pos if self._log_tail is None else self._log_tail
        entry = build_entry(
            updates, sequence_number=self._log_seq, log_guid=log_guid, tail=tail, file_size=self._file_end
        )
        pwrite_all(self._fd, entry, self._log_offset + self._log_pos)
        if updates and self._log_tail is None:
            self._log_tail = self._log_pos
        self._log_pos += size
        self._log_seq += 1
        os.fdatasync(self._fd)

    def _write_diff(self, index: int, bat_index: int, entry: int, within: int, chunk: memoryview) -> None:
        lss = self.logical_sector_size
        first = within // lss
        last = -(-(within + len(chunk)) // lss)
        if within % lss or len(chunk) % lss:  # a sector is wholly here or wholly in the parent
            whole = bytearray((last - first) * lss)
            self._readinto_at((index << self._block_shift) + first * lss, memoryview(whole))
            whole[within - first * lss : within - first * lss + len(chunk)] = chunk
            chunk, within = memoryview(whole), first * lss
        state = entry & L.BAT_STATE_MASK
        updates: list[tuple[int, bytes]] = []
        if state == L.PAYLOAD_PARTIALLY_PRESENT:
            block_at = (entry >> L.BAT_OFFSET_SHIFT) << 20
        else:
            block_at = self._allocate(self.block_size)
            if state != L.PAYLOAD_NOT_PRESENT:
                # zero/unmapped blocks read as zeros, not as the parent: the block becomes fully present
                pwrite_all(self._fd, chunk, block_at + within)
                self._set_bat(bat_index, (block_at >> 20 << L.BAT_OFFSET_SHIFT) | L.PAYLOAD_FULLY_PRESENT)
                return
            updates.extend(self._ensure_bitmap_block(index))
        pwrite_all(self._fd, chunk, block_at + within)  # data first
        offset = self._bitmap_offset(index)
        assert offset is not None
        bits = self._bitmap(index) if state == L.PAYLOAD_PARTIALLY_PRESENT else 0
        bits |= ((1 << (last - first)) - 1) << first
        self._bitmaps[index] = bits
        raw = bits.to_bytes(self._sectors_per_block // 8, "little")
        lo = (offset + first // 8) // L.LOG_SECTOR * L.LOG_SECTOR
        hi = -(-(offset + -(-last // 8)) // L.LOG_SECTOR) * L.LOG_SECTOR
        for sector in range(lo, hi, L.LOG_SECTOR):
            current = bytearray(self._pending_or_file(sector, updates))
            a, b = max(sector, offset), min(sector + L.LOG_SECTOR, offset + len(raw))
            current[a - sector : b - sector] = raw[a - offset : b - offset]
            updates = [u for u in updates if u[0] != sector]
            updates.append((sector, bytes(current)))
        if state != L.PAYLOAD_PARTIALLY_PRESENT:
            new = (block_at >> 20 << L.BAT_OFFSET_SHIFT) | L.PAYLOAD_PARTIALLY_PRESENT
            updates.append(self._bat_update(bat_index, new))
        self._log_and_apply(updates)

    def _pending_or_file(self, sector: int, updates: list[tuple[int, bytes]]) -> bytes:
        for off, data in updates:
            if off == sector:
                return data
        return pread_exact(self._fd, sector, L.LOG_SECTOR, self.path, "sector bitmap")

    def _ensure_bitmap_block(self, index: int) -> list[tuple[int, bytes]]:
        """Allocate the sector bitmap block of ``index``'s chunk if needed; the BAT update it takes."""
        cr = self._chunk_ratio
        sb_index = (index // cr) * (cr + 1) + cr
        if self._bat[sb_index] & L.BAT_STATE_MASK == L.SB_PRESENT:
            return []
        at = self._allocate(MiB)  # new file space: zeros, every sector still the parent's
        return [self._bat_update(sb_index, (at >> 20 << L.BAT_OFFSET_SHIFT) | L.SB_PRESENT)]

    def _allocate(self, length: int) -> int:
        """File space for a new block at the end of the file (1 MiB-aligned), already zero."""
        at = self._file_end
        self._file_end = at + length
        os.ftruncate(self._fd, self._file_end)
        return at

    def _bat_update(self, bat_index: int, value: int) -> tuple[int, bytes]:
        """The 4 KiB BAT sector holding entry ``bat_index`` once it is ``value`` (memory updated now)."""
        self._bat[bat_index] = value
        return self._bat.sector(bat_index)

    def _set_bat(self, bat_index: int, value: int) -> None:
        self._log_and_apply([self._bat_update(bat_index, value)])

    def _log_and_apply(self, updates: list[tuple[int, bytes]]) -> None:
        """2.3: the updates go to the log (flushed), then in place.

        In a differencing image the new data is flushed first: a sector marked present whose data never
        reached the disk would read as zeros, not as the parent's bytes. A new block of a dynamic or
        fixed image reads as zeros until its data lands, which is what it read before. The in-place
        updates are flushed lazily (before the ring wraps, and on flush/close); until then the log's
        sequence still holds them.
        """
        fd = self._fd
        if self._diff:
            os.fdatasync(fd)
        self._append_log_entry(updates, self._header.log_guid)
        for offset, data in updates:
            pwrite_all(fd, data, offset)

    @override
    def _flush(self) -> None:
        if self._log_used:
            # every logged update has been applied and flushed: mark the log empty again
            os.fsync(self._fd)
            self._header = _write_headers(self._fd, self._header_slot, self._header, log_guid=_NULL_GUID)
            self._log_used = False
            self._data_guid_new = False

    # -- creating ---------------------------------------------------------------------------------

    @classmethod
    @override
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        """Create a VHDX; see docs/formats/vhdx.md.

        Options:
            subformat: ``"dynamic"`` (default) or ``"fixed"`` (every block allocated now).
            block_size: bytes per block, a power of two from 1 MiB to 256 MiB (default 32 MiB, and
                2 MiB for a differencing image, as Hyper-V does).
            log_size: bytes of log, a multiple of 1 MiB (default 1 MiB).
            logical_sector_size: 512 (default) or 4096.
        """
        subformat = options.pop("subformat", "dynamic")
        block_size = options.pop("block_size", DEFAULT_DIFF_BLOCK_SIZE if parent else DEFAULT_BLOCK_SIZE)
        log_size = options.pop("log_size", DEFAULT_LOG_SIZE)
        lss = options.pop("logical_sector_size", 512)
        if options:
            raise TypeError(
                f"unknown VHDX options {sorted(options)};"
                " known: subformat, block_size, log_size, logical_sector_size"
            )
        if subformat not in ("dynamic", "fixed", "differencing"):
            raise ValueError(f"VHDX subformat must be 'dynamic' or 'fixed', not {subformat!r}")
        if subformat == "differencing" and parent is None:
            raise ValueError("a differencing VHDX needs parent=")
        if parent is not None and subformat == "fixed":
            raise ValueError("a VHDX with a parent is a differencing image; it cannot be fixed")
        if (
            not isinstance(block_size, int)
            or block_size & (block_size - 1)
            or not L.MIN_BLOCK_SIZE <= block_size <= L.MAX_BLOCK_SIZE
        ):
            raise ValueError(f"block_size must be a power of two from 1 MiB to 256 MiB, got {block_size!r}")
        if not isinstance(log_size, int) or log_size % MiB or not MiB <= log_size <= MAX_LOG_SIZE:
            raise ValueError(f"log_size must be a multiple of 1 MiB from 1 to 64 MiB, got {log_size!r}")
        if lss not in (512, 4096):
            raise ValueError(f"logical_sector_size must be 512 or 4096, got {lss!r}")
        locator: dict[str, str] = {}
        if parent is not None:
            base = guard.enter(path).open_parent(path, parent, format="vhdx")
            try:
                if not isinstance(base, VHDXImage):  # pragma: no cover - format="vhdx" guarantees it
                    raise ChainError(path, "parent", f"{parent} is not a VHDX image")
                if base.logical_sector_size != lss:
                    lss = base.logical_sector_size  # 2.6.2.4: parent and child share the sector size
                if size is None:
                    size = base.size
                locator["parent_linkage"] = _guid_text(base._header.data_write_guid)
                rel = os.path.relpath(parent.absolute(), path.absolute().parent)
                locator["relative_path"] = str(PureWindowsPath(PurePosixPath(rel)))
                absolute = parent.absolute().as_posix()
                locator["absolute_win32_path"] = "\\\\?\\" + str(PureWindowsPath(PurePosixPath(absolute)))
            finally:
                base.close()
        if size is None:
            raise ValueError("a new VHDX needs a size (or a parent to take it from)")
        if size % lss or size > L.MAX_DISK_SIZE:
            raise ValueError(f"a VHDX holds whole {lss}-byte sectors up to 64 TiB; {size} does not fit")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_new(fd, size, block_size, log_size, lss, fixed=subformat == "fixed", locator=locator)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        image = cls.open(path, writable=True, guard=guard.enter(path))
        with closing_on_error(image):
            image._start_writing()
        return image


def _write_headers(fd: int, current_slot: int, header: L.Header, **changes: bytes) -> L.Header:
    """2.2.2.1: write the updated header over the non-current one, flush, and once more over the other."""
    new = header
    slot = current_slot
    for _ in range(2):
        new = new.evolve(sequence_number=new.sequence_number + 1, checksum=0, **changes)
        raw = L.sealed(new.to_bytes().ljust(L.HEADER_SIZE, b"\0"))
        slot = 1 - slot
        pwrite_all(fd, raw, (L.HEADER1_OFFSET, L.HEADER2_OFFSET)[slot])
        os.fdatasync(fd)
        new = L.Header.from_bytes(raw)
    # the second write went to the slot that was current at the start: it is current again
    return new


def _check_entries(  # noqa: PLR0917  (the page callback of _Bat)
    first: int, table: array[int], path: Path, meta: _Metadata, chunk_ratio: int, file_end: int
) -> None:
    """BAT entries ``first``.. : each state known for its kind, and every present block inside the
    file past the header section (new blocks go at the end of the file, never onto one the BAT names)."""
    reserved = (1 << L.BAT_OFFSET_SHIFT) - 1 - L.BAT_STATE_MASK
    present = (L.PAYLOAD_FULLY_PRESENT, L.PAYLOAD_PARTIALLY_PRESENT)
    for n, entry in enumerate(table):
        if entry == 0:
            continue
        i = first + n
        state = entry & L.BAT_STATE_MASK
        is_bitmap = i % (chunk_ratio + 1) == chunk_ratio
        if is_bitmap:
            ok = state == L.SB_NOT_PRESENT or (state == L.SB_PRESENT and meta.has_parent)
            size = MiB
        else:
            ok = state in (0, 1, 2, 3, 5, 6) or (state == L.PAYLOAD_PARTIALLY_PRESENT and meta.has_parent)
            size = meta.block_size
        if not ok:
            raise ImageFormatError(path, f"BAT entry {i}", f"state {state} is not valid here")
        if state in present or (is_bitmap and state == L.SB_PRESENT):
            at = (entry >> L.BAT_OFFSET_SHIFT) << 20
            if at < L.HEADER_SECTION_SIZE or entry & reserved:
                raise ImageFormatError(
                    path, f"BAT entry {i}", "a present block must lie past the header section"
                )
            if at + size > file_end:
                raise ImageFormatError(
                    path,
                    f"BAT entry {i}",
                    f"block at {at} ends past the end of the {file_end}-byte file (truncated?)",
                )


def _open_parent(child: Path, meta: _Metadata, guard: ChainGuard) -> DiskImage:
    """2.6.2.6.3: relative_path, then volume_path and absolute_win32_path (their file name beside the
    child on this host); the parent's DataWriteGuid must match parent_linkage (or parent_linkage2)."""
    loc = meta.locator
    linkages = (loc.get("parent_linkage", ""), loc.get("parent_linkage2", ""))
    wanted = [g for g in map(_parse_guid_text, linkages) if g]
    if not wanted:
        raise ChainError(
            child, "parent locator", f"parent_linkage {loc.get('parent_linkage')!r} is not a GUID"
        )
    folder = child.parent
    candidates: list[Path] = []
    rel = loc.get("relative_path")
    if rel:
        candidates.append(folder / PureWindowsPath(rel).as_posix())
    for key in ("volume_path", "absolute_win32_path"):
        text = loc.get(key)
        if text:
            name = PureWindowsPath(text).name
            if name:
                candidates.append(folder / name)
    tried: list[str] = []
    for candidate in dict.fromkeys(Path(os.path.normpath(c)) for c in candidates):
        if not os.path.lexists(candidate):
            tried.append(f"{candidate} (missing)")
            continue
        # the one door for parent files: the parents= policy, FIFOs/devices refused, read-only
        parent = guard.open_parent(child, candidate, format="vhdx")
        if isinstance(parent, VHDXImage) and parent._header.data_write_guid in wanted:
            if parent.logical_sector_size != meta.logical_sector:
                parent.close()
                raise ChainError(
                    child, "parent locator", f"parent {candidate} has another logical sector size"
                )
            return parent
        got = parent.data_write_guid if isinstance(parent, VHDXImage) else "?"
        parent.close()
        tried.append(f"{candidate} (DataWriteGuid {got}, changed since this differencing image was made?)")
    raise ChainError(
        child,
        "parent locator",
        f"parent with DataWriteGuid {loc.get('parent_linkage')} not found;"
        f" tried: {'; '.join(tried) or 'no path'}."
        " Put the parent where relative_path says, or beside this image",
    )


def _write_new(
    fd: int, size: int, block_size: int, log_size: int, lss: int, *, fixed: bool, locator: dict[str, str]
) -> None:
    """The header section, log, metadata region, BAT and (fixed) blocks of a new image."""
    chunk_ratio = (L.SECTORS_PER_BITMAP_BLOCK * lss) // block_size
    payload = -(-size // block_size)
    bitmaps = -(-payload // chunk_ratio)
    diff = bool(locator)
    entries = bitmaps * (chunk_ratio + 1) if diff else payload + (payload - 1) // chunk_ratio
    log_at = L.HEADER_SECTION_SIZE
    meta_at = log_at + log_size
    bat_at = meta_at + MiB
    bat_len = -(-(entries * 8) // MiB) * MiB
    data_at = bat_at + bat_len
    # identifier
    ident = L.FILE_SIGNATURE + CREATOR.encode("utf-16-le")
    pwrite_all(fd, ident, 0)
    # metadata region: table + items
    items: list[tuple[bytes, int, bytes]] = [
        (
            L.FILE_PARAMETERS_GUID,
            L.META_IS_REQUIRED,
            L.FileParameters(
                block_size,
                L.PARAM_HAS_PARENT if diff else (L.PARAM_LEAVE_BLOCKS_ALLOCATED if fixed else 0),
            ).to_bytes(),
        ),
        (L.VIRTUAL_DISK_SIZE_GUID, L.META_IS_REQUIRED | L.META_IS_VIRTUAL_DISK, size.to_bytes(8, "little")),
        (L.VIRTUAL_DISK_ID_GUID, L.META_IS_REQUIRED | L.META_IS_VIRTUAL_DISK, uuid.uuid4().bytes_le),
        (L.LOGICAL_SECTOR_SIZE_GUID, L.META_IS_REQUIRED | L.META_IS_VIRTUAL_DISK, lss.to_bytes(4, "little")),
        (
            L.PHYSICAL_SECTOR_SIZE_GUID,
            L.META_IS_REQUIRED | L.META_IS_VIRTUAL_DISK,
            (4096).to_bytes(4, "little"),
        ),
    ]
    if diff:
        items.append((L.PARENT_LOCATOR_GUID, L.META_IS_REQUIRED, _locator_bytes(locator)))
    table = bytearray(L.METADATA_TABLE_SIZE)
    table[: L.MetadataTableHeader.SIZE] = L.MetadataTableHeader(
        L.METADATA_SIGNATURE, 0, len(items), bytes(20)
    ).to_bytes()
    item_at = L.METADATA_TABLE_SIZE
    blob = bytearray()
    for i, (guid, flags, data) in enumerate(items):
        at = L.MetadataTableHeader.SIZE + i * L.MetadataEntry.SIZE
        table[at : at + L.MetadataEntry.SIZE] = L.MetadataEntry(
            guid, item_at + len(blob), len(data), flags, 0
        ).to_bytes()
        blob += data
    pwrite_all(fd, bytes(table) + bytes(blob), meta_at)
    # BAT: zeros (not present) from the file extension; a fixed image's entries written a page at a time
    file_end = data_at
    if fixed:
        for first in range(0, entries, _PAGE):
            page = array("Q", bytes(8 * min(_PAGE, entries - first)))
            for n in range(len(page)):
                i = first + n
                if i % (chunk_ratio + 1) != chunk_ratio:
                    page[n] = ((file_end >> 20) << L.BAT_OFFSET_SHIFT) | L.PAYLOAD_FULLY_PRESENT
                    file_end += block_size
            if not _LITTLE:  # pragma: no cover
                page.byteswap()
            pwrite_all(fd, page.tobytes(), bat_at + 8 * first)
    os.ftruncate(fd, max(file_end, bat_at + bat_len))
    # region tables
    rt = bytearray(L.REGION_TABLE_SIZE)
    rt[: L.RegionTableHeader.SIZE] = L.RegionTableHeader(L.REGION_SIGNATURE, 0, 2, 0).to_bytes()
    rt[16:48] = L.RegionEntry(L.BAT_GUID, bat_at, bat_len, 1).to_bytes()
    rt[48:80] = L.RegionEntry(L.METADATA_GUID, meta_at, MiB, 1).to_bytes()
    raw_rt = L.sealed(rt)
    pwrite_all(fd, raw_rt, L.REGION1_OFFSET)
    pwrite_all(fd, raw_rt, L.REGION2_OFFSET)
    # headers last: until they exist the file is not a VHDX
    os.fdatasync(fd)
    header = L.Header(
        signature=L.HEADER_SIGNATURE,
        checksum=0,
        sequence_number=0,
        file_write_guid=uuid.uuid4().bytes_le,
        data_write_guid=uuid.uuid4().bytes_le,
        log_guid=_NULL_GUID,
        log_version=0,
        version=1,
        log_length=log_size,
        log_offset=log_at,
    )
    for seq, offset in ((0, L.HEADER1_OFFSET), (1, L.HEADER2_OFFSET)):
        raw = L.sealed(header.evolve(sequence_number=seq).to_bytes().ljust(L.HEADER_SIZE, b"\0"))
        pwrite_all(fd, raw, offset)
    os.fdatasync(fd)


def _locator_bytes(pairs: dict[str, str]) -> bytes:
    """2.6.2.6: header, entries, then the UTF-16 keys and values."""
    head = L.ParentLocatorHeader(L.VHDX_LOCATOR_TYPE, 0, len(pairs)).to_bytes()
    strings = bytearray()
    table = bytearray()
    base = L.ParentLocatorHeader.SIZE + len(pairs) * L.ParentLocatorEntry.SIZE
    for key, value in pairs.items():
        k = key.encode("utf-16-le")
        v = value.encode("utf-16-le")
        ko = base + len(strings)
        strings += k
        vo = base + len(strings)
        strings += v
        table += L.ParentLocatorEntry(ko, vo, len(k), len(v)).to_bytes()
    return head + bytes(table) + bytes(strings)
