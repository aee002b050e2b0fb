"""VirtualBox Disk Images (VDI): dynamic, fixed and differencing, with their parent chains.

Layout (little-endian; structures from VirtualBox ``src/VBox/Storage/VDICore.h``, behaviour from
``VDI.cpp``; qemu's ``block/vdi.c`` is a second, simpler writer)::

    [pre-header 72 B][header: v1 384 B or v1+ 400 B][pad][block map: cBlocks x u32][pad][blocks ...]

Each block map entry is a physical slot number, ``0xFFFFFFFF`` (FREE: zeros in a base image, the
parent's bytes in a differencing image) or ``0xFFFFFFFE`` (ZERO: zeros, never the parent's bytes).
Slot ``n`` lives at ``offData + n * (cbBlock + cbBlockExtra) + cbBlockExtra``.

A differencing image (type 4, or the legacy undo type 3) records only its parent's UUID
(``uuidLinkage``) and the parent's ``uuidModify`` when it was made (``uuidParentModify``). The parent
is found through the media registry of the VM's ``.vbox`` file, or by scanning the ``.vdi`` files in
the child's folder and the folder above (VirtualBox keeps diffs in the VM's ``Snapshots/``).
"""

from __future__ import annotations

import os
import struct
import sys
import uuid
import warnings
from array import array
from pathlib import Path
from typing import Any, ClassVar, Self

import attrs
from typing_extensions import override

from diskhandler.errors import ChainError, ImageFormatError, ImageWarning, UnsupportedImageError
from diskhandler.formats import _vbox
from diskhandler.formats._blockmap import DATA, PARENT, ZERO, BlockMappedImage, closing_on_error
from diskhandler.formats._files import open_image_file
from diskhandler.formats._layout import Layout, binary_layout, ffield
from diskhandler.formats._stream import DiskImage, pread_exact, pwrite_all
from diskhandler.formats.chain import ChainGuard

__all__ = [
    "BLOCK_FREE",
    "BLOCK_ZERO",
    "VDIHeader",
    "VDIImage",
    "parse_header",
]

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
PRE_HEADER_SIZE = 72
BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE

TYPE_NORMAL = 1
TYPE_FIXED = 2
TYPE_UNDO = 3
TYPE_DIFF = 4
_TYPE_NAMES = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "fixed", TYPE_UNDO: "undo", TYPE_DIFF: "differencing"}

# Sanity caps on header values (they size allocations and loops).
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 64 << 20
MAX_BLOCK_EXTRA = 64 << 20
MAX_BLOCKS = 1 << 24  # a 64 MiB block map: 16 TiB at 1 MiB blocks
MAX_HEADER_SIZE = 64 << 10
MiB = 1 << 20

_TEXT_VIRTUALBOX = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
_TEXT_QEMU = b"<<< QEMU VM Virtual Disk Image >>>\n"
_NULL_UUID = bytes(16)
_ZEROS = bytes(MiB)


@binary_layout("<")
class _PreHeader(Layout):
    """VDIPREHEADER: free text for human eyes, then the signature and version (major << 16 | minor)."""

    text: bytes = ffield("64s")
    signature: int = ffield("I")
    version: int = ffield("I")


@binary_layout("<")
class _HeaderV1(Layout):
    """VDIHEADER1 (384 bytes, as qemu writes it); VDIHEADER1PLUS appends an LCHS geometry (400)."""

    cb_header: int = ffield("I")
    image_type: int = ffield("I")
    flags: int = ffield("I")
    comment: bytes = ffield("256s")
    off_blocks: int = ffield("I")
    off_data: int = ffield("I")
    legacy_cylinders: int = ffield("I")
    legacy_heads: int = ffield("I")
    legacy_sectors: int = ffield("I")
    legacy_sector_size: int = ffield("I")
    unused: int = ffield("I")
    disk_size: int = ffield("Q")
    block_size: int = ffield("I")
    block_extra: int = ffield("I")
    blocks: int = ffield("I")
    blocks_allocated: int = ffield("I")
    uuid_create: bytes = ffield("16s")
    uuid_modify: bytes = ffield("16s")
    uuid_linkage: bytes = ffield("16s")
    uuid_parent_modify: bytes = ffield("16s")


