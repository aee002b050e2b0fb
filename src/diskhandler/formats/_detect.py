"""Which format an image file is in, by its magic numbers — never by its suffix.

The registry lists each format's module lazily, so a format's parser is imported only when an image
of that format is opened. Raw comes last: it matches anything.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from diskhandler.errors import ImageFormatError

if TYPE_CHECKING:
    from diskhandler.formats._stream import DiskImage

__all__ = ["FORMAT_ALIASES", "FORMAT_NAMES", "SUFFIXES", "detect_format", "format_class"]

# name -> "module:Class"; order is the probing order, raw last.
_REGISTRY: dict[str, str] = {
    "qcow2": "diskhandler.formats.qcow2:QCOW2Image",
    "vdi": "diskhandler.formats.vdi:VDIImage",
    "vmdk": "diskhandler.formats.vmdk:VMDKImage",
    "vhd": "diskhandler.formats.vhd:VHDImage",
    "raw": "diskhandler.formats.raw:RawImage",
}

FORMAT_NAMES: tuple[str, ...] = tuple(_REGISTRY)
FORMAT_ALIASES: dict[str, str] = {"vpc": "vhd", "img": "raw", "qcow": "qcow2"}
# Used only by create_image() to pick a format for a new file when none is named.
SUFFIXES: dict[str, str] = {
    ".qcow2": "qcow2",
    ".qcow": "qcow2",
    ".vdi": "vdi",
    ".vmdk": "vmdk",
    ".vhd": "vhd",
    ".vpc": "vhd",
    ".img": "raw",
    ".raw": "raw",
    ".bin": "raw",
}

HEAD_SIZE = 4096
TAIL_SIZE = 1024


def canonical_format(name: str) -> str:
    """``name`` as a registry key (``vpc`` -> ``vhd``); ValueError for an unknown name."""
    key = FORMAT_ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        known = ", ".join([*FORMAT_NAMES, *FORMAT_ALIASES])
        raise ValueError(f"unknown disk image format {name!r}; known formats: {known}")
    return key


def format_class(name: str) -> type[DiskImage]:
    """The DiskImage subclass for format ``name``."""
    module, _, cls = _REGISTRY[canonical_format(name)].partition(":")
    found: type[DiskImage] = getattr(importlib.import_module(module), cls)
    return found


def detect_format(path: Path) -> str:
    """The format of the image at ``path``, from its first and last bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_SIZE, 0)
        tail = os.pread(fd, TAIL_SIZE, max(0, size - TAIL_SIZE)) if size else b""
    finally:
        os.close(fd)
    for name in FORMAT_NAMES:
        if format_class(name).probe(head, tail):
            return name
    raise ImageFormatError(path, None, "not a disk image of any known format")  # pragma: no cover
