"""Tell a disk image's format from its magic numbers, never from its file name.

vmanager does not depend on diskhandler; this is the few bytes of sniffing libvirt needs to be told
``<driver type=...>``. Names are libvirt's format names (``vpc`` is VHD).

* qcow2: ``QFI\\xfb`` at offset 0 (QEMU ``docs/interop/qcow2.txt``)
* VDI: signature ``0xBEDA107F`` (little-endian bytes ``7F 10 DA BE``) at 0x40 (VirtualBox ``VDICore.h``)
* VMDK: ``KDMV`` at 0 (sparse extent), or a text descriptor starting with ``# Disk DescriptorFile``
* VHD: ``conectix`` cookie in the footer (last 512 bytes), or a copy at 0 (dynamic disks)
* anything else: raw

Sniffing is a convenience for the user's own images. A disk a guest has written is hostile: a guest
can turn its raw disk into a qcow2 whose backing file names a host file, and a QEMU told "qcow2" then
opens that file (the format-probing hole libvirt closed by not probing). :func:`names_other_files`
says when a sniffed image names other files, so that vmanager can refuse to guess and ask for an
explicit ``format=`` instead:

* qcow2: a backing file (offset at 8) or an external data file (incompatible feature bit 2, v3)
* VMDK: a text descriptor (it names its extents); a sparse extent whose capacity is 0 (QEMU then
  reads its embedded descriptor's extents) or whose descriptor has a ``parentFileNameHint``
* VDI: a differencing image (image type 4); VHD: a differencing disk (disk type 4)
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

__all__ = ["DiskFormat", "names_other_files", "sniff_format"]

DiskFormat = Literal["qcow2", "vdi", "vmdk", "vpc", "raw"]

_HEAD = 1024
_VHD_FOOTER = 512
#: QEMU looks for a sparse VMDK's parent in the 20 sectors after the first (``vmdk_parent_open``).
_VMDK_DESC = (0x200, 20 * 512)
#: The most of an embedded VMDK descriptor read; a larger one is refused rather than read.
_VMDK_DESC_MAX = 1 << 20
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_DIFFERENCING = 4  # VDI image type and VHD disk type of a differencing image


class NotAnImageError(OSError):
    """The path is a FIFO, a character device, a socket or a directory: nothing to sniff."""


@contextlib.contextmanager
def _open_image(path: str | Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading, unless it is no regular file or block device: a FIFO would block
    the open or the read, and a character device may act on being opened (a watchdog)."""
    probe = os.open(path, os.O_PATH | os.O_CLOEXEC)  # no side effect on any file type
    try:
        seen = os.fstat(probe)
    finally:
        os.close(probe)
    if not (stat.S_ISREG(seen.st_mode) or stat.S_ISBLK(seen.st_mode)):
        raise NotAnImageError(errno.EINVAL, "not a regular file or a block device", str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
            raise NotAnImageError(errno.EAGAIN, "the file changed while it was opened", str(path))
        yield f


def sniff_format(path: str | Path) -> DiskFormat:
    """The format of the image at ``path``; raises ``FileNotFoundError`` / ``OSError`` if unreadable."""
    with _open_image(path) as f:
        head = f.read(_HEAD)
        size = os.fstat(f.fileno()).st_size
        tail = b""
        if size >= _VHD_FOOTER:
            f.seek(size - _VHD_FOOTER)
            tail = f.read(_VHD_FOOTER)
    return sniff_bytes(head, tail)


def sniff_bytes(head: bytes, tail: bytes = b"") -> DiskFormat:
    """The format given the first bytes of an image (at least 0x44) and its last 512 bytes."""
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if head[:4] == b"KDMV" or head.lstrip()[:21] == b"# Disk DescriptorFile":
        return "vmdk"
    if head[:8] == b"conectix" or tail[:8] == b"conectix":
        return "vpc"
    return "raw"


def names_other_files(path: str | Path, fmt: DiskFormat) -> str | None:
    """Why the image at ``path``, sniffed as ``fmt``, makes QEMU open other files; ``None`` if it
    does not. Raises ``OSError`` if unreadable."""
    if fmt == "raw":
        return None
    with _open_image(path) as f:
        head = f.read(_HEAD)
        size = os.fstat(f.fileno()).st_size
        if fmt == "qcow2":
            return _qcow2_refs(head)
        if fmt == "vdi":
            if len(head) >= 0x50 and int.from_bytes(head[0x4C:0x50], "little") == _DIFFERENCING:
                return "it is a differencing VDI (it names a parent image)"
            return None
        if fmt == "vpc":
            footer = head[:_VHD_FOOTER] if head[:8] == b"conectix" else b""
            if size >= _VHD_FOOTER:
                f.seek(size - _VHD_FOOTER)
                tail = f.read(_VHD_FOOTER)
                footer = tail if tail[:8] == b"conectix" else footer
            if len(footer) >= 64 and int.from_bytes(footer[60:64], "big") == _DIFFERENCING:
                return "it is a differencing VHD (it names a parent image)"
            return None
        return _vmdk_refs(f, head)


def _qcow2_refs(head: bytes) -> str | None:
    if len(head) < 16:
        return "its qcow2 header is truncated"
    if int.from_bytes(head[8:16], "big") != 0:
        return "its qcow2 header names a backing file"
    version = int.from_bytes(head[4:8], "big")
    if version >= 3 and len(head) >= 80 and int.from_bytes(head[72:80], "big") & _QCOW2_INCOMPAT_DATA_FILE:
        return "its qcow2 header names an external data file"
    return None


def _vmdk_refs(f: BinaryIO, head: bytes) -> str | None:
    if head[:4] != b"KDMV":
        return "it is a VMDK descriptor (it names its extent files)"
    if len(head) < 44:
        return "its VMDK header is truncated"
    capacity, _grain, desc_offset, desc_size = struct.unpack_from("<QQQQ", head, 12)
    if capacity == 0:
        return "its VMDK header has capacity 0 (QEMU then reads the extents its descriptor names)"
    regions = [_VMDK_DESC]
    if desc_offset:
        if desc_size * 512 > _VMDK_DESC_MAX:
            return f"its embedded VMDK descriptor is {desc_size} sectors long"
        regions.append((desc_offset * 512, desc_size * 512))
    for offset, length in regions:
        f.seek(offset)
        if b"parentFileNameHint" in f.read(length):
            return "its VMDK descriptor names a parent image (parentFileNameHint)"
    return None