@binary_layout("<")
class _Geometry(Layout):
    cylinders: int = ffield("I")
    heads: int = ffield("I")
    sectors: int = ffield("I")
    sector_size: int = ffield("I")


@binary_layout("<")
class _HeaderV0(Layout):
    """VDIHEADER0 (legacy, major version 0): no offsets; the map follows the header directly."""

    image_type: int = ffield("I")
    flags: int = ffield("I")
    comment: bytes = ffield("256s")
    legacy_cylinders: int = ffield("I")
    legacy_heads: int = ffield("I")
    legacy_sectors: int = ffield("I")
    legacy_sector_size: int = ffield("I")
    disk_size: int = ffield("Q")
    block_size: int = ffield("I")
    blocks: int = ffield("I")
    blocks_allocated: int = ffield("I")
    uuid_create: bytes = ffield("16s")
    uuid_modify: bytes = ffield("16s")
    uuid_linkage: bytes = ffield("16s")


# The names errors show for a short read of each structure.
_PreHeader.NAME = "VDI pre-header"
_HeaderV1.NAME = "VDI header"
_Geometry.NAME = "VDI LCHS geometry"
_HeaderV0.NAME = "VDI legacy header"

# Absolute offsets of the fields a writer updates in place (v1 headers).
_OFF_BLOCKS_ALLOCATED = PRE_HEADER_SIZE + 4 * 3 + 256 + 4 * 7 + 8 + 4 * 3
_OFF_UUID_MODIFY = _OFF_BLOCKS_ALLOCATED + 4 + 16
assert _OFF_BLOCKS_ALLOCATED == 0x184
assert _OFF_UUID_MODIFY == 0x198


@attrs.frozen
class VDIHeader:
    """A VDI header of either version, validated and normalised.

    UUIDs are the raw 16 bytes as stored (Microsoft GUID byte order); :meth:`uuid` converts one.
    ``uuid_parent_modify`` and ``lchs`` are ``None`` where the header version has no such field.
    """

    version: int
    header_size: int
    image_type: int
    flags: int
    comment: str
    off_blocks: int
    off_data: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks: int
    blocks_allocated: int
    uuid_create: bytes
    uuid_modify: bytes
    uuid_linkage: bytes
    uuid_parent_modify: bytes | None
    lchs: tuple[int, int, int, int] | None

    @property
    def major(self) -> int:
        return self.version >> 16

    @property
    def is_differencing(self) -> bool:
        return self.image_type in (TYPE_DIFF, TYPE_UNDO)

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.image_type]

    @staticmethod
    def uuid(raw: bytes) -> uuid.UUID:
        """The UUID as VirtualBox prints it, from the raw header bytes."""
        return uuid.UUID(bytes_le=raw)


