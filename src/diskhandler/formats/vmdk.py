"""VMDK images: VMware's virtual disks, single-file or split, sparse or flat, and delta links.

Sources: VMware technical notes "Virtual Disk Format 1.1" and "Virtual Disk Format 5.0" (layout of
the hosted sparse extent, grain directory and tables, stream-optimized markers); every integer is
little-endian. A VMDK disk is a text *descriptor* (see :mod:`._vmdk_descriptor`) listing *extents*
that are concatenated in order:

* ``SPARSE`` — a file that starts with a 512-byte ``KDMV`` header. The virtual extent is cut into
  *grains* (``grainSize`` sectors, 64 KiB by default); the *grain directory* (GD) points at *grain
  tables* (GTs) of ``numGTEsPerGT`` 32-bit entries, each the sector of one grain in the file::

      [header][embedded descriptor][redundant GD][redundant GTs][GD][GTs][pad][grains ...]

  A GT entry of 0 is unallocated (the parent's bytes, or zeros), 1 with header flag bit 2 is a zeroed
  grain (zeros, never the parent). With flag bit 1 a redundant copy of GD and GTs is kept in step.
  ``streamOptimized`` extents hold deflate-compressed grains behind a 12-byte marker (``lba``,
  ``size``); when the header's ``gdOffset`` is ``GD_AT_END`` the real header is the *footer* 1536 bytes
  before the end of the file.
* ``FLAT`` — a raw file (at a sector offset); ``ZERO`` — no file, reads as zeros.

Single-file images (monolithicSparse, streamOptimized) carry the descriptor inside the sparse extent;
the containing file is the extent whatever file name that embedded descriptor gives.

Delta links (snapshots): the child's descriptor names its parent in ``parentFileNameHint`` (resolved
relative to the child, then as a bare file name in the child's folder) and records the parent's
content id in ``parentCID``. A mismatch means the parent changed after the child was made: reading
warns (:class:`ImageWarning`), opening for writing is refused (:class:`ChainError`). The first write
to an image gives it a new ``CID``, as VMware and qemu do; parents are never written.

Writes put the grain data first (appended at the end of the extent file), then the GT entries
(primary, then redundant), then — for a new GT — the GD entries, so a killed process leaves a valid
image, at worst with a leaked grain.
"""

from __future__ import annotations

import bisect
import errno
import os
import secrets
import sys
import warnings
import zlib
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Final, Self

from typing_extensions import Buffer, override

from diskhandler.errors import (
    ChainError,
    ImageFormatError,
    ImageWarning,
    UnsupportedImageError,
)
from diskhandler.formats._blockmap import DATA, PARENT, ZERO, walk
from diskhandler.formats._files import open_image_file
from diskhandler.formats._layout import Layout, binary_layout, ffield
from diskhandler.formats._stream import DiskImage, pread_exact, preadinto_exact, pwrite_all, zero_fill
from diskhandler.formats._vmdk_descriptor import (
    MAX_DESCRIPTOR_BYTES,
    NO_PARENT_CID,
    Descriptor,
    ExtentLine,
    looks_like_descriptor,
    parse_descriptor,
    render_descriptor,
)
from diskhandler.formats.chain import ChainGuard

__all__ = [
    "ADAPTER_TYPES",
    "COMPRESSION_DEFLATE",
    "COMPRESSION_NONE",
    "DEFAULT_GRAIN_SECTORS",
    "FLAG_COMPRESSED",
    "FLAG_MARKERS",
    "FLAG_NEWLINE_TEST",
    "FLAG_REDUNDANT",
    "FLAG_ZERO_GRAIN",
    "GD_AT_END",
    "GTE_ZEROED",
    "MAGIC_COWD",
    "MAGIC_KDMV",
    "MARKER_EOS",
    "MARKER_FOOTER",
    "MARKER_GD",
    "MARKER_GT",
    "MAX_CREATE_SIZE",
    "MAX_GD_ENTRIES",
    "MAX_GRAIN_SECTORS",
    "MAX_GTES_PER_GT",
    "SECTOR",
    "SPLIT_EXTENT_SECTORS",
    "SUBFORMATS",
    "Marker",
    "SparseExtentHeader",
    "VMDKImage",
]

SECTOR = 512
MAGIC_KDMV: Final = b"KDMV"
MAGIC_COWD: Final = b"COWD"
GD_AT_END: Final = 0xFFFFFFFFFFFFFFFF

FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
GTE_ZEROED = 1

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

#: Largest grain accepted (16 MiB; VMware writes 64 KiB). Bounds every per-grain buffer.
MAX_GRAIN_SECTORS = 1 << 15
#: numGTEsPerGT above this is refused (the spec fixes 512; qemu refuses more, too).
MAX_GTES_PER_GT = 512
#: At most this many GD entries (16 MiB of directory; 128 TiB with default grains).
MAX_GD_ENTRIES = 1 << 22
#: GTs kept in memory at once (each 2 KiB by default: 128 MiB at most).
_GT_CACHE_LIMIT = 1 << 16
#: GT entries are 32-bit sector numbers: an extent file cannot grow past 2 TiB.
_MAX_EXTENT_FILE_SECTORS = 1 << 32
#: The biggest virtual disk create_image makes.
MAX_CREATE_SIZE = 64 << 40
#: Extent size of the twoGbMaxExtent subformats (what qemu writes; VMware uses 2047 MiB).
SPLIT_EXTENT_SECTORS = 4194304
DEFAULT_GRAIN_SECTORS = 128
_DESCRIPTOR_SECTORS = 20
_IOV_MAX = 1024

