"""Which format an image file is in, by its signatures — never by its suffix.

Detection is data: :data:`SIGNATURES` lists ``(offset, magic, name)`` for every format diskhandler
reads and for the formats it knows but does not read (QED, Parallels, qcow version 1, LUKS, bochs,
cloop, DMG, compressed files, ...). A match on a supported format names its module; a match on an
unsupported one raises :class:`UnsupportedImageError` naming the format and what to do, so such a file
is never served as if its container bytes were the disk. Raw is what remains when nothing matches.

No parser is imported to detect a format: :func:`format_class` imports a format's module only when an
image of that format is opened.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from diskhandler.errors import UnsupportedImageError
from diskhandler.formats._files import open_image_file

if TYPE_CHECKING:
    from diskhandler.formats._stream import DiskImage

__all__ = [
    "FORMAT_ALIASES",
    "FORMAT_NAMES",
    "SIGNATURES",
    "SUFFIXES",
    "Signature",
    "canonical_format",
    "detect_format",
    "format_class",
    "identify",
]

# Supported formats: name -> "module:Class", imported on first use.
_REGISTRY: dict[str, str] = {
    "qcow2": "diskhandler.formats.qcow2:QCOW2Image",
    "vdi": "diskhandler.formats.vdi:VDIImage",
    "vmdk": "diskhandler.formats.vmdk:VMDKImage",
    "vhd": "diskhandler.formats.vhd:VHDImage",
    "vhdx": "diskhandler.formats.vhdx:VHDXImage",
    "raw": "diskhandler.formats.raw:RawImage",
}

FORMAT_NAMES: tuple[str, ...] = tuple(_REGISTRY)
FORMAT_ALIASES: dict[str, str] = {"vpc": "vhd", "img": "raw", "qcow": "qcow2", "avhdx": "vhdx"}
# Used only by create_image() to pick a format for a new file when none is named.
SUFFIXES: dict[str, str] = {
    ".qcow2": "qcow2",
    ".vdi": "vdi",
    ".vmdk": "vmdk",
    ".vhd": "vhd",
    ".vpc": "vhd",
    ".vhdx": "vhdx",
    ".avhdx": "vhdx",
    ".img": "raw",
    ".raw": "raw",
    ".bin": "raw",
}

HEAD_SIZE = 4096
TAIL_SIZE = 1024


@attrs.frozen
class Signature:
    """Bytes ``magic`` at ``offset`` identify format ``name``.

    A negative ``offset`` counts from the end of the file (``-512``: the last sector). ``supported``
    formats are keys of the registry; for the others ``advice`` says what to do with such a file.
    """

    offset: int
    magic: bytes
    name: str
    supported: bool = True
    advice: str = ""


_CONVERT = "convert it with `qemu-img convert -O qcow2 IMAGE NEW.qcow2` and open the result"

# First match wins; longer, more specific magics come before shorter ones at the same place.
SIGNATURES: tuple[Signature, ...] = (
    # qcow: same magic, the version says which (qemu docs/interop/qcow2.txt; block/qcow.c)
    Signature(0, b"QFI\xfb\x00\x00\x00\x02", "qcow2"),
    Signature(0, b"QFI\xfb\x00\x00\x00\x03", "qcow2"),
    Signature(0, b"QFI\xfb\x00\x00\x00\x01", "qcow (version 1)", False, _CONVERT),
    Signature(
        0, b"QFI\xfb", "qcow (unknown version)", False, "this qcow version is not known to diskhandler"
    ),
    Signature(0x40, b"\x7f\x10\xda\xbe", "vdi"),  # VDICore.h VDI_IMAGE_SIGNATURE
    Signature(0, b"vhdxfile", "vhdx"),  # [MS-VHDX] 2.2.1 file type identifier
    Signature(0, b"KDMV", "vmdk"),  # hosted sparse extent
    Signature(0, b"COWD", "vmdk"),  # ESXi vmfsSparse (the VMDK module refuses it by name)
    Signature(0, b"conectix", "vhd"),  # dynamic VHD: copy of the footer first
    Signature(-512, b"conectix", "vhd"),  # fixed VHD: footer only
    Signature(-511, b"conectix", "vhd"),  # very old Virtual PC fixed disks: 511-byte footer
    Signature(0, b"QED\x00", "QED", False, _CONVERT + " (qemu-img reads QED)"),
    Signature(0, b"WithoutFreeSpace", "Parallels", False, _CONVERT + " (`-f parallels`)"),
    Signature(0, b"WithouFreSpacExt", "Parallels", False, _CONVERT + " (`-f parallels`)"),
    Signature(
        0,
        b"LUKS\xba\xbe",
        "LUKS",
        False,
        "its sectors are encrypted; decrypt it with `qemu-img convert --object secret,id=s,file=KEYFILE"
        " --image-opts driver=luks,key-secret=s,file.filename=IMAGE -O raw NEW.img` or cryptsetup",
    ),
    Signature(0, b"Bochs Virtual HD Image\x00", "bochs", False, _CONVERT + " (`-f bochs`)"),
    Signature(0, b"#!/bin/sh\n#V2.0 Format\n", "cloop", False, _CONVERT + " (`-f cloop`)"),
    Signature(-512, b"koly", "DMG", False, _CONVERT + " (`-f dmg`)"),
    # Compressed or archived images: served as raw they would be garbage.
    Signature(0, b"\xfd7zXZ\x00", "xz-compressed file", False, "decompress it first (`unxz`)"),
    Signature(0, b"\x28\xb5\x2f\xfd", "zstd-compressed file", False, "decompress it first (`unzstd`)"),
    Signature(0, b"\x1f\x8b\x08", "gzip-compressed file", False, "decompress it first (`gunzip`)"),
    Signature(0, b"BZh91AY&SY", "bzip2-compressed file", False, "decompress it first (`bunzip2`)"),
    Signature(
        257, b"ustar", "tar archive (an OVA?)", False, "extract the disk image from it first (`tar xf`)"
    ),
)


def canonical_format(name: str) -> str:
    """``name`` as a registry key (``vpc`` -> ``vhd``); ValueError for an unknown name."""
    key = FORMAT_ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        known = ", ".join([*FORMAT_NAMES, *FORMAT_ALIASES])
        raise ValueError(f"unknown disk image format {name!r}; known formats: {known}")
    return key


def format_class(name: str) -> type[DiskImage]:
    """The DiskImage subclass for format ``name`` (its module is imported now)."""
    module, _, cls = _REGISTRY[canonical_format(name)].partition(":")
    found: type[DiskImage] = getattr(importlib.import_module(module), cls)
    return found


def identify(head: bytes, tail: bytes, size: int) -> Signature | None:
    """The first signature that matches a file of ``size`` bytes starting with ``head`` and ending with
    ``tail`` (the last :data:`TAIL_SIZE` bytes, or all of a smaller file), or ``None`` (raw)."""
    for sig in SIGNATURES:
        if sig.offset >= 0:
            if head[sig.offset : sig.offset + len(sig.magic)] == sig.magic:
                return sig
        elif size >= -sig.offset:
            start = len(tail) + sig.offset
            if start >= 0 and tail[start : start + len(sig.magic)] == sig.magic:
                return sig
    # a VMDK text descriptor: a few lines of text, recognised by content, not by a fixed magic
    from diskhandler.formats._vmdk_descriptor import looks_like_descriptor  # noqa: PLC0415

    if looks_like_descriptor(head):
        return Signature(0, b"", "vmdk")
    return None


def detect_format(path: Path) -> str:
    """The format of the image at ``path`` (a registry name), from its first and last bytes.

    Raises:
        UnsupportedImageError: the file is in a format diskhandler knows but does not read; the error
            names it and says what to do.
    """
    fd = open_image_file(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_SIZE, 0)
        tail = os.pread(fd, TAIL_SIZE, max(0, size - TAIL_SIZE)) if size else b""
    finally:
        os.close(fd)
    sig = identify(head, tail, size)
    if sig is None:
        return "raw"
    if not sig.supported:
        raise UnsupportedImageError(
            path,
            "format",
            f"this is a {sig.name} image, which diskhandler does not read (it is not raw: serving its"
            f" container bytes as a disk would show garbage and a write would corrupt it); {sig.advice}."
            " To treat it as raw anyway, pass format='raw'",
        )
    return sig.name