def parse_header(data: bytes, path: Path | None, file_size: int) -> VDIHeader:
    """Parse and validate the pre-header and header at the start of a VDI file.

    ``data`` must hold the file's first bytes (at least 72 + the header size when the file has them);
    ``file_size`` bounds the block map.

    Raises:
        ImageFormatError: a field is out of range (the error names it).
        UnsupportedImageError: a header version diskhandler does not know.
    """
    pre = _PreHeader.from_bytes(data, path)
    if pre.signature != SIGNATURE:
        raise ImageFormatError(path, "signature", f"{pre.signature:#010x} is not the VDI signature")
    major, minor = pre.version >> 16, pre.version & 0xFFFF
    body = memoryview(data)[PRE_HEADER_SIZE:]
    if major == 0:
        v0 = _HeaderV0.from_bytes(body, path)
        off_blocks = PRE_HEADER_SIZE + _HeaderV0.SIZE
        header = VDIHeader(
            version=pre.version,
            header_size=_HeaderV0.SIZE,
            image_type=v0.image_type,
            flags=v0.flags,
            comment=_cstr(v0.comment),
            off_blocks=off_blocks,
            off_data=off_blocks + 4 * v0.blocks,
            disk_size=v0.disk_size,
            block_size=v0.block_size,
            block_extra=0,
            blocks=v0.blocks,
            blocks_allocated=v0.blocks_allocated,
            uuid_create=v0.uuid_create,
            uuid_modify=v0.uuid_modify,
            uuid_linkage=v0.uuid_linkage,
            uuid_parent_modify=None,
            lchs=None,
        )
    elif major == 1:
        v1 = _HeaderV1.from_bytes(body, path)
        if not _HeaderV1.SIZE <= v1.cb_header <= MAX_HEADER_SIZE:
            raise ImageFormatError(
                path, "cbHeader", f"header size {v1.cb_header} is not between {_HeaderV1.SIZE} and 64 KiB"
            )
        lchs = None
        if v1.cb_header >= _HeaderV1.SIZE + _Geometry.SIZE:
            g = _Geometry.from_bytes(body[_HeaderV1.SIZE :], path)
            lchs = (g.cylinders, g.heads, g.sectors, g.sector_size)
        header = VDIHeader(
            version=pre.version,
            header_size=v1.cb_header,
            image_type=v1.image_type,
            flags=v1.flags,
            comment=_cstr(v1.comment),
            off_blocks=v1.off_blocks,
            off_data=v1.off_data,
            disk_size=v1.disk_size,
            block_size=v1.block_size,
            block_extra=v1.block_extra,
            blocks=v1.blocks,
            blocks_allocated=v1.blocks_allocated,
            uuid_create=v1.uuid_create,
            uuid_modify=v1.uuid_modify,
            uuid_linkage=v1.uuid_linkage,
            uuid_parent_modify=v1.uuid_parent_modify,
            lchs=lchs,
        )
        if header.off_blocks < PRE_HEADER_SIZE + header.header_size:
            raise ImageFormatError(
                path,
                "offBlocks",
                f"block map offset {header.off_blocks} overlaps the {header.header_size}-byte header",
            )
    else:
        raise UnsupportedImageError(
            path, "version", f"VDI version {major}.{minor} is unknown (only 0.x and 1.x exist)"
        )
    _validate(header, path, file_size)
    return header


def _validate(h: VDIHeader, path: Path | None, file_size: int) -> None:
    if h.image_type not in _TYPE_NAMES:
        raise ImageFormatError(path, "type", f"image type {h.image_type} is not 1-4")
    bs = h.block_size
    if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
        raise ImageFormatError(
            path, "cbBlock", f"block size {bs} is not a power of two between 512 bytes and 64 MiB"
        )
    if h.block_extra > MAX_BLOCK_EXTRA:
        raise ImageFormatError(path, "cbBlockExtra", f"{h.block_extra} bytes of block prefix is absurd")
    if h.blocks > MAX_BLOCKS:
        raise ImageFormatError(path, "cBlocks", f"{h.blocks} blocks exceeds the limit of {MAX_BLOCKS}")
    if h.disk_size > h.blocks * bs:
        raise ImageFormatError(
            path,
            "cbDisk",
            f"disk size {h.disk_size} does not fit in {h.blocks} blocks of {bs} bytes",
        )
    if h.blocks_allocated > h.blocks:
        raise ImageFormatError(
            path, "cBlocksAllocated", f"{h.blocks_allocated} allocated blocks but only {h.blocks} exist"
        )
    map_end = h.off_blocks + 4 * h.blocks
    if map_end > file_size:
        raise ImageFormatError(
            path,
            "offBlocks",
            f"block map ({h.blocks} entries at {h.off_blocks}) ends at {map_end}, past the end of the"
            f" {file_size}-byte file (truncated image?)",
        )
    if h.off_data < map_end:
        raise ImageFormatError(
            path, "offData", f"data offset {h.off_data} overlaps the block map ending at {map_end}"
        )
    if h.image_type == TYPE_DIFF and h.uuid_linkage == _NULL_UUID:
        raise ChainError(path, "uuidLinkage", "differencing image names no parent (null UUID)")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _read_header(fd: int, path: Path) -> VDIHeader:
    size = os.fstat(fd).st_size
    head = os.pread(fd, PRE_HEADER_SIZE + MAX_HEADER_SIZE, 0)
    return parse_header(head, path, size)


def _is_zero(data: memoryview) -> bool:
    return all(_ZEROS.startswith(data[pos : pos + MiB]) for pos in range(0, len(data), MiB))