SUBFORMATS: Final = ("monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "twoGbMaxExtentFlat")
ADAPTER_TYPES: Final = ("ide", "buslogic", "lsilogic", "legacyESX")
_SUPPORTED_EXTENT_TYPES = {"SPARSE", "FLAT", "ZERO"}
_DEVICE_CREATE_TYPES = {
    "fulldevice",
    "partitioneddevice",
    "vmfsraw",
    "vmfsrawdevicemap",
    "vmfspassthroughrawdevicemap",
}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


@binary_layout("<")
class SparseExtentHeader(Layout):
    """The 512-byte header of a hosted sparse extent (``SparseExtentHeader`` in the VMware notes)."""

    magic: bytes = ffield("4s")
    version: int = ffield("I")
    flags: int = ffield("I")
    capacity: int = ffield("Q")  # sectors
    grain_size: int = ffield("Q")  # sectors
    descriptor_offset: int = ffield("Q")  # sector
    descriptor_size: int = ffield("Q")  # sectors
    num_gtes_per_gt: int = ffield("I")
    rgd_offset: int = ffield("Q")  # sector
    gd_offset: int = ffield("Q")  # sector, or GD_AT_END
    overhead: int = ffield("Q")  # sectors before the first grain
    unclean_shutdown: int = ffield("B")
    newline_test: bytes = ffield("4s")  # "\n \r\n"
    compress_algorithm: int = ffield("H")
    pad: bytes = ffield("433s")


@binary_layout("<")
class Marker(Layout):
    """A streamOptimized marker: ``value`` is a sector count (metadata) or an LBA (grain)."""

    value: int = ffield("Q")
    size: int = ffield("I")  # 0 for metadata markers, else compressed grain bytes
    type: int = ffield("I")  # metadata markers only


_GRAIN_MARKER_SIZE = 12  # value + size, then the compressed bytes


def _le_array(data: bytes) -> array[int]:
    table = array("I")
    table.frombytes(data)
    if not _LITTLE_ENDIAN_HOST:  # pragma: no cover - every supported host is little-endian
        table.byteswap()
    return table


def _le_bytes(table: array[int]) -> bytes:
    if _LITTLE_ENDIAN_HOST:
        return table.tobytes()
    copy = array("I", table)  # pragma: no cover
    copy.byteswap()  # pragma: no cover
    return copy.tobytes()  # pragma: no cover


def _pwritev_all(fd: int, pieces: Sequence[Buffer], offset: int) -> None:
    """Write ``pieces`` back to back at ``offset`` (as few syscalls as the kernel allows)."""
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        batch = views[:_IOV_MAX]
        done = os.pwritev(fd, batch, offset)
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


ParentReader = Callable[[int, memoryview], None]


class _Extent:
    """One extent of the disk: ``length`` bytes of the virtual disk starting at ``vstart``."""

    kind: ClassVar[str] = "?"

    def __init__(self, path: Path, vstart: int, length: int) -> None:
        self.path = path
        self.vstart = vstart
        self.length = length

    def readinto(self, offset: int, buf: memoryview, parent: ParentReader) -> None:
        raise NotImplementedError

    def write(self, offset: int, data: memoryview, parent: ParentReader) -> None:
        raise NotImplementedError

    def fds(self) -> list[int]:
        return []


class _ZeroExtent(_Extent):
    kind = "ZERO"

    @override
    def readinto(self, offset: int, buf: memoryview, parent: ParentReader) -> None:
        zero_fill(buf)

    @override
    def write(self, offset: int, data: memoryview, parent: ParentReader) -> None:  # pragma: no cover
        raise UnsupportedImageError(self.path, "extent", "a ZERO extent cannot be written")


class _FlatExtent(_Extent):
    kind = "FLAT"

    def __init__(self, path: Path, vstart: int, length: int, fd: int, file_offset: int) -> None:
        super().__init__(path, vstart, length)
        self.fd = fd
        self.file_offset = file_offset

    @override
    def readinto(self, offset: int, buf: memoryview, parent: ParentReader) -> None:
        done = 0
        total = len(buf)
        while done < total:
            n = os.preadv(self.fd, [buf[done:]], self.file_offset + offset + done)
            if n == 0:  # a flat file shorter than its extent: the rest reads as zeros (as qemu does)
                zero_fill(buf[done:])
                return
            done += n

    @override
    def write(self, offset: int, data: memoryview, parent: ParentReader) -> None:
        pwrite_all(self.fd, data, self.file_offset + offset)

    @override
    def fds(self) -> list[int]:
        return [self.fd]


class _SparseExtent(_Extent):
    """A hosted sparse (``KDMV``) extent, plain or stream-optimized."""

    kind = "SPARSE"

    def __init__(self, path: Path, vstart: int, fd: int, header: SparseExtentHeader, file_size: int) -> None:
        super().__init__(path, vstart, header.capacity * SECTOR)
        self.fd = fd
        self.header = header
        self.grain_sectors = header.grain_size
        self.grain_bytes = header.grain_size * SECTOR
        self.grain_shift = self.grain_bytes.bit_length() - 1
        self.grain_mask = self.grain_bytes - 1
        self.gtes = header.num_gtes_per_gt
        self.gt_bytes = self.gtes * 4
        self.gt_sectors = -(-self.gt_bytes // SECTOR)
        self.zeroed_grains = bool(header.flags & FLAG_ZERO_GRAIN)
        self.compressed = header.compress_algorithm == COMPRESSION_DEFLATE
        self.markers = bool(header.flags & FLAG_MARKERS)
        self.file_size = file_size
        self.next_sector = max(-(-file_size // SECTOR), header.overhead)
        entries = -(-header.capacity // (self.gtes * header.grain_size))
        self.gd = self._read_directory(header.gd_offset, entries, "gdOffset")
        self.rgd: array[int] | None = None
        if header.flags & FLAG_REDUNDANT and header.rgd_offset and not self.compressed:
            self.rgd = self._read_directory(header.rgd_offset, entries, "rgdOffset")
        self._gts: dict[int, array[int]] = {}
        self._grain_cache: tuple[int, bytes] | None = None

    @classmethod
    def open(cls, path: Path, fd: int, vstart: int, *, writable: bool) -> _SparseExtent:
        file_size = os.fstat(fd).st_size
        header = _read_sparse_header(fd, path, file_size)
        if writable and header.compress_algorithm == COMPRESSION_DEFLATE:
            raise UnsupportedImageError(
                path,
                "compressAlgorithm",
                "streamOptimized (compressed) VMDKs are read-only here; open with writable=False, "
                "or convert to monolithicSparse first (qemu-img convert -O vmdk)",
            )
        if writable and header.version == 3:
            raise UnsupportedImageError(
                path,
                "version",
                "version-3 sparse extents may carry changed-block tracking this library would not "
                "keep up to date; they open read-only",
            )
        return cls(path, vstart, fd, header, file_size)

    def _read_directory(self, sector: int, entries: int, field: str) -> array[int]:
        start = sector * SECTOR
        if start < SECTOR or start + entries * 4 > self.file_size:
            raise ImageFormatError(
                self.path,
                field,
                f"grain directory of {entries} entries at sector {sector} lies outside the "
                f"{self.file_size}-byte file",
            )
        return _le_array(pread_exact(self.fd, start, entries * 4, self.path, "grain directory"))

    # -- lookups --------------------------------------------------------------------------------

    def _load_gt(self, gd_index: int) -> array[int] | None:
        if gd_index >= len(self.gd):
            return None
        sector = self.gd[gd_index]
        if sector == 0:
            return None
        start = sector * SECTOR
        if start + self.gt_bytes > self.file_size:
            raise ImageFormatError(
                self.path,
                f"grain directory entry {gd_index}",
                f"grain table at sector {sector} lies past the end of the {self.file_size}-byte file",
            )
        if len(self._gts) >= _GT_CACHE_LIMIT:
            self._gts.clear()
        table = _le_array(pread_exact(self.fd, start, self.gt_bytes, self.path, "grain table"))
        self._gts[gd_index] = table
        return table

    def lookup(self, grain: int) -> int:
        """The GT entry of ``grain`` (0 when its table is absent)."""
        gd_index, gt_index = divmod(grain, self.gtes)
        table = self._gts.get(gd_index)
        if table is None:
            table = self._load_gt(gd_index)
            if table is None:
                return 0
        return table[gt_index]

    # -- reading --------------------------------------------------------------------------------

    @override
    def readinto(self, offset: int, buf: memoryview, parent: ParentReader) -> None:
        if self.compressed:
            self._read_compressed(offset, buf, parent)
            return
        walk(offset, buf, self._lookup, lambda kind, at, view, host: self._fill(kind, at, view, host, parent))

    def _lookup(self, offset: int, remaining: int) -> tuple[int, int, int]:
        within = offset & self.grain_mask
        span = self.grain_bytes - within
        entry = self.lookup(offset >> self.grain_shift)
        if entry == 0:
            return PARENT, 0, span
        if entry == GTE_ZEROED and self.zeroed_grains:
            return ZERO, 0, span
        return DATA, entry * SECTOR + within, span

    def _fill(self, kind: int, offset: int, view: memoryview, file_at: int, parent: ParentReader) -> None:
        if kind == DATA:
            preadinto_exact(self.fd, view, file_at, self.path, f"grain at byte {file_at}")
        elif kind == ZERO:
            zero_fill(view)
        else:
            parent(self.vstart + offset, view)

    def _read_compressed(self, offset: int, buf: memoryview, parent: ParentReader) -> None:
        total = len(buf)
        pos = 0
        while pos < total:
            here = offset + pos
            within = here & self.grain_mask
            take = min(self.grain_bytes - within, total - pos)
            entry = self.lookup(here >> self.grain_shift)
            view = buf[pos : pos + take]
            if entry == 0:
                parent(self.vstart + here, view)
            elif entry == GTE_ZEROED and self.zeroed_grains:
                zero_fill(view)
            else:
                grain = self._grain(entry)
                piece = memoryview(grain)[within : within + take]
                view[: len(piece)] = piece
                if len(piece) < take:  # a short last grain: the rest is zeros
                    zero_fill(view[len(piece) :])
            pos += take

    def _grain(self, sector: int) -> bytes:
        cached = self._grain_cache
        if cached is not None and cached[0] == sector:
            return cached[1]
        start = sector * SECTOR
        limit = 2 * self.grain_bytes + SECTOR
        what = f"compressed grain at sector {sector}"
        data: bytes | memoryview
        if self.markers:
            # one read usually brings marker and data: deflate rarely grows a grain by 4 KiB
            first = os.pread(self.fd, _GRAIN_MARKER_SIZE + self.grain_bytes + 4096, start)
            if len(first) < _GRAIN_MARKER_SIZE:
                raise ImageFormatError(self.path, what, "the grain marker lies past the end of the file")
            size = int.from_bytes(first[8:12], "little")
            if size == 0 or size > limit:
                raise ImageFormatError(self.path, what, f"compressed size {size} is impossible")
            if _GRAIN_MARKER_SIZE + size <= len(first):
                data = memoryview(first)[_GRAIN_MARKER_SIZE : _GRAIN_MARKER_SIZE + size]
            else:
                data = pread_exact(self.fd, start + _GRAIN_MARKER_SIZE, size, self.path, what)
        else:
            data = os.pread(self.fd, limit, start)
        inflater = zlib.decompressobj()
        try:
            grain = inflater.decompress(data, self.grain_bytes)
        except zlib.error as exc:
            raise ImageFormatError(self.path, what, f"compressed data is damaged ({exc})") from exc
        self._grain_cache = (sector, grain)
        return grain

    # -- writing --------------------------------------------------------------------------------

    @override
    def write(self, offset: int, data: memoryview, parent: ParentReader) -> None:
        shift = self.grain_shift
        mask = self.grain_mask
        gbytes = self.grain_bytes
        total = len(data)
        pos = 0
        run_file = -1
        run_start = 0
        run_len = 0
        new_pieces: list[Buffer] = []
        new_grains: list[tuple[int, int]] = []
        first_new = self.next_sector
        sector = first_new
        overhead_bytes = self.header.overhead * SECTOR
        while pos < total:
            here = offset + pos
            within = here & mask
            take = min(gbytes - within, total - pos)
            grain = here >> shift
            entry = self.lookup(grain)
            if entry > GTE_ZEROED or (entry == GTE_ZEROED and not self.zeroed_grains):
                file_at = entry * SECTOR + within
                if entry * SECTOR < overhead_bytes:
                    raise ImageFormatError(
                        self.path,
                        f"grain table entry of grain {grain}",
                        f"points at sector {entry}, inside the metadata area; refusing to write there",
                    )
                # one pwrite only while both the file and the data run on (a new grain may lie between)
                if run_file >= 0 and run_file + run_len == file_at and run_start + run_len == pos:
                    run_len += take
                else:
                    if run_file >= 0:
                        pwrite_all(self.fd, data[run_start : run_start + run_len], run_file)
                    run_file, run_start, run_len = file_at, pos, take
            else:
                if take == gbytes:
                    new_pieces.append(data[pos : pos + take])
                else:
                    whole = bytearray(gbytes)
                    view = memoryview(whole)
                    if entry == 0:  # copy-on-write from the parent (zeros without one)
                        parent(self.vstart + (grain << shift), view)
                    view[within : within + take] = data[pos : pos + take]
                    new_pieces.append(whole)
                if sector + self.grain_sectors > _MAX_EXTENT_FILE_SECTORS:
                    raise OSError(
                        errno.EFBIG, "VMDK sparse extent file cannot grow past 2 TiB", str(self.path)
                    )
                new_grains.append((grain, sector))
                sector += self.grain_sectors
            pos += take
        if run_file >= 0:
            pwrite_all(self.fd, data[run_start : run_start + run_len], run_file)
        if new_grains:
            _pwritev_all(self.fd, new_pieces, first_new * SECTOR)  # data first ...
            self.next_sector = sector
            self.file_size = max(self.file_size, sector * SECTOR)
            self._set_entries(new_grains)  # ... then the map

    def _set_entries(self, grains: list[tuple[int, int]]) -> None:
        """Point the GT entries of ``grains`` at their new sectors, in both GT copies."""
        index = 0
        while index < len(grains):
            gd_index = grains[index][0] // self.gtes
            end = index
            while end < len(grains) and grains[end][0] // self.gtes == gd_index:
                end += 1
            table = self._gts.get(gd_index) or self._load_gt(gd_index)
            base = gd_index * self.gtes
            if table is None:
                table = array("I", bytes(self.gt_bytes))
                for grain, sector in grains[index:end]:
                    table[grain - base] = sector
                self._new_table(gd_index, table)
            else:
                for grain, sector in grains[index:end]:
                    table[grain - base] = sector
                lo = grains[index][0] - base
                hi = grains[end - 1][0] - base + 1
                chunk = _le_bytes(table[lo:hi])
                pwrite_all(self.fd, chunk, self.gd[gd_index] * SECTOR + lo * 4)
                if self.rgd is not None and self.rgd[gd_index]:
                    pwrite_all(self.fd, chunk, self.rgd[gd_index] * SECTOR + lo * 4)
            index = end

    def _new_table(self, gd_index: int, table: array[int]) -> None:
        """Append a GT (and its redundant copy) to the file, then point the GD entries at it."""
        raw = _le_bytes(table) + bytes(self.gt_sectors * SECTOR - self.gt_bytes)
        copies = 2 if self.rgd is not None else 1
        first = self.next_sector
        if first + copies * self.gt_sectors > _MAX_EXTENT_FILE_SECTORS:
            raise OSError(errno.EFBIG, "VMDK sparse extent file cannot grow past 2 TiB", str(self.path))
        _pwritev_all(self.fd, [raw] * copies, first * SECTOR)
        self.next_sector = first + copies * self.gt_sectors
        self.file_size = max(self.file_size, self.next_sector * SECTOR)
        self._gts[gd_index] = table
        self.gd[gd_index] = first
        pwrite_all(self.fd, first.to_bytes(4, "little"), self.header.gd_offset * SECTOR + gd_index * 4)
        if self.rgd is not None:
            second = first + self.gt_sectors
            self.rgd[gd_index] = second
            pwrite_all(self.fd, second.to_bytes(4, "little"), self.header.rgd_offset * SECTOR + gd_index * 4)

    @override
    def fds(self) -> list[int]:
        return [self.fd]


def _read_sparse_header(fd: int, path: Path, file_size: int) -> SparseExtentHeader:
    """Read and check a sparse extent's header (the footer's, for stream images with GD_AT_END)."""
    raw = pread_exact(fd, 0, SparseExtentHeader.SIZE, path, "sparse extent header")
    header = SparseExtentHeader.from_bytes(raw, path)
    if header.magic == MAGIC_COWD:
        raise UnsupportedImageError(
            path,
            "magic",
            "COWD sparse extents (ESXi vmfsSparse snapshots, VMware Workstation 3 disks) are not "
            "supported; convert the disk with vmkfstools or qemu-img convert first",
        )
    if header.magic != MAGIC_KDMV:
        raise ImageFormatError(path, "magic", f"{header.magic!r} is not a VMDK sparse extent (KDMV)")
    if header.gd_offset == GD_AT_END:
        header = _read_footer(fd, path, file_size)
    if header.version not in (1, 2, 3):
        raise UnsupportedImageError(path, "version", f"sparse extent version {header.version} is unknown")
    if header.compress_algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        raise UnsupportedImageError(
            path, "compressAlgorithm", f"compression algorithm {header.compress_algorithm} is unknown"
        )
    grain = header.grain_size
    if grain < 1 or grain > MAX_GRAIN_SECTORS or grain & (grain - 1):
        raise ImageFormatError(
            path, "grainSize", f"{grain} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
        )
    if not 1 <= header.num_gtes_per_gt <= MAX_GTES_PER_GT:
        raise ImageFormatError(
            path, "numGTEsPerGT", f"{header.num_gtes_per_gt} is not between 1 and {MAX_GTES_PER_GT}"
        )
    if header.capacity == 0:
        raise ImageFormatError(path, "capacity", "a sparse extent of 0 sectors holds no disk")
    entries = -(-header.capacity // (header.num_gtes_per_gt * grain))
    if entries > MAX_GD_ENTRIES:
        raise ImageFormatError(
            path,
            "capacity",
            f"{header.capacity} sectors needs {entries} grain directory entries (at most {MAX_GD_ENTRIES})",
        )
    if header.overhead * SECTOR > file_size:
        raise ImageFormatError(
            path,
            "overHead",
            f"the file is {file_size} bytes but its metadata area is {header.overhead * SECTOR} "
            "(truncated image?)",
        )
    return header


def _read_footer(fd: int, path: Path, file_size: int) -> SparseExtentHeader:
    """The footer of a stream-optimized extent: footer marker, header copy, end-of-stream marker."""
    size = 3 * SECTOR
    if file_size < size + SECTOR:
        raise ImageFormatError(path, "footer", "gdOffset is GD_AT_END but the file is too short for a footer")
    raw = pread_exact(fd, file_size - size, size, path, "footer")
    marker = Marker.from_bytes(raw[:SECTOR], path)
    footer = SparseExtentHeader.from_bytes(raw[SECTOR : 2 * SECTOR], path)
    eos = Marker.from_bytes(raw[2 * SECTOR :], path)
    if (
        marker.size != 0
        or marker.type != MARKER_FOOTER
        or footer.magic != MAGIC_KDMV
        or (eos.value, eos.size, eos.type) != (0, 0, MARKER_EOS)
    ):
        raise ImageFormatError(
            path,
            "footer",
            "gdOffset is GD_AT_END but the file does not end with footer marker, footer and "
            "end-of-stream marker (truncated stream?)",
        )
    if footer.gd_offset == GD_AT_END:
        raise ImageFormatError(path, "footer gdOffset", "the footer does not locate the grain directory")
    return footer


def _parent_candidates(child: Path, hint: str) -> list[Path]:
    """Where a parentFileNameHint may point: as written (relative to the child), then its bare name."""
    folder = child.parent
    found: list[Path] = []
    if "\\" in hint or (len(hint) > 1 and hint[1] == ":"):
        name = PureWindowsPath(hint).name
    else:
        found.append(folder / hint)
        name = PurePosixPath(hint).name
    if name:
        found.append(folder / name)
    return found


class VMDKImage(DiskImage):
    """A VMware VMDK disk: descriptor plus extents, and its delta-link parents.

    Attributes beyond :class:`DiskImage`'s:
        create_type: the descriptor's ``createType`` (``"monolithicSparse"``, ``"streamOptimized"``, ...).
        cid: the content id; ``parent_cid`` the parent's content id recorded in this image
            (``0xffffffff`` without a parent).
        extent_files: the files holding the data, in disk order (ZERO extents have none).
    """

    format: ClassVar[str] = "vmdk"

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        size: int,
        writable: bool,
        extents: list[_Extent],
        descriptor: Descriptor | None,
        descriptor_area: tuple[int, int] | None,
        owned_fds: list[int],
        cid: int,
        parent_cid: int,
        parent: DiskImage | None = None,
    ) -> None:
        super().__init__(path, fd, size=size, writable=writable, parent=parent)
        self._extents = extents
        self._starts = [e.vstart for e in extents]
        self._descriptor = descriptor
        self._descriptor_area = descriptor_area  # (byte offset, bytes) when embedded in self._fd
        self._owned_fds = owned_fds
        self._cid_updated = False
        self.create_type = descriptor.create_type if descriptor is not None else "monolithicSparse"
        self.cid = cid
        self.parent_cid = parent_cid
        self.extent_files = tuple(dict.fromkeys(e.path for e in extents if not isinstance(e, _ZeroExtent)))

    # -- detection and opening ------------------------------------------------------------------

    @classmethod
    @override
    def probe(cls, head: bytes, tail: bytes) -> bool:
        """A sparse extent (``KDMV``, or ``COWD`` which open refuses) or a text descriptor."""
        return head[:4] in (MAGIC_KDMV, MAGIC_COWD) or looks_like_descriptor(head)

    @classmethod
    @override
    def open(cls, path: Path, *, writable: bool, guard: ChainGuard) -> Self:
        fd = open_image_file(path, writable=writable)
        owned: list[int] = []
        parent: DiskImage | None = None
        try:
            head = os.pread(fd, SECTOR, 0)
            descriptor_area: tuple[int, int] | None = None
            extents: list[_Extent]
            if head[:4] in (MAGIC_KDMV, MAGIC_COWD):
                sparse = _SparseExtent.open(path, fd, 0, writable=writable)
                extents = [sparse]
                descriptor, descriptor_area = _embedded_descriptor(fd, path, sparse)
            else:
                descriptor = _read_descriptor_file(fd, path)
                extents = _open_extents(path, descriptor, guard, writable=writable, owned=owned, fd=fd)
            size = sum(e.length for e in extents)
            cid = descriptor.cid(path) if descriptor is not None and descriptor.get("CID") else 0
            parent_cid = descriptor.cid(path, "parentCID") if descriptor is not None else NO_PARENT_CID
            if descriptor is not None and descriptor.parent_hint is not None:
                parent = _open_parent(path, descriptor, guard, writable=writable)
            return cls(
                path,
                fd,
                size=size,
                writable=writable,
                extents=extents,
                descriptor=descriptor,
                descriptor_area=descriptor_area,
                owned_fds=owned,
                cid=cid,
                parent_cid=parent_cid,
                parent=parent,
            )
        except BaseException:
            if parent is not None:
                parent.close()
            for extra in owned:
                os.close(extra)
            os.close(fd)
            raise

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    @override
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        """Create a VMDK.

        Options:
            subformat: ``"monolithicSparse"`` (default), ``"twoGbMaxExtentSparse"``,
                ``"monolithicFlat"`` or ``"twoGbMaxExtentFlat"``.
            adapter_type: ``"ide"`` (default), ``"lsilogic"``, ``"buslogic"`` or ``"legacyESX"``.

        With ``parent`` (a VMDK) the new image is a sparse delta link recording the parent's CID and
        its path relative to the new image; the size defaults to the parent's.
        """
        subformat = options.pop("subformat", "monolithicSparse")
        adapter_type = options.pop("adapter_type", "ide")
        if options:
            raise TypeError(f"unknown VMDK options {sorted(options)}; known: subformat, adapter_type")
        if subformat not in SUBFORMATS:
            raise ValueError(
                f"VMDK subformat {subformat!r} cannot be created; choose one of {', '.join(SUBFORMATS)}"
                " (streamOptimized is read-only here)"
            )
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type {adapter_type!r} is not one of {', '.join(ADAPTER_TYPES)}")
        sparse = subformat.endswith("Sparse")
        parent_cid = NO_PARENT_CID
        hint: str | None = None
        if parent is not None:
            if not sparse:
                raise ValueError(f"a {subformat} VMDK cannot have a parent; use a sparse subformat")
            base = guard.enter(path).open_parent(path, parent, format="vmdk")
            try:
                if not isinstance(base, VMDKImage):  # pragma: no cover - format="vmdk" guarantees it
                    raise ChainError(path, "parent", f"{parent} is not a VMDK image")
                parent_cid = base.cid
                if size is None:
                    size = base.size
            finally:
                base.close()
            hint = PurePosixPath(os.path.relpath(parent.absolute(), path.absolute().parent)).as_posix()
        if size is None:
            raise ValueError("a new VMDK needs a size (or a parent to take it from)")
        if size > MAX_CREATE_SIZE:
            raise ValueError(
                f"{size} bytes is more than the {MAX_CREATE_SIZE >> 40} TiB a VMDK made here may be"
            )
        sectors = -(-size // SECTOR)
        if subformat == "monolithicSparse" and sectors > (1 << 32) - (1 << 20):
            raise ValueError("a monolithicSparse VMDK holds at most 2 TiB; use twoGbMaxExtentSparse")
        _create_files(
            path,
            sectors=sectors,
            subformat=subformat,
            adapter_type=adapter_type,
            parent_cid=parent_cid,
            hint=hint,
        )
        return cls.open(path, writable=True, guard=guard.enter(path))

    # -- I/O ------------------------------------------------------------------------------------

    @override
    def _readinto_at(self, offset: int, buf: memoryview) -> None:
        extents = self._extents
        if len(extents) == 1:
            extents[0].readinto(offset, buf, self._read_parent)
            return
        index = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        total = len(buf)
        while pos < total:
            extent = extents[index]
            local = offset + pos - extent.vstart
            take = min(extent.length - local, total - pos)
            extent.readinto(local, buf[pos : pos + take], self._read_parent)
            pos += take
            index += 1

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        extents = self._extents
        index = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        total = len(data)
        while pos < total:
            extent = extents[index]
            local = offset + pos - extent.vstart
            take = min(extent.length - local, total - pos)
            extent.write(local, data[pos : pos + take], self._read_parent)
            pos += take
            index += 1
        if not self._cid_updated:
            self._new_cid()

    def _new_cid(self) -> None:
        """Give the image a new content id: its data changed, so children made before must notice."""
        self._cid_updated = True
        descriptor = self._descriptor
        if descriptor is None:
            return
        cid = self.cid
        while cid in (self.cid, NO_PARENT_CID):
            cid = secrets.randbits(32)
        old = descriptor.encoded()
        updated = descriptor.with_cid(cid)
        new = updated.encoded()
        if self._descriptor_area is not None:
            start, room = self._descriptor_area
            if len(new) > room:  # pragma: no cover - the CID line grows by at most 8 bytes
                raise ImageFormatError(self.path, "descriptor", "no room left to update the CID")
            pwrite_all(self._fd, new + bytes(max(0, len(old) - len(new))), start)
        else:
            pwrite_all(self._fd, new, 0)
            if len(new) < len(old):
                os.ftruncate(self._fd, len(new))
        self._descriptor = updated
        self.cid = cid

    @override
    def sync(self) -> None:
        """Flush and fsync the descriptor and every extent file."""
        super().sync()
        if self._writable:
            for extent in self._extents:
                for fd in extent.fds():
                    if fd != self._fd:
                        os.fsync(fd)

    @override
    @override
    def _files(self) -> list[tuple[Path, int]]:
        files = super()._files()
        seen = {fd for _path, fd in files}
        for extent in self._extents:
            for fd in extent.fds():
                if fd not in seen:
                    seen.add(fd)
                    files.append((extent.path, fd))
        return files

    @override
    def _close_files(self) -> None:
        owned, self._owned_fds = self._owned_fds, []
        for fd in owned:
            os.close(fd)


def _embedded_descriptor(
    fd: int, path: Path, sparse: _SparseExtent
) -> tuple[Descriptor | None, tuple[int, int] | None]:
    header = sparse.header
    if header.descriptor_offset == 0 or header.descriptor_size == 0:
        return None, None
    start = header.descriptor_offset * SECTOR
    room = header.descriptor_size * SECTOR
    if room > MAX_DESCRIPTOR_BYTES:
        raise ImageFormatError(path, "descriptorSize", f"{header.descriptor_size} sectors is absurdly large")
    if start + room > sparse.file_size:
        raise ImageFormatError(
            path,
            "descriptorOffset",
            f"the embedded descriptor lies past the end of the {sparse.file_size}-byte file",
        )
    raw = pread_exact(fd, start, room, path, "embedded descriptor")
    return parse_descriptor(raw, path, extents_matter=False), (start, room)


def _read_descriptor_file(fd: int, path: Path) -> Descriptor:
    size = os.fstat(fd).st_size
    if size > MAX_DESCRIPTOR_BYTES:
        raise ImageFormatError(path, None, "not a VMDK: no sparse header and far too big for a descriptor")
    raw = pread_exact(fd, 0, size, path, "descriptor")
    if not looks_like_descriptor(raw[:4096]):
        raise ImageFormatError(path, None, "not a VMDK: neither a sparse extent (KDMV) nor a text descriptor")
    descriptor = parse_descriptor(raw, path)
    create_type = descriptor.create_type
    if not create_type:
        raise ImageFormatError(path, "createType", "the descriptor has no createType")
    if create_type.lower() in _DEVICE_CREATE_TYPES:
        raise UnsupportedImageError(
            path, "createType", f"{create_type} disks pass through to physical devices; refusing to open them"
        )
    if not descriptor.extents:
        raise ImageFormatError(path, "extents", "the descriptor lists no extents")
    return descriptor


def _open_extents(
    path: Path, descriptor: Descriptor, guard: ChainGuard, *, writable: bool, owned: list[int], fd: int
) -> list[_Extent]:
    """The extents ``descriptor`` (open on ``fd``) lists; their descriptors are added to ``owned``."""
    extents: list[_Extent] = []
    vstart = 0
    st = os.fstat(fd)
    descriptor_key = (st.st_dev, st.st_ino)
    opened: dict[tuple[int, int], tuple[int, str]] = {}
    for number, line in enumerate(descriptor.extents, 1):
        field = f"extent {number}"
        if line.type not in _SUPPORTED_EXTENT_TYPES:
            raise UnsupportedImageError(
                path,
                field,
                f"{line.type} extents (ESXi VMFS, raw device mappings, seSparse) are not supported",
            )
        if line.access == "NOACCESS":
            raise UnsupportedImageError(path, field, "the extent is marked NOACCESS")
        if line.sectors == 0:
            raise ImageFormatError(path, field, "an extent of 0 sectors")
        if writable and (line.access != "RW" or line.type == "ZERO"):
            raise UnsupportedImageError(
                path, field, f"a {line.access} {line.type} extent cannot be written; open read-only"
            )
        if line.type == "ZERO":
            extents.append(_ZeroExtent(path, vstart, line.sectors * SECTOR))
            vstart += line.sectors * SECTOR
            continue
        if not line.filename:
            raise ImageFormatError(path, field, f"a {line.type} extent needs a file name")
        file = Path(line.filename) if os.path.isabs(line.filename) else path.parent / line.filename
        guard.check_location(path, file, field)
        try:
            fd = open_image_file(file, writable=writable, role=f"{field} of {path}")
        except FileNotFoundError:
            raise ImageFormatError(path, field, f"extent file {file} does not exist") from None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key == descriptor_key:
            os.close(fd)
            raise ImageFormatError(path, field, f"extent file {file} is the descriptor itself")
        if key in opened:
            os.close(fd)  # one descriptor per file: a file named twice is opened (and locked) once
            fd, kind = opened[key]
            if line.type != "FLAT" or kind != "FLAT":
                raise ImageFormatError(
                    path, field, f"sparse extent file {file} is named twice; each must be a file of its own"
                )
        else:
            opened[key] = (fd, line.type)
            owned.append(fd)
        extent: _Extent
        if line.type == "FLAT":
            extent = _FlatExtent(file, vstart, line.sectors * SECTOR, fd, line.offset * SECTOR)
        else:
            extent = _SparseExtent.open(file, fd, vstart, writable=writable)
        extents.append(extent)
        vstart += extent.length
    return extents


def _open_parent(path: Path, descriptor: Descriptor, guard: ChainGuard, *, writable: bool) -> DiskImage:
    hint = descriptor.parent_hint
    assert hint is not None
    candidates = _parent_candidates(path, hint)
    if not candidates:
        raise ChainError(path, "parentFileNameHint", f"{hint!r} names no file")
    chosen = next((c for c in candidates if c.exists()), candidates[0])
    if chosen.exists() and chosen.resolve() == path.resolve():
        raise ChainError(path, "parentFileNameHint", "the image names itself as its parent")
    parent = guard.open_parent(path, chosen, format="vmdk")
    expected = descriptor.cid(path, "parentCID")
    actual = parent.cid if isinstance(parent, VMDKImage) else None
    if expected != NO_PARENT_CID and actual is not None and actual != expected:
        message = (
            f"parentCID {expected:08x} does not match the CID {actual:08x} of parent {chosen}: the "
            "parent changed after this image was made, so their combined contents may be inconsistent"
        )
        if writable:
            parent.close()
            raise ChainError(path, "parentCID", message + "; refusing to write")
        try:
            warnings.warn(ImageWarning(f"{path}: {message}"), stacklevel=5)
        except BaseException:  # a warnings filter turned it into an error
            parent.close()
            raise
    return parent


# -- creation -------------------------------------------------------------------------------------


def _sparse_extent_bytes(
    capacity: int, descriptor: bytes | None
) -> tuple[SparseExtentHeader, list[tuple[int, bytes]], int]:
    """The header, the metadata pieces (byte offset, bytes) and the file size of a new sparse extent."""
    grain = DEFAULT_GRAIN_SECTORS
    gtes = MAX_GTES_PER_GT
    grains = -(-capacity // grain)
    gt_count = -(-grains // gtes)
    gt_sectors = gtes * 4 // SECTOR
    gd_sectors = -(-gt_count * 4 // SECTOR)
    desc_offset, desc_size = (1, _DESCRIPTOR_SECTORS) if descriptor is not None else (0, 0)
    rgd = 1 + desc_size
    gd = rgd + gd_sectors + gt_count * gt_sectors
    overhead = -(-(gd + gd_sectors + gt_count * gt_sectors) // grain) * grain
    header = SparseExtentHeader(
        magic=MAGIC_KDMV,
        version=1,
        flags=FLAG_NEWLINE_TEST | FLAG_REDUNDANT,
        capacity=capacity,
        grain_size=grain,
        descriptor_offset=desc_offset,
        descriptor_size=desc_size,
        num_gtes_per_gt=gtes,
        rgd_offset=rgd,
        gd_offset=gd,
        overhead=overhead,
        unclean_shutdown=0,
        newline_test=b"\n \r\n",
        compress_algorithm=COMPRESSION_NONE,
        pad=bytes(433),
    )
    pieces = [(0, header.to_bytes())]
    if descriptor is not None:
        if len(descriptor) > desc_size * SECTOR:
            raise ValueError("the descriptor does not fit in its area (parent path too long?)")
        pieces.append((desc_offset * SECTOR, descriptor))
    for table_at in (rgd, gd):
        directory = array("I", [table_at + gd_sectors + i * gt_sectors for i in range(gt_count)])
        pieces.append((table_at * SECTOR, _le_bytes(directory)))
    return header, pieces, overhead * SECTOR


def _extent_plan(path: Path, sectors: int, subformat: str) -> list[ExtentLine]:
    stem = path.stem if path.suffix.lower() == ".vmdk" else path.name
    if subformat == "monolithicSparse":
        return [ExtentLine("RW", sectors, "SPARSE", path.name)]
    if subformat == "monolithicFlat":
        return [ExtentLine("RW", sectors, "FLAT", f"{stem}-flat.vmdk", 0)]
    kind, letter = ("SPARSE", "s") if subformat == "twoGbMaxExtentSparse" else ("FLAT", "f")
    plan = []
    for number, start in enumerate(range(0, sectors, SPLIT_EXTENT_SECTORS), 1):
        count = min(SPLIT_EXTENT_SECTORS, sectors - start)
        plan.append(ExtentLine("RW", count, kind, f"{stem}-{letter}{number:03d}.vmdk", 0))
    return plan


def _create_files(
    path: Path, *, sectors: int, subformat: str, adapter_type: str, parent_cid: int, hint: str | None
) -> None:
    plan = _extent_plan(path, sectors, subformat)
    cid = secrets.randbits(32)
    while cid == NO_PARENT_CID:  # pragma: no cover - one chance in 4 billion
        cid = secrets.randbits(32)
    text = render_descriptor(
        cid=cid,
        parent_cid=parent_cid,
        create_type=subformat,
        extents=plan,
        sectors=sectors,
        adapter_type=adapter_type,
        parent_hint=hint,
    ).encode("utf-8")
    targets = (
        [path]
        if subformat == "monolithicSparse"
        else [path, *(path.parent / e.filename for e in plan if e.filename)]
    )
    for target in targets:
        if target.exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(target))
    made: list[Path] = []
    try:
        if subformat == "monolithicSparse":
            _write_new_file(path, made, sparse_capacity=sectors, descriptor=text)
            return
        _write_new_file(path, made, contents=text)
        for line in plan:
            assert line.filename is not None
            target = path.parent / line.filename
            if line.type == "SPARSE":
                _write_new_file(target, made, sparse_capacity=line.sectors)
            else:
                _write_new_file(target, made, flat_bytes=line.sectors * SECTOR)
    except BaseException:
        for file in made:
            file.unlink(missing_ok=True)
        raise


def _write_new_file(
    target: Path,
    made: list[Path],
    *,
    sparse_capacity: int | None = None,
    descriptor: bytes | None = None,
    contents: bytes | None = None,
    flat_bytes: int | None = None,
) -> None:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    made.append(target)
    try:
        if sparse_capacity is not None:
            _header, pieces, file_size = _sparse_extent_bytes(sparse_capacity, descriptor)
            os.ftruncate(fd, file_size)
            for offset, data in pieces:
                pwrite_all(fd, data, offset)
        elif contents is not None:
            pwrite_all(fd, contents, 0)
        elif flat_bytes is not None:
            os.ftruncate(fd, flat_bytes)
    finally:
        os.close(fd)
