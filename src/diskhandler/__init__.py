"""diskhandler: virtual disk images in pure Python.

Open VDI, VHD, VMDK, QCOW2 and raw images with their snapshot chains as seekable streams, list and
create partition tables, and move files in and out of the guest's filesystem without booting it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diskhandler.create import copy_sparse, create_io_disk
from diskhandler.errors import (
    ChainError,
    DiskHandlerError,
    FilesystemError,
    GuestLinkWarning,
    GuestPathError,
    ImageFileError,
    ImageFormatError,
    ImageInUseError,
    ImagePathError,
    ImageWarning,
    LvmMetadataError,
    MissingDependencyError,
    ParentPolicyError,
    PartitionTableError,
    ReadOnlyImageError,
    SnapshotNotFoundError,
    SpecialFileError,
    UnsupportedImageError,
)
from diskhandler.filesystems import detect_filesystem
from diskhandler.formats import FORMAT_NAMES, DiskImage, ParentPolicy, create_image, detect_format, open_image
from diskhandler.operations import DiskOperations
from diskhandler.partitions import (
    LogicalVolume,
    Partition,
    PartitionSpec,
    create_partition_table,
    list_partitions,
)

if TYPE_CHECKING:
    from diskhandler.vdfuse import VDFuseMount, mount_vdfuse

_LAZY = {"VDFuseMount", "mount_vdfuse"}


def __getattr__(name: str) -> Any:
    # diskhandler.vdfuse is imported on first use only, so that ``python -m diskhandler.vdfuse`` (the
    # vdfuse server) does not find its own module already imported by the package.
    if name in _LAZY:
        from diskhandler import vdfuse  # noqa: PLC0415

        return getattr(vdfuse, name)
    raise AttributeError(f"module 'diskhandler' has no attribute {name!r}")


__all__ = [
    "FORMAT_NAMES",
    "ChainError",
    "DiskHandlerError",
    "DiskImage",
    "DiskOperations",
    "FilesystemError",
    "GuestLinkWarning",
    "GuestPathError",
    "ImageFileError",
    "ImageFormatError",
    "ImageInUseError",
    "ImagePathError",
    "ImageWarning",
    "LogicalVolume",
    "LvmMetadataError",
    "MissingDependencyError",
    "ParentPolicy",
    "ParentPolicyError",
    "Partition",
    "PartitionSpec",
    "PartitionTableError",
    "ReadOnlyImageError",
    "SnapshotNotFoundError",
    "SpecialFileError",
    "UnsupportedImageError",
    "VDFuseMount",
    "copy_sparse",
    "create_image",
    "create_io_disk",
    "create_partition_table",
    "detect_filesystem",
    "detect_format",
    "list_partitions",
    "mount_vdfuse",
    "open_image",
]
