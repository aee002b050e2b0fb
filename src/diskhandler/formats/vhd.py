"""VHD images: Connectix / Microsoft Virtual PC, Virtual Server and Hyper-V "v1" disks.

Layout (Microsoft "Virtual Hard Disk Image Format Specification" 1.0; every integer big-endian)::

    fixed:                 [virtual disk bytes][footer 512]
    dynamic/differencing:  [footer copy 512][dynamic header 1024][BAT][parent locators][blocks...][footer 512]

A block is a sector bitmap (one bit per 512-byte sector, most significant bit first, padded to whole
sectors) followed by ``block_size`` data bytes; the BAT holds the *sector number* of each block's bitmap
or ``0xFFFFFFFF`` when the block is not allocated.

Reading:

* fixed — the file itself;
* dynamic — allocated blocks from their data area, unallocated ones as zeros (the bitmap is not
  consulted, as qemu does: writers fill a block's unused sectors with zeros);
* differencing — sector by sector: a set bitmap bit reads the child, a clear bit or an unallocated
  block reads the parent, found through the parent locators and checked by its unique id.

The virtual size is the footer's *current size*, except for images made by Virtual PC (``vpc ``),
Virtual Server (``vs  ``) and old qemu (``qemu``), whose size is their CHS geometry — those products
size disks by geometry. A geometry of 65535/16/255 always means "use the current size".

Writing keeps a killed process from leaving a broken image: a new block is appended where the trailing
footer was, after the footer has first been rewritten at the new end of the file; then comes a bitmap
under which the block reads as before (dynamic: all zeros; differencing: all from the parent), then the
BAT entry, and only then the data and the bitmap bits of the sectors written. Until the BAT entry the
new block is unreferenced space holding no data.
"""

from __future__ import annotations

import bisect
import os
import sys
import time
import uuid
import warnings
from array import array
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Self
from urllib.parse import unquote, urlparse

from typing_extensions import override

from diskhandler.errors import (
    ChainError,
    ImageFormatError,
    ImageInUseError,
    ImageWarning,
    ReadOnlyImageError,
    UnsupportedImageError,
)
from diskhandler.formats._blockmap import DATA, PARENT, ZERO, BlockMappedImage, closing_on_error
from diskhandler.formats._files import open_image_file
from diskhandler.formats._layout import Layout, binary_layout, ffield
from diskhandler.formats._stream import DiskImage, preadinto_exact, pwrite_all
from diskhandler.formats.chain import ChainGuard

__all__ = [
    "CREATOR_APP",
    "DEFAULT_BLOCK_SIZE",
    "MAX_VHD_SIZE",
    "ParentLocator",
    "VHDDynamicHeader",
    "VHDFooter",
    "VHDImage",
    "vhd_checksum",
]

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
VERSION_1_0 = 0x00010000

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
_DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

UNALLOCATED = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

#: The creator application diskhandler writes into new images.
CREATOR_APP = b"pyti"
CREATOR_VERSION = 0x00010000
CREATOR_HOST_OS = b"Wi2k"  # what qemu and Windows write; no reader depends on it
#: CHS written into new images: the maximum geometry, which every reader (qemu since 2.6 included)
#: takes as "the size is the current size field" -- the same choice as ``qemu-img -o force_size=on``.
MAX_GEOMETRY = (65535, 16, 255)
#: Creators whose products size a disk by its CHS geometry.
CHS_CREATORS = frozenset({b"vpc ", b"vs  ", b"qemu"})

DEFAULT_BLOCK_SIZE = 2 << 20
MAX_BLOCK_SIZE = 256 << 20
#: The bitmap is block_size // 512 // 8 bytes padded to whole sectors (as qemu and VirtualBox size it):
#: smaller blocks have none, which a differencing image cannot do without.
MIN_DIFFERENCING_BLOCK_SIZE = 4096
#: The format's limit (2040 GiB); qemu refuses larger dynamic images too.
MAX_VHD_SIZE = 2040 << 30
#: At most 16 MiB of BAT in memory (2040 GiB in 512 KiB blocks).
MAX_BAT_ENTRIES = 1 << 22
MAX_LOCATOR_LENGTH = 1 << 16
_LOCATOR_SLOTS = 8
_BITMAP_CACHE_BYTES = 8 << 20  # bitmaps kept (16384 of 2 MiB blocks; fewer of larger ones)
#: Runs of equal bitmap bits kept (each about 100 bytes): a fragmented child has hundreds per block.
_RUNS_CACHE_LIMIT = 1 << 16

_EPOCH_2000 = 946684800  # 2000-01-01T00:00:00Z as a Unix time


# -- on-disk structures ------------------------------------------------------------------------------


