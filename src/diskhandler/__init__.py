"""diskhandler: virtual disk images in pure Python.

Open VDI, VHD, VMDK, QCOW2 and raw images with their snapshot chains as seekable streams, list and
create partition tables, and move files in and out of the guest's filesystem without booting it.
"""

from __future__ import annotations

from diskhandler.create import create_io_disk
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
from diskhandler.filesystems import detect_filesystem
from diskhandler.formats import FORMAT_NAMES, DiskImage, create_image, detect_format, open_image
from diskhandler.operations import DiskOperations
from diskhandler.partitions import Partition, PartitionSpec, create_partition_table, list_partitions
from diskhandler.vdfuse import VDFuseMount, mount_vdfuse

__all__ = [
    "FORMAT_NAMES",
    "ChainError",
    "DiskHandlerError",
    "DiskImage",
    "DiskOperations",
    "FilesystemError",
    "GuestPathError",
    "ImageFormatError",
    "ImageInUseError",
    "ImageWarning",
    "MissingDependencyError",
    "Partition",
    "PartitionSpec",
    "PartitionTableError",
    "ReadOnlyImageError",
    "UnsupportedImageError",
    "VDFuseMount",
    "create_image",
    "create_io_disk",
    "create_partition_table",
    "detect_filesystem",
    "detect_format",
    "list_partitions",
    "mount_vdfuse",
    "open_image",
]