class VDIImage(BlockMappedImage):
    """A VirtualBox disk image (and, for a differencing image, its chain of parents).

    Attributes (besides :class:`DiskImage`'s):
        header: the parsed :class:`VDIHeader` as it was when opened (``uuid_modify`` and
            ``blocks_allocated`` change on disk as the image is written).
    """

    format: ClassVar[str] = "vdi"

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        header: VDIHeader,
        block_map: array[int],
        slots_end: int,
        writable: bool,
        parent: DiskImage | None,
    ) -> None:
        super().__init__(path, fd, size=header.disk_size, writable=writable, parent=parent)
        self.header = header
        self._map = block_map
        self._shift = self._block_shift = header.block_size.bit_length() - 1
        self._mask = header.block_size - 1
        self._stride = header.block_size + header.block_extra
        self._data_base = header.off_data + header.block_extra
        self._uuid_modify = header.uuid_modify
        self._modified = False
        self._next_slot = max(header.blocks_allocated, slots_end)

    # -- identity ---------------------------------------------------------------------------------

    @property
    def uuid(self) -> uuid.UUID:
        """This image's UUID (``uuidCreate``), as VirtualBox shows it."""
        return VDIHeader.uuid(self.header.uuid_create)

    @property
    def uuid_modify(self) -> bytes:
        """The raw current ``uuidModify`` (changed on the first write of a session)."""
        return self._uuid_modify

    # -- detection and opening -------------------------------------------------------------------

    @classmethod
    @override
    def probe(cls, head: bytes, tail: bytes) -> bool:
        return len(head) >= PRE_HEADER_SIZE and struct.unpack_from("<I", head, 64)[0] == SIGNATURE

    @classmethod
    @override
    def _from_fd(cls, path: Path, fd: int, *, writable: bool, guard: ChainGuard) -> Self:
        header = _read_header(fd, path)
        if writable and header.major == 0:
            raise UnsupportedImageError(
                path,
                "version",
                "legacy VDI 0.x image: diskhandler reads it but does not write it; convert it first"
                " (VBoxManage clonemedium)",
            )
        _check_registry(path, header, writable)
        block_map, slots_end = _load_map(fd, path, header)
        parent = _open_parent(path, header, guard) if header.is_differencing else None
        with closing_on_error(parent):
            return cls(
                path,
                fd,
                header=header,
                block_map=block_map,
                slots_end=slots_end,
                writable=writable,
                parent=parent,
            )

    @classmethod
    @override
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        """Create a VDI.

        Options:
            subformat: ``"dynamic"`` (default; blocks allocated on first write) or ``"fixed"``
                (every block preallocated).
            block_size: bytes per block, a power of two from 512 bytes to 64 MiB (default 1 MiB;
                qemu opens only 1 MiB).
            header: ``"virtualbox"`` (default: 400-byte header, 1 MiB-aligned map and data, as
                VirtualBox writes) or ``"qemu"`` (384-byte header, 512-byte alignment, as qemu writes).
            block_extra: bytes of private prefix before each block (``cbBlockExtra``: 0, the
                default, or a power of two from 512; qemu ignores it and misreads such images).
            comment: the header's comment (UTF-8, at most 255 bytes).

        With ``parent`` (a VDI), a differencing image (type 4) linked to it by UUID.
        """
        subformat = options.pop("subformat", "dynamic")
        block_size = options.pop("block_size", MiB)
        style = options.pop("header", "virtualbox")
        block_extra = options.pop("block_extra", 0)
        comment = str(options.pop("comment", "")).encode()
        if options:
            raise TypeError(f"unknown VDI option(s) {sorted(options)}")
        if subformat not in ("dynamic", "fixed"):
            raise ValueError(f"VDI subformat must be 'dynamic' or 'fixed', not {subformat!r}")
        if style not in ("virtualbox", "qemu"):
            raise ValueError(f"VDI header must be 'virtualbox' or 'qemu', not {style!r}")
        if (
            not isinstance(block_size, int)
            or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise ValueError(f"block_size must be a power of two from 512 to 64 MiB, not {block_size!r}")
        if (
            not isinstance(block_extra, int)
            or not 0 <= block_extra <= MAX_BLOCK_EXTRA
            or (block_extra and (block_extra < 512 or block_extra & (block_extra - 1)))
        ):  # VirtualBox refuses a cbBlockExtra that is not a power of two
            raise ValueError(
                f"block_extra must be 0 or a power of two from 512 to 64 MiB, not {block_extra!r}"
            )
        if len(comment) > 255:
            raise ValueError("the VDI comment holds at most 255 bytes of UTF-8")

        parent_image: DiskImage | None = None
        linkage = parent_modify = _NULL_UUID
        image_type = TYPE_FIXED if subformat == "fixed" else TYPE_NORMAL
        if parent is not None:
            if subformat == "fixed":
                raise ValueError("a differencing VDI is always dynamic; drop subformat='fixed'")
            parent_image = guard.enter(path).open_parent(path, parent)
            if not isinstance(parent_image, VDIImage):
                parent_image.close()
                raise ValueError(f"a differencing VDI needs a VDI parent; {parent} is {parent_image.format}")
            linkage = parent_image.header.uuid_create
            parent_modify = parent_image.uuid_modify
            image_type = TYPE_DIFF
            if size is None:
                size = parent_image.size
        assert size is not None
        try:
            blocks = -(-size // block_size)
            if blocks > MAX_BLOCKS:
                raise ValueError(f"{size} bytes needs {blocks} blocks; at most {MAX_BLOCKS} are allowed")
            if style == "virtualbox":
                header_size, align, text = _HeaderV1.SIZE + _Geometry.SIZE, MiB, _TEXT_VIRTUALBOX
            else:
                header_size, align, text = _HeaderV1.SIZE, 512, _TEXT_QEMU
            off_blocks = _align(PRE_HEADER_SIZE + header_size, align)
            off_data = _align(off_blocks + 4 * blocks, align)
            fixed = subformat == "fixed"
            block_map = array("I", range(blocks)) if fixed else array("I", [BLOCK_FREE]) * blocks
            v1 = _HeaderV1(
                cb_header=header_size,
                image_type=image_type,
                flags=0,
                comment=comment,
                off_blocks=off_blocks,
                off_data=off_data,
                legacy_cylinders=0,
                legacy_heads=0,
                legacy_sectors=0,
                legacy_sector_size=512,
                unused=0,
                disk_size=size,
                block_size=block_size,
                block_extra=block_extra,
                blocks=blocks,
                blocks_allocated=blocks if fixed else 0,
                uuid_create=uuid.uuid4().bytes_le,
                uuid_modify=uuid.uuid4().bytes_le,
                uuid_linkage=linkage,
                uuid_parent_modify=parent_modify,
            )
            raw = _PreHeader(text, SIGNATURE, VERSION_1_1).to_bytes() + v1.to_bytes()
            if header_size > _HeaderV1.SIZE:
                raw += _Geometry(0, 0, 0, 512).to_bytes()
            end = off_data + (blocks * (block_size + block_extra) if fixed else 0)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, end)  # zeros: the data area, the padding, fixed images' blocks
                pwrite_all(fd, _map_bytes(block_map), off_blocks)
                pwrite_all(fd, raw, 0)
                header = parse_header(raw, path, end)
                return cls(
                    path,
                    fd,
                    header=header,
                    block_map=block_map,
                    slots_end=blocks if fixed else 0,
                    writable=True,
                    parent=parent_image,
                )
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        except BaseException:
            if parent_image is not None:
                parent_image.close()
            raise

    # -- reading --------------------------------------------------------------------------------

    @override
    def _lookup(self, offset: int, remaining: int) -> tuple[int, int, int]:
        within = offset & self._mask
        entry = self._map[offset >> self._shift]
        span = self._mask + 1 - within
        if entry < BLOCK_ZERO:
            return DATA, self._data_base + entry * self._stride + within, span
        if entry == BLOCK_FREE and self.parent is not None:
            return PARENT, 0, span
        return ZERO, 0, span

    # -- writing --------------------------------------------------------------------------------

    @override
    def _write_block(self, index: int, within: int, chunk: memoryview) -> None:
        if not self._modified:
            self._mark_modified()
        entry = self._map[index]
        if entry < BLOCK_ZERO:
            pwrite_all(self._fd, chunk, self._data_base + entry * self._stride + within)
        else:
            self._write_unallocated(index, within, chunk, entry)

    def _mark_modified(self) -> None:
        """A new ``uuidModify`` on the first write of a session, as VirtualBox does."""
        self._uuid_modify = uuid.uuid4().bytes_le
        pwrite_all(self._fd, self._uuid_modify, _OFF_UUID_MODIFY)
        if self._next_slot != self.header.blocks_allocated:
            # an interrupted allocation left the map ahead of the header: VirtualBox takes the
            # header's count as the next free slot, so make it safe for VirtualBox too
            pwrite_all(self._fd, struct.pack("<I", self._next_slot), _OFF_BLOCKS_ALLOCATED)
        self._modified = True

    def _write_unallocated(self, index: int, within: int, chunk: memoryview, entry: int) -> None:
        bs = self._mask + 1
        from_parent = entry == BLOCK_FREE and self.parent is not None
        whole = within == 0 and len(chunk) == bs
        if (whole or not from_parent) and _is_zero(chunk):
            if from_parent:  # a FREE block would show the parent: mark it ZERO instead
                self._set_entry(index, BLOCK_ZERO)
            return  # FREE in a base image and ZERO both read as zeros already
        slot = self._next_slot
        if slot >= self.header.blocks:
            slot = self._reusable_slot()
        start = self.header.off_data + slot * self._stride
        extra = self.header.block_extra
        if whole:
            if extra:
                pwrite_all(self._fd, bytes(extra), start)
            pwrite_all(self._fd, chunk, start + extra)
        else:
            block = bytearray(extra + bs)
            view = memoryview(block)
            if from_parent:
                first = index * bs
                n = min(bs, self.size - first)
                self._read_parent(first, view[extra : extra + n])
            view[extra + within : extra + within + len(chunk)] = chunk
            pwrite_all(self._fd, block, start)
        # data first, then the header's count, then the map entry (VirtualBox's and qemu's order): a
        # crash leaves at worst a leaked slot. The other way round, a map entry the count does not
        # cover would be handed out again by the next VirtualBox or qemu allocation.
        if slot >= self._next_slot:
            self._next_slot = slot + 1
            pwrite_all(self._fd, struct.pack("<I", self._next_slot), _OFF_BLOCKS_ALLOCATED)
        self._set_entry(index, slot)

    def _reusable_slot(self) -> int:
        """A slot no map entry references (left by an interrupted allocation), once the slots
        after the last one in use have run out."""
        used = bytearray(self.header.blocks)
        for entry in self._map:
            if entry < BLOCK_ZERO:
                used[entry] = 1
        slot = used.find(0)
        if slot < 0:
            raise ImageFormatError(
                self.path, "cBlocksAllocated", f"all {self.header.blocks} block slots are in use"
            )
        return slot

    def _set_entry(self, index: int, value: int) -> None:
        self._map[index] = value
        pwrite_all(self._fd, struct.pack("<I", value), self.header.off_blocks + 4 * index)

    @override
    def _flush(self) -> None:
        """Metadata is written as blocks are allocated; nothing is cached."""


def _map_bytes(block_map: array[int]) -> bytes:
    if sys.byteorder == "little":
        return block_map.tobytes()
    swapped = array("I", block_map)  # pragma: no cover - big-endian hosts
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes()  # pragma: no cover


def _load_map(fd: int, path: Path, header: VDIHeader) -> tuple[array[int], int]:
    """The block map, checked, and the end of the slots it uses (1 + the highest slot, 0 for none)."""
    raw = pread_exact(fd, header.off_blocks, 4 * header.blocks, path, "block map")
    block_map = array("I")
    if block_map.itemsize != 4:  # pragma: no cover - every CPython platform has a 4-byte "I"
        raise RuntimeError("array('I') is not 32-bit on this platform")
    block_map.frombytes(raw)
    del raw
    if sys.byteorder != "little":  # pragma: no cover
        block_map.byteswap()
    # One pass and one byte per slot: the map may hold 16 Mi entries, too many for Python sets or lists.
    blocks = header.blocks
    used = bytearray(blocks)
    end = 0
    for index, entry in enumerate(block_map):
        if entry >= BLOCK_ZERO:
            continue
        if entry >= blocks:
            raise ImageFormatError(
                path,
                f"block map entry {index}",
                f"points at slot {entry}, but the image has only {blocks} blocks",
            )
        if used[entry]:
            raise ImageFormatError(
                path,
                f"block map entry {index}",
                f"slot {entry} is also used by block {block_map.index(entry)}",
            )
        used[entry] = 1
        if entry >= end:
            end = entry + 1
    return block_map, end


def _check_registry(path: Path, header: VDIHeader, writable: bool) -> None:
    """Refuse media the VM's ``.vbox`` file marks encrypted (copies too: same UUID, same ciphertext),
    and writes to the registered file of an image that has differencing children."""
    me = VDIHeader.uuid(header.uuid_create)
    for vbox, media in _vbox.media_near(path):
        medium = media.get(me)
        if medium is None:
            continue
        if medium.encrypted:
            raise UnsupportedImageError(
                path,
                "encryption",
                f"{vbox} says this disk is encrypted by VirtualBox; its sectors are ciphertext."
                " Decrypt it in VirtualBox first (VBoxManage encryptmedium ... --oldpassword ...)",
            )
        if writable and medium.children and _same_file(medium.location, path):
            kids = ", ".join(str(media[k].location) if k in media else f"{{{k}}}" for k in medium.children)
            raise ChainError(
                path,
                "children",
                f"{vbox} lists differencing images based on this one ({kids}); writing it would"
                " corrupt them. Open the leaf of the chain instead",
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _peek_uuids(candidate: Path, unreadable: list[str]) -> tuple[bytes, bytes] | None:
    """``(uuidCreate, uuidModify)`` of a file if it is a VDI, else ``None`` (and why, in ``unreadable``)."""
    try:
        fd = open_image_file(candidate, role="candidate parent")
        try:
            head = os.pread(fd, PRE_HEADER_SIZE + MAX_HEADER_SIZE, 0)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        h = parse_header(head, candidate, size)
    except (OSError, ImageFormatError) as exc:
        unreadable.append(str(exc))
        return None
    return h.uuid_create, h.uuid_modify


def _open_parent(path: Path, header: VDIHeader, guard: ChainGuard) -> DiskImage:
    want = header.uuid_linkage
    want_uuid = VDIHeader.uuid(want)
    found: Path | None = None
    found_format: str | None = None
    registries: list[Path] = []
    for vbox, media in _vbox.media_near(path):
        registries.append(vbox)
        medium = media.get(want_uuid)
        if medium is not None and medium.location.is_file():
            found = medium.location
            found_format = medium.format.lower() if medium.format.upper() != "VDI" else "vdi"
            break
    searched: list[Path] = []
    unreadable: list[str] = []  # a damaged parent must not be reported as a missing one
    if found is None:
        folder = path.resolve().parent
        me = path.resolve()
        matches: list[tuple[bool, Path]] = []
        for directory in (folder, folder.parent):
            searched.append(directory)
            try:
                entries = sorted(directory.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.suffix.lower() != ".vdi" or entry.resolve() == me or not entry.is_file():
                    continue
                ids = _peek_uuids(entry, unreadable)
                if ids is not None and ids[0] == want:
                    matches.append((ids[1] != header.uuid_parent_modify, entry))
            if matches:
                break
        if matches:
            found = min(matches)[1]  # prefer the copy whose uuidModify the child expects
            found_format = "vdi"
    if found is None:
        where = ", ".join(str(d) for d in searched)
        if registries:
            where += " and the media registries of " + ", ".join(str(r) for r in registries)
        damaged = ""
        if unreadable:
            damaged = " These .vdi files there could not be read (is one of them the parent?): " + "; ".join(
                unreadable[:5]
            )
        raise ChainError(
            path,
            "uuidLinkage",
            f"parent image {{{want_uuid}}} not found (searched the .vdi files in {where});"
            " put the parent beside the child or in the folder above, or register it in the VM's .vbox."
            + damaged,
        )
    parent = guard.open_parent(path, found, format=found_format)
    if isinstance(parent, VDIImage):
        if parent.header.uuid_create != want:
            parent.close()
            raise ChainError(
                path,
                "uuidLinkage",
                f"parent {found} has UUID {{{parent.uuid}}} but this image is based on {{{want_uuid}}}",
            )
        pm = header.uuid_parent_modify
        if pm is not None and pm not in (_NULL_UUID, parent.uuid_modify):
            try:
                warnings.warn(
                    f"{path}: parent {found} was modified after this differencing image was made"
                    f" (uuidParentModify {{{VDIHeader.uuid(pm)}}} != parent's uuidModify"
                    f" {{{VDIHeader.uuid(parent.uuid_modify)}}}); the chain may read inconsistent data",
                    ImageWarning,
                    stacklevel=4,
                )
            except BaseException:  # a warnings filter turned it into an error
                parent.close()
                raise
    return parent