@binary_layout(">")
class VHDFooter(Layout):
    """The 512-byte hard disk footer (spec section "Hard Disk Footer Format")."""

    cookie: bytes = ffield("8s")
    features: int = ffield("I")
    format_version: int = ffield("I")
    data_offset: int = ffield("Q")
    timestamp: int = ffield("I")
    creator_app: bytes = ffield("4s")
    creator_version: int = ffield("I")
    creator_host_os: bytes = ffield("4s")
    original_size: int = ffield("Q")
    current_size: int = ffield("Q")
    cylinders: int = ffield("H")
    heads: int = ffield("B")
    sectors_per_track: int = ffield("B")
    disk_type: int = ffield("I")
    checksum: int = ffield("I")
    unique_id: bytes = ffield("16s")
    saved_state: int = ffield("B")
    reserved: bytes = ffield("427s")

    @property
    def chs_size(self) -> int:
        """The size the CHS geometry describes, in bytes."""
        return self.cylinders * self.heads * self.sectors_per_track * SECTOR

    @property
    def max_geometry(self) -> bool:
        """Whether the geometry is 65535/16/255, which means "size is the current size"."""
        return (self.cylinders, self.heads, self.sectors_per_track) == MAX_GEOMETRY


@binary_layout(">")
class ParentLocator(Layout):
    """One of the eight 24-byte parent locator entries of a dynamic header."""

    platform_code: bytes = ffield("4s")
    data_space: int = ffield("I")  # sectors per the spec, bytes as Windows writes it: never used
    data_length: int = ffield("I")
    reserved: int = ffield("I")
    data_offset: int = ffield("Q")


@binary_layout(">")
class VHDDynamicHeader(Layout):
    """The 1024-byte dynamic disk header of dynamic and differencing images."""

    cookie: bytes = ffield("8s")
    data_offset: int = ffield("Q")
    table_offset: int = ffield("Q")
    header_version: int = ffield("I")
    max_table_entries: int = ffield("I")
    block_size: int = ffield("I")
    checksum: int = ffield("I")
    parent_unique_id: bytes = ffield("16s")
    parent_timestamp: int = ffield("I")
    reserved1: int = ffield("I")
    parent_unicode_name: bytes = ffield("512s")  # UTF-16 *big*-endian, NUL padded
    parent_locators: bytes = ffield("192s")  # 8 x ParentLocator
    reserved2: bytes = ffield("256s")

    def locators(self) -> list[ParentLocator]:
        """The parent locator entries in use (platform code not zero)."""
        raw = self.parent_locators
        found = []
        for i in range(_LOCATOR_SLOTS):
            entry = ParentLocator.from_bytes(raw[i * ParentLocator.SIZE : (i + 1) * ParentLocator.SIZE])
            if entry.platform_code != bytes(4):
                found.append(entry)
        return found

    def parent_name(self) -> str:
        """The parent's file name as stored (UTF-16 big-endian, up to the first NUL)."""
        raw = self.parent_unicode_name
        end = len(raw)
        for i in range(0, len(raw), 2):
            if raw[i : i + 2] == b"\0\0":
                end = i
                break
        return raw[:end].decode("utf-16-be", errors="replace")


VHDFooter.NAME = "footer"
ParentLocator.NAME = "parent locator"
VHDDynamicHeader.NAME = "dynamic disk header"


