"""diskhandler: virtual disk images in pure Python.

Open VDI, VHD, VMDK, QCOW2 and raw images with their snapshot chains as seekable streams, list and
create partition tables, and move files in and out of the guest's filesystem without booting it.
"""

from __future__ import annotations

from diskhandler.errors import (
    ChainError,
    DiskHandlerError,
    FilesystemError,
    GuestPathError,
    ImageFormatError,
    ImageInUseError,
    ImageWarning,
    MissingDependencyError,
    PartitionTableError,
    ReadOnlyImageError,
    UnsupportedImageError,
)
from diskhandler.formats import FORMAT_NAMES, DiskImage, create_image, detect_format, open_image

__all__ = [
    "FORMAT_NAMES",
    "ChainError",
    "DiskHandlerError",
    "DiskImage",
    "FilesystemError",
    "GuestPathError",
    "ImageFormatError",
    "ImageInUseError",
    "ImageWarning",
    "MissingDependencyError",
    "PartitionTableError",
    "ReadOnlyImageError",
    "UnsupportedImageError",
    "create_image",
    "detect_format",
    "open_image",
]
