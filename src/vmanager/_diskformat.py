"""Tell a disk image's format from its magic numbers, never from its file name.

vmanager does not depend on diskhandler; this is the few bytes of sniffing libvirt needs to be told
``<driver type=...>``. Names are libvirt's format names (``vpc`` is VHD).

* qcow2: ``QFI\\xfb`` at offset 0 (QEMU ``docs/interop/qcow2.txt``)
* VDI: signature ``0xBEDA107F`` (little-endian bytes ``7F 10 DA BE``) at 0x40 (VirtualBox ``VDICore.h``)
* VMDK: ``KDMV`` at 0 (sparse extent), or a text descriptor starting with ``# Disk DescriptorFile``
* VHD: ``conectix`` cookie in the footer (last 512 bytes), or a copy at 0 (dynamic disks)
* anything else: raw
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = ["DiskFormat", "sniff_format"]

DiskFormat = Literal["qcow2", "vdi", "vmdk", "vpc", "raw"]

_HEAD = 1024
_VHD_FOOTER = 512


def sniff_format(path: str | Path) -> DiskFormat:
    """The format of the image at ``path``; raises ``FileNotFoundError`` / ``OSError`` if unreadable."""
    with open(path, "rb") as f:
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