def vhd_checksum(data: bytes | bytearray, checksum_at: int) -> int:
    """The one's complement of the byte sum of ``data`` with its 4-byte checksum field taken as zero."""
    total = sum(data) - sum(data[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


_FOOTER_CHECKSUM_AT = 64
_HEADER_CHECKSUM_AT = 36


def _sealed_footer(footer: VHDFooter) -> bytes:
    raw = footer.to_bytes()
    return footer.evolve(checksum=vhd_checksum(raw, _FOOTER_CHECKSUM_AT)).to_bytes()


def _sealed_header(header: VHDDynamicHeader) -> bytes:
    raw = header.to_bytes()
    return header.evolve(checksum=vhd_checksum(raw, _HEADER_CHECKSUM_AT)).to_bytes()


def _timestamp_now() -> int:
    return max(0, int(time.time()) - _EPOCH_2000) & 0xFFFFFFFF


def _align(value: int, to: int = SECTOR) -> int:
    return -(-value // to) * to


# -- finding the footer ------------------------------------------------------------------------------


def _read_footer(fd: int, path: Path, file_size: int) -> tuple[VHDFooter, bytes, int]:
    """The footer that describes the image, its raw bytes and how long the trailing footer is.

    The trailing footer (512 bytes, or 511 in fixed images of Virtual PC before 2004) wins for fixed
    disks; dynamic and differencing disks are read from the copy at offset 0, as qemu does, falling back
    to the trailing one when the copy is damaged. The returned length is 0 when there is no trailing
    footer (a dynamic image whose end was cut off).
    """
    if file_size < FOOTER_SIZE - 1:
        raise ImageFormatError(path, "footer", f"file has {file_size} bytes, too short for a VHD footer")
    tail = os.pread(fd, FOOTER_SIZE, max(0, file_size - FOOTER_SIZE))
    head = os.pread(fd, FOOTER_SIZE, 0)
    trailing: bytes | None = None
    trailing_len = 0
    if tail[:8] == FOOTER_COOKIE and len(tail) == FOOTER_SIZE:
        trailing, trailing_len = tail, FOOTER_SIZE
    elif tail[1:9] == FOOTER_COOKIE:  # a 511-byte footer: the last reserved byte is missing
        trailing, trailing_len = tail[1:] + b"\0", FOOTER_SIZE - 1
    if trailing is not None:
        footer = VHDFooter.from_bytes(trailing, path)
        if footer.disk_type == DISK_FIXED or head[:8] != FOOTER_COOKIE or len(head) < FOOTER_SIZE:
            return footer, trailing, trailing_len
    if head[:8] == FOOTER_COOKIE and len(head) == FOOTER_SIZE:
        return VHDFooter.from_bytes(head, path), head, trailing_len
    raise ImageFormatError(path, "footer cookie", "no 'conectix' footer at the start or end: not a VHD")


def _virtual_size(footer: VHDFooter) -> tuple[int, str | None]:
    """The disk size the creator meant, and a warning when another product would see another size."""
    current = footer.current_size
    chs = footer.chs_size
    if footer.max_geometry or footer.creator_app not in CHS_CREATORS:
        size = current
        if chs > current and not footer.max_geometry:
            return size - size % SECTOR, (
                f"CHS geometry {footer.cylinders}/{footer.heads}/{footer.sectors_per_track} describes "
                f"{chs} bytes, more than the current size {current}; using the current size"
            )
        return size - size % SECTOR, None
    if chs != current:
        app = footer.creator_app.decode("latin-1")
        return chs, (
            f"made by {app!r}, which sizes disks by CHS geometry: using {chs} bytes from "
            f"{footer.cylinders}/{footer.heads}/{footer.sectors_per_track}, although the current size "
            f"field says {current} (Hyper-V would show {current} bytes)"
        )
    return chs, None


# -- the image -------------------------------------------------------------------------------------


class VHDImage(BlockMappedImage):
    """A fixed, dynamic or differencing VHD.

    Attributes:
        footer: the parsed hard disk footer.
        header: the dynamic disk header (``None`` for fixed images).
        disk_type: ``"fixed"``, ``"dynamic"`` or ``"differencing"``.
        block_size: data bytes per block (``0`` for fixed images).
    """

    format: ClassVar[str] = "vhd"

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        size: int,
        writable: bool,
        footer: VHDFooter,
        header: VHDDynamicHeader | None,
        bat: array[int] | None,
        next_block: int,
        parent: DiskImage | None = None,
    ) -> None:
        super().__init__(path, fd, size=size, writable=writable, parent=parent)
        self.footer = footer
        self.header = header
        self.disk_type = _DISK_TYPE_NAMES[footer.disk_type]
        self._bat = bat
        self._footer_bytes = _sealed_footer(footer) if writable else b""
        self._next_block = next_block
        self._differencing = footer.disk_type == DISK_DIFFERENCING
        if header is not None:
            self.block_size = header.block_size
            self._shift = self._block_shift = header.block_size.bit_length() - 1
            self._bitmap_size = _align(header.block_size // SECTOR // 8)
            self._sectors_per_block = header.block_size // SECTOR
            self._bat_offset = header.table_offset
        else:
            self.block_size = 0
            self._shift = 0
            self._bitmap_size = 0
            self._sectors_per_block = 0
            self._bat_offset = 0
        self._bitmaps: dict[int, bytearray] = {}
        self._bitmap_cache_limit = max(16, _BITMAP_CACHE_BYTES // max(1, self._bitmap_size))
        self._runs: dict[int, list[tuple[int, int, bool]]] = {}
        self._runs_cached = 0  # total length of the lists in self._runs

    # -- detection and opening ----------------------------------------------------------------------

    @classmethod
    @override
    def probe(cls, head: bytes, tail: bytes) -> bool:
        """A ``conectix`` footer at the start (dynamic) or at the end, 512 or 511 bytes before it."""
        return (
            head[:8] == FOOTER_COOKIE
            or tail[-FOOTER_SIZE:][:8] == FOOTER_COOKIE
            or tail[-(FOOTER_SIZE - 1) :][:8] == FOOTER_COOKIE
        )

    @classmethod
    @override
    def _from_fd(cls, path: Path, fd: int, *, writable: bool, guard: ChainGuard) -> Self:
        file_size = os.fstat(fd).st_size
        footer, raw_footer, trailing_len = _read_footer(fd, path, file_size)
        if footer.format_version >> 16 != 1:
            raise UnsupportedImageError(
                path, "footer format version", f"version {footer.format_version:#010x} is not 1.x"
            )
        if footer.disk_type not in _DISK_TYPE_NAMES:
            raise UnsupportedImageError(
                path,
                "footer disk type",
                f"disk type {footer.disk_type} is not fixed (2), dynamic (3) or differencing (4)",
            )
        stale: list[str] = []
        if vhd_checksum(raw_footer, _FOOTER_CHECKSUM_AT) != footer.checksum:
            stale.append("footer")
        size, size_warning = _virtual_size(footer)
        if size_warning:
            warnings.warn(ImageWarning(f"{path}: {size_warning}"), stacklevel=4)

        header: VHDDynamicHeader | None = None
        bat: array[int] | None = None
        next_block = 0
        if footer.disk_type == DISK_FIXED:
            data_end = file_size - trailing_len
            if size > data_end:
                raise ImageFormatError(
                    path,
                    "current size",
                    f"a fixed disk of {size} bytes needs {size + trailing_len} bytes of file but the file "
                    f"has {file_size} (truncated image?)",
                )
        else:
            if not 0 < size <= MAX_VHD_SIZE:
                raise ImageFormatError(
                    path, "current size", f"{size} bytes is outside 1 byte .. 2040 GiB, the VHD limit"
                )
            if trailing_len == 0:
                warnings.warn(
                    ImageWarning(f"{path}: the trailing footer is missing (the file end was cut off?)"),
                    stacklevel=4,
                )
            header, raw_header = cls._read_header(fd, path, footer, file_size)
            if vhd_checksum(raw_header, _HEADER_CHECKSUM_AT) != header.checksum:
                stale.append("dynamic disk header")
            bat, next_block = cls._read_bat(fd, path, footer, header, size, file_size, trailing_len)

        if stale:
            what = (
                "footer and dynamic disk header checksums are"
                if len(stale) > 1
                else f"{stale[0]} checksum is"
            )
            reason = (
                f"the {what} stale (the image was edited by hand or by a faulty tool); it is opened "
                "read-only so that nothing is written on top of metadata that may be wrong"
            )
            if writable:
                raise ReadOnlyImageError(f"{path}: cannot open for writing: {reason}")
            warnings.warn(ImageWarning(f"{path}: {reason}"), stacklevel=4)
        if footer.saved_state and writable:
            raise ImageInUseError(
                path,
                "a saved virtual machine state",
                "the footer's saved-state flag is set: a suspended VM expects this disk unchanged; "
                "resume or discard that VM's saved state first (reading is allowed)",
            )

        parent: DiskImage | None = None
        if header is not None and footer.disk_type == DISK_DIFFERENCING:
            parent = _open_parent(path, header, guard)
        with closing_on_error(parent):
            return cls(
                path,
                fd,
                size=size,
                writable=writable,
                footer=footer,
                header=header,
                bat=bat,
                next_block=next_block,
                parent=parent,
            )

    @staticmethod
    def _read_header(
        fd: int, path: Path, footer: VHDFooter, file_size: int
    ) -> tuple[VHDDynamicHeader, bytes]:
        where = footer.data_offset
        if where < FOOTER_SIZE or where + HEADER_SIZE > file_size:
            raise ImageFormatError(
                path,
                "footer data offset",
                f"dynamic header offset {where:#x} is outside the {file_size}-byte file",
            )
        raw = os.pread(fd, HEADER_SIZE, where)
        header = VHDDynamicHeader.from_bytes(raw, path)
        if header.cookie != HEADER_COOKIE:
            raise ImageFormatError(
                path,
                "dynamic header cookie",
                f"expected {HEADER_COOKIE!r} at {where:#x}, found {header.cookie!r}",
            )
        if header.header_version >> 16 != 1:
            raise UnsupportedImageError(
                path, "dynamic header version", f"version {header.header_version:#010x} is not 1.x"
            )
        bs = header.block_size
        if bs < SECTOR or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise ImageFormatError(
                path,
                "dynamic header block size",
                f"block size {bs} is not a power of two between 512 bytes and {MAX_BLOCK_SIZE >> 20} MiB",
            )
        if footer.disk_type == DISK_DIFFERENCING and bs < MIN_DIFFERENCING_BLOCK_SIZE:
            raise UnsupportedImageError(
                path,
                "dynamic header block size",
                f"a differencing VHD needs blocks of at least 4 KiB; {bs}-byte blocks have no room for"
                " the sector bitmap that says which sectors the child holds",
            )
        return header, raw

    @staticmethod
    def _read_bat(  # noqa: PLR0917  (private; the caller has every piece at hand)
        fd: int,
        path: Path,
        footer: VHDFooter,
        header: VHDDynamicHeader,
        size: int,
        file_size: int,
        trailing_len: int,
    ) -> tuple[array[int], int]:
        bs = header.block_size
        needed = -(-size // bs)
        entries = header.max_table_entries
        if entries < needed:
            raise ImageFormatError(
                path,
                "dynamic header max table entries",
                f"{entries} BAT entries of {bs} bytes cannot hold a {size}-byte disk ({needed} needed)",
            )
        if needed > MAX_BAT_ENTRIES:
            raise UnsupportedImageError(
                path,
                "dynamic header block size",
                f"{needed} blocks of {bs} bytes exceed diskhandler's limit of {MAX_BAT_ENTRIES} BAT entries",
            )
        bat_start = header.table_offset
        bat_end = bat_start + 4 * min(entries, MAX_BAT_ENTRIES)
        if bat_start < FOOTER_SIZE or bat_start + 4 * needed > file_size:
            raise ImageFormatError(
                path,
                "dynamic header table offset",
                f"BAT of {needed} entries at {bat_start:#x} does not fit in the {file_size}-byte file",
            )
        bat = array("I")
        if bat.itemsize != 4:  # pragma: no cover  (every Linux and macOS ABI has 4-byte ints)
            raise RuntimeError("array('I') is not 32 bits wide on this platform")
        raw = bytearray(4 * needed)
        preadinto_exact(fd, memoryview(raw), bat_start, path, "BAT")
        bat.frombytes(raw)
        if sys.byteorder == "little":
            bat.byteswap()

        bitmap_size = _align(bs // SECTOR // 8)
        span = bitmap_size + bs
        meta = [
            (0, FOOTER_SIZE),
            (footer.data_offset, footer.data_offset + HEADER_SIZE),
            (bat_start, bat_end),
        ]
        end_of_blocks = max(e for _, e in meta)
        limit = file_size
        for index, sector in enumerate(bat):
            if sector == UNALLOCATED:
                continue
            start = sector * SECTOR
            end = start + span
            if end > limit:
                raise ImageFormatError(
                    path,
                    f"BAT entry {index}",
                    f"block at {start:#x} ends at {end:#x}, past the end of the {file_size}-byte file "
                    "(truncated image?)",
                )
            for m_start, m_end in meta:
                if start < m_end and m_start < end:
                    raise ImageFormatError(
                        path,
                        f"BAT entry {index}",
                        f"block at {start:#x} overlaps the image's metadata at {m_start:#x}..{m_end:#x}",
                    )
            end_of_blocks = max(end_of_blocks, end)
        for locator in header.locators():
            if locator.data_offset + locator.data_length <= file_size:
                end_of_blocks = max(end_of_blocks, locator.data_offset + locator.data_length)
        # The next block goes where the trailing footer is (or after whatever a crash left behind).
        footer_at = file_size - trailing_len if trailing_len == FOOTER_SIZE else file_size
        next_block = _align(max(end_of_blocks, footer_at))
        return bat, next_block

    # -- creating -----------------------------------------------------------------------------------

    @classmethod
    @override
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        """Create a VHD; see the format's documentation page for ``subformat`` and ``block_size``."""
        subformat = options.pop("subformat", None)
        block_size = options.pop("block_size", DEFAULT_BLOCK_SIZE)
        if options:
            raise TypeError(f"unknown VHD options {sorted(options)}; known: subformat, block_size")
        if subformat not in (None, "dynamic", "fixed", "differencing"):
            raise ValueError(f"VHD subformat must be 'dynamic' or 'fixed', not {subformat!r}")
        if parent is not None and subformat not in (None, "differencing", "dynamic"):
            raise ValueError("a VHD with a parent is a differencing image; it cannot be fixed")
        if subformat == "differencing" and parent is None:
            raise ValueError("a differencing VHD needs parent=")
        if (
            not isinstance(block_size, int)
            or block_size & (block_size - 1)
            or not (SECTOR <= block_size <= MAX_BLOCK_SIZE)
        ):
            raise ValueError(
                f"block_size must be a power of two between 512 and {MAX_BLOCK_SIZE}, got {block_size!r}"
            )

        if parent is not None and block_size < MIN_DIFFERENCING_BLOCK_SIZE:
            raise ValueError(f"a differencing VHD needs blocks of at least 4 KiB, not {block_size}")
        parent_info: tuple[int, bytes, int, Path] | None = None
        if parent is not None:
            parent_info = _parent_identity(path, parent, guard)
            if size is None:
                size = parent_info[0]
        if size is None:
            raise ValueError("a new VHD needs a size")
        if size % SECTOR:
            raise ValueError(f"a VHD holds whole 512-byte sectors; {size} is not a multiple of 512")
        if size > MAX_VHD_SIZE:
            raise ValueError(f"{size} bytes exceeds the VHD limit of 2040 GiB")
        if -(-size // block_size) > MAX_BAT_ENTRIES:
            raise ValueError(f"block_size {block_size} is too small for a {size}-byte disk")

        fixed = subformat == "fixed"
        disk_type = DISK_FIXED if fixed else DISK_DIFFERENCING if parent_info else DISK_DYNAMIC
        footer = VHDFooter(
            cookie=FOOTER_COOKIE,
            features=2,
            format_version=VERSION_1_0,
            data_offset=NO_DATA_OFFSET if fixed else FOOTER_SIZE,
            timestamp=_timestamp_now(),
            creator_app=CREATOR_APP,
            creator_version=CREATOR_VERSION,
            creator_host_os=CREATOR_HOST_OS,
            original_size=size,
            current_size=size,
            cylinders=MAX_GEOMETRY[0],
            heads=MAX_GEOMETRY[1],
            sectors_per_track=MAX_GEOMETRY[2],
            disk_type=disk_type,
            checksum=0,
            unique_id=uuid.uuid4().bytes,
            saved_state=0,
            reserved=bytes(427),
        )
        raw_footer = _sealed_footer(footer)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if fixed:
                os.ftruncate(fd, size)
                pwrite_all(fd, raw_footer, size)
            else:
                _write_dynamic(fd, path, size, block_size, raw_footer, parent_info)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls.open(path, writable=True, guard=guard.enter(path))

    # -- reading ------------------------------------------------------------------------------------

    @override
    def _lookup(self, offset: int, remaining: int) -> tuple[int, int, int]:
        bat = self._bat
        if bat is None:
            return DATA, offset, remaining
        bs = self.block_size
        index = offset >> self._shift
        within = offset & (bs - 1)
        sector = bat[index]
        if sector == UNALLOCATED:
            return (PARENT if self._differencing else ZERO), 0, bs - within
        data_at = sector * SECTOR + self._bitmap_size + within
        if not self._differencing:
            return DATA, data_at, bs - within
        # a differencing block: set bits read this file, clear bits the parent
        runs = self._block_runs(index)
        _first, last, here = runs[bisect.bisect_right(runs, within // SECTOR, key=_run_start) - 1]
        return (DATA if here else PARENT), data_at, last * SECTOR - within

    def _bitmap(self, index: int) -> bytearray:
        cached = self._bitmaps.get(index)
        if cached is None:
            if len(self._bitmaps) >= self._bitmap_cache_limit:
                self._bitmaps.clear()
            assert self._bat is not None
            cached = bytearray(self._bitmap_size)
            preadinto_exact(
                self._fd, memoryview(cached), self._bat[index] * SECTOR, self.path, "sector bitmap"
            )
            self._bitmaps[index] = cached
        return cached

    def _block_runs(self, index: int) -> list[tuple[int, int, bool]]:
        runs = self._runs.get(index)
        if runs is None:
            runs = _bitmap_runs(self._bitmap(index), self._sectors_per_block)
            if self._runs_cached + len(runs) > _RUNS_CACHE_LIMIT:
                self._runs.clear()
                self._runs_cached = 0
            self._runs[index] = runs
            self._runs_cached += len(runs)
        return runs

    def _forget_runs(self, index: int) -> None:
        """Drop block ``index``'s cached runs (its bitmap changed)."""
        self._runs_cached -= len(self._runs.pop(index, ()))

    # -- writing ------------------------------------------------------------------------------------

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        if self._bat is None:
            pwrite_all(self._fd, data, offset)
        else:
            super()._write_at(offset, data)

    @override
    def _write_block(self, index: int, within: int, chunk: memoryview) -> None:
        assert self._bat is not None
        first = within // SECTOR
        last = -(-(within + len(chunk)) // SECTOR)
        block_voff = index << self._shift
        if self._differencing and (within % SECTOR or len(chunk) % SECTOR):
            # A sector is either wholly here or wholly in the parent: complete partial sectors first.
            aligned = bytearray((last - first) * SECTOR)
            whole = memoryview(aligned)
            end = within + len(chunk)
            if within % SECTOR:
                self._readinto_at(block_voff + first * SECTOR, whole[:SECTOR])
            if end % SECTOR and (last - first > 1 or not within % SECTOR):
                self._readinto_at(block_voff + (last - 1) * SECTOR, whole[-SECTOR:])
            start = within - first * SECTOR
            whole[start : start + len(chunk)] = chunk
            chunk, within = whole, first * SECTOR
        sector = self._bat[index]
        if sector == UNALLOCATED:
            self._allocate(index, within, chunk, first, last)
            return
        block_at = sector * SECTOR
        pwrite_all(self._fd, chunk, block_at + self._bitmap_size + within)
        bitmap = self._bitmap(index)
        lo, hi = _set_bits(bitmap, first, last)
        if lo < hi:
            pwrite_all(self._fd, memoryview(bitmap)[lo:hi], block_at + lo)
            self._forget_runs(index)

    def _allocate(self, index: int, within: int, chunk: memoryview, first: int, last: int) -> None:
        assert self._bat is not None
        fd = self._fd
        block_at = self._next_block
        data_at = block_at + self._bitmap_size
        new_end = data_at + self.block_size
        # 1. the footer at the new end: from here on the file always ends in a footer
        pwrite_all(fd, self._footer_bytes, new_end)
        # 2. a block that reads as before: on a dynamic disk every sector marked used (its data area,
        #    new file space, is zeros, as qemu does), on a differencing disk none (all from the parent)
        bitmap = bytearray(self._bitmap_size)
        if not self._differencing:
            bitmap[:] = b"\xff" * self._bitmap_size
        pwrite_all(fd, bitmap, block_at)
        # 3. the BAT entry: the block exists, still reading as it did
        pwrite_all(fd, (block_at // SECTOR).to_bytes(4, "big"), self._bat_offset + 4 * index)
        self._bat[index] = block_at // SECTOR
        self._next_block = new_end
        self._bitmaps[index] = bitmap
        self._forget_runs(index)
        # 4. the data, then (differencing) the bits of the sectors written. Data is never written to
        #    space the BAT does not reference: other writers (qemu) reuse such space after a crash
        #    without zeroing it, and would show the stale bytes in their new block.
        pwrite_all(fd, chunk, data_at + within)
        if self._differencing:
            lo, hi = _set_bits(bitmap, first, last)
            pwrite_all(fd, memoryview(bitmap)[lo:hi], block_at + lo)


def _run_start(run: tuple[int, int, bool]) -> int:
    return run[0]


def _set_bits(bitmap: bytearray, first: int, last: int) -> tuple[int, int]:
    """Set the bits of sectors ``first..last-1`` (MSB first); the byte range that changed, or (0, 0)."""
    lo = first >> 3
    hi = (last + 7) >> 3
    before = bytes(bitmap[lo:hi])
    head_mask = 0xFF >> (first & 7)
    tail_mask = (0xFF << (8 - (last & 7))) & 0xFF if last & 7 else 0xFF
    if hi - lo == 1:
        bitmap[lo] |= head_mask & tail_mask
    else:
        bitmap[lo] |= head_mask
        bitmap[lo + 1 : hi - 1] = b"\xff" * (hi - lo - 2)
        bitmap[hi - 1] |= tail_mask
    if bitmap[lo:hi] == before:
        return 0, 0
    return lo, hi


def _bitmap_runs(bitmap: bytes | bytearray, sectors: int) -> list[tuple[int, int, bool]]:
    """Runs ``(first, last, present)`` of sectors ``0..sectors-1`` with equal bitmap bits (MSB first)."""
    nbytes, rest = divmod(sectors, 8)
    mask = (0xFF << (8 - rest)) & 0xFF
    tail = bitmap[nbytes] & mask if rest else 0
    if bitmap.count(0xFF, 0, nbytes) == nbytes and tail == mask:
        return [(0, sectors, True)]
    if bitmap.count(0, 0, nbytes) == nbytes and tail == 0:
        return [(0, sectors, False)]
    runs: list[tuple[int, int, bool]] = []
    start = 0
    state = bool(bitmap[0] & 0x80)
    s = 0
    while s < sectors:
        byte = bitmap[s >> 3]
        if s & 7 == 0 and s + 8 <= sectors and byte in (0, 0xFF):
            value = byte == 0xFF
            step = 8
        else:
            value = bool(byte & (0x80 >> (s & 7)))
            step = 1
        if value != state:
            runs.append((start, s, state))
            start, state = s, value
        s += step
    runs.append((start, sectors, state))
    return runs


# -- parents ----------------------------------------------------------------------------------------


def _peek_unique_id(path: Path, unreadable: list[str]) -> bytes | None:
    """The unique id in ``path``'s footer, or ``None`` (and why, in ``unreadable``) when it is not a
    readable VHD."""
    try:
        fd = open_image_file(path, role="candidate parent")
    except OSError as exc:
        unreadable.append(str(exc))
        return None
    try:
        footer, _, _ = _read_footer(fd, path, os.fstat(fd).st_size)
    except (ImageFormatError, OSError) as exc:
        unreadable.append(str(exc))
        return None
    finally:
        os.close(fd)
    return footer.unique_id


def _locator_text(fd: int, path: Path, locator: ParentLocator, file_size: int) -> str | None:
    length = locator.data_length
    if length == 0 or length > MAX_LOCATOR_LENGTH or locator.data_offset + length > file_size:
        return None
    raw = os.pread(fd, length, locator.data_offset)
    code = locator.platform_code
    if code in (b"W2ru", b"W2ku"):
        text = raw.decode("utf-16-le", errors="replace")
    elif code == b"MacX":
        text = unquote(urlparse(raw.decode("utf-8", errors="replace")).path)
    else:  # Wi2r, Wi2k (deprecated), Mac (an alias record): not readable here
        return None
    return text.rstrip("\0") or None


def _candidates(child: Path, header: VHDDynamicHeader, fd: int) -> list[Path]:
    """Where the parent may be, best first: W2ru, W2ku (then its file name next to the child), name."""
    folder = child.parent
    file_size = os.fstat(fd).st_size
    found: list[Path] = []
    by_code: dict[bytes, list[str]] = {}
    for locator in header.locators():
        text = _locator_text(fd, child, locator, file_size)
        if text:
            by_code.setdefault(locator.platform_code, []).append(text)
    for text in by_code.get(b"W2ru", []):
        found.append(folder / PureWindowsPath(text).as_posix())
    for text in [*by_code.get(b"W2ku", []), *by_code.get(b"MacX", [])]:
        if text.startswith("/"):
            found.append(Path(text))
        found.append(folder / _basename(text))
    name = header.parent_name()
    if name:
        found.append(folder / _basename(name))
    unique: list[Path] = []
    for candidate in found:
        normal = Path(os.path.normpath(candidate))
        if normal not in unique:
            unique.append(normal)
    return unique


def _basename(text: str) -> str:
    return PureWindowsPath(text).name if "\\" in text else PurePosixPath(text).name


def _open_parent(child: Path, header: VHDDynamicHeader, guard: ChainGuard) -> DiskImage:
    fd = open_image_file(child)
    try:
        candidates = _candidates(child, header, fd)
    finally:
        os.close(fd)
    wanted = header.parent_unique_id
    mismatched: list[str] = []
    unreadable: list[str] = []  # a damaged parent must not be reported as a missing one
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        found = _peek_unique_id(candidate, unreadable)
        if found == wanted:
            return guard.open_parent(child, candidate, format="vhd")
        if found is not None:
            mismatched.append(f"{candidate} (unique id {uuid.UUID(bytes=found)})")
    want = uuid.UUID(bytes=wanted)
    if mismatched:
        raise ChainError(
            child,
            "parent unique id",
            f"parent must have unique id {want}, but {', '.join(mismatched)} does not: the parent was "
            "replaced or changed after this differencing image was made",
        )
    tried = ", ".join(str(c) for c in candidates) or "no usable parent locator or parent name"
    damaged = f". Of these, could not be read: {'; '.join(unreadable)}" if unreadable else ""
    raise ChainError(
        child, "parent locator", f"parent image (unique id {want}) not found; tried {tried}{damaged}"
    )


def _parent_identity(child: Path, parent: Path, guard: ChainGuard) -> tuple[int, bytes, int, Path]:
    """Size, unique id, modification time stamp and absolute path of a new child's parent."""
    with guard.enter(child).open_parent(child, parent, format="vhd") as image:
        if not isinstance(image, VHDImage):  # pragma: no cover  (format="vhd" guarantees it)
            raise ChainError(child, "parent", f"{parent} is not a VHD")
        size = image.size
        unique_id = image.footer.unique_id
    mtime = int(parent.stat().st_mtime) - _EPOCH_2000
    return size, unique_id, max(0, mtime) & 0xFFFFFFFF, parent.resolve()


def _relative_locator(child: Path, parent: Path) -> str:
    rel = os.path.relpath(parent, child.resolve().parent)
    text = str(PureWindowsPath(PurePosixPath(rel)))
    return text if text.startswith("..") else ".\\" + text


def _write_dynamic(  # noqa: PLR0917  (private; called once)
    fd: int,
    path: Path,
    size: int,
    block_size: int,
    raw_footer: bytes,
    parent: tuple[int, bytes, int, Path] | None,
) -> None:
    entries = -(-size // block_size)
    bat_offset = FOOTER_SIZE + HEADER_SIZE
    bat_bytes = _align(4 * entries)
    cursor = bat_offset + bat_bytes
    locator_raw = bytearray(ParentLocator.SIZE * _LOCATOR_SLOTS)
    payloads: list[tuple[int, bytes]] = []
    parent_uid = bytes(16)
    parent_ts = 0
    parent_name = bytes(512)
    if parent is not None:
        _, parent_uid, parent_ts, parent_path = parent
        name = parent_path.name.encode("utf-16-be")[:510]
        parent_name = name + bytes(512 - len(name))
        texts = [
            (b"W2ru", _relative_locator(path, parent_path)),
            (b"W2ku", str(parent_path)),
        ]
        for slot, (code, text) in enumerate(texts):
            data = text.encode("utf-16-le")
            space = _align(len(data))
            entry = ParentLocator(
                platform_code=code, data_space=space, data_length=len(data), reserved=0, data_offset=cursor
            )
            locator_raw[slot * ParentLocator.SIZE : (slot + 1) * ParentLocator.SIZE] = entry.to_bytes()
            payloads.append((cursor, data))
            cursor += space
    header = VHDDynamicHeader(
        cookie=HEADER_COOKIE,
        data_offset=NO_DATA_OFFSET,
        table_offset=bat_offset,
        header_version=VERSION_1_0,
        max_table_entries=entries,
        block_size=block_size,
        checksum=0,
        parent_unique_id=parent_uid,
        parent_timestamp=parent_ts,
        reserved1=0,
        parent_unicode_name=parent_name,
        parent_locators=bytes(locator_raw),
        reserved2=bytes(256),
    )
    image = bytearray(cursor)
    image[:FOOTER_SIZE] = raw_footer
    image[FOOTER_SIZE : FOOTER_SIZE + HEADER_SIZE] = _sealed_header(header)
    image[bat_offset : bat_offset + bat_bytes] = b"\xff" * bat_bytes
    for where, data in payloads:
        image[where : where + len(data)] = data
    pwrite_all(fd, image, 0)
    pwrite_all(fd, raw_footer, cursor)
