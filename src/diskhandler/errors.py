"""Errors raised by diskhandler.

Every error diskhandler raises on purpose derives from :class:`DiskHandlerError`, and also from the
builtin exception it *is*, so ``except OSError`` or ``except ValueError`` in a caller keeps working::

    DiskHandlerError
    ├── ImageFormatError (ValueError)          the bytes of an image are not what its format allows
    │   ├── UnsupportedImageError              valid, but uses a feature diskhandler does not implement
    │   │                                      (encryption, an unknown incompatible feature bit, a format
    │   │                                      it knows but does not read, an LVM layout, ...)
    │   ├── LvmMetadataError                   LVM2 label, metadata area or metadata text is damaged
    │   └── ChainError                         a snapshot chain is broken: missing, cyclic or
    │                                          mismatched parent
    │       └── ParentPolicyError              a parent, backing file or extent lies where the
    │                                          ``parents=`` policy of open_image forbids
    ├── PartitionTableError (ValueError)       a partition table is damaged or cannot be written
    ├── ReadOnlyImageError (io.UnsupportedOperation)
    │                                          a write to an image opened read-only (or forced read-only,
    │                                          e.g. a VHD with a stale checksum)
    ├── ImageInUseError (OSError)              another process (a running VM, another writer) holds the image
    ├── ImageFileError (OSError)               a file of an image (the image, a parent, a backing file, an
    │   │                                      extent) cannot be used as one
    │   ├── SpecialFileError                   it is a directory, FIFO, device, socket, or a file of /proc
    │   │                                      or /sys
    │   └── ImagePathError                     its name is no usable path: NUL byte, too long, not
    │                                          encodable, a symbolic-link loop
    ├── SnapshotNotFoundError (LookupError)    no internal snapshot of that name; ``names`` lists those there
    ├── MissingDependencyError (ImportError)   an optional module or host tool is needed; says what to install
    ├── GuestPathError (PermissionError)       a guest path escapes the guest's root
    └── FilesystemError (OSError)              the guest filesystem cannot be reached or is full

Warnings go through :class:`ImageWarning` (a ``UserWarning``), e.g. a stale VHD checksum, and
:class:`GuestLinkWarning` (a ``UserWarning``): a download skipped guest links or special files.
"""

from __future__ import annotations

import io
from pathlib import Path

from typing_extensions import override

__all__ = [
    "ChainError",
    "DiskHandlerError",
    "FilesystemError",
    "GuestLinkWarning",
    "GuestPathError",
    "ImageFileError",
    "ImageFormatError",
    "ImageInUseError",
    "ImagePathError",
    "ImageWarning",
    "LvmMetadataError",
    "MissingDependencyError",
    "ParentPolicyError",
    "PartitionTableError",
    "ReadOnlyImageError",
    "SnapshotNotFoundError",
    "SpecialFileError",
    "UnsupportedImageError",
]


class DiskHandlerError(Exception):
    """Root of every error diskhandler raises on purpose."""


class ImageFormatError(DiskHandlerError, ValueError):
    """An image's bytes break its format's rules.

    ``path`` is the offending file, ``field`` the header field or structure that is wrong (``None``
    when the whole file is unrecognisable). ``str()`` names both.
    """

    def __init__(self, path: str | Path | None, field: str | None, message: str) -> None:
        self.path = Path(path) if path is not None else None
        self.field = field
        self.message = message
        where = str(self.path) if self.path is not None else "<image>"
        if field:
            where = f"{where}: {field}"
        super().__init__(f"{where}: {message}")


class UnsupportedImageError(ImageFormatError):
    """A well-formed image that uses a feature diskhandler does not implement."""


class LvmMetadataError(ImageFormatError):
    """LVM2 metadata that breaks the format's rules (damaged label, header, checksum or text)."""


class ChainError(ImageFormatError):
    """A snapshot chain is broken: a parent is missing, does not match, or the chain loops."""


class ParentPolicyError(ChainError):
    """A parent, backing file or extent the image names lies where ``open_image(parents=...)`` forbids."""


class ImageFileError(DiskHandlerError, OSError):
    """A file of an image (the image itself, a parent, a backing file, an extent) cannot be used.

    Built like an ``OSError``: ``errno``, ``strerror`` (what is wrong) and ``filename``.
    """


class SpecialFileError(ImageFileError):
    """The file is a directory, FIFO, device or socket, or lives in ``/proc`` or ``/sys``."""


class ImagePathError(ImageFileError):
    """The file's name is no usable path: a NUL byte, too long, not encodable, or a symlink loop."""


class PartitionTableError(DiskHandlerError, ValueError):
    """A partition table is damaged, or the partitions asked for cannot be laid out."""


class ReadOnlyImageError(DiskHandlerError, io.UnsupportedOperation):
    """A write was attempted on an image that is open read-only."""


class ImageInUseError(DiskHandlerError, OSError):
    """The image is held by another process (a running VM or another writer).

    ``holder`` describes who holds it when that can be found out (a PID, a VM name), else ``None``.
    """

    def __init__(self, path: str | Path, holder: str | None = None, detail: str = "") -> None:
        self.path = Path(path)
        self.holder = holder
        who = f" by {holder}" if holder else " by another process"
        msg = f"{self.path}: image is in use{who}"
        if detail:
            msg = f"{msg}; {detail}"
        super().__init__(msg)


class MissingDependencyError(DiskHandlerError, ImportError):
    """An optional Python module or host tool is needed; the message names what to install."""


class GuestPathError(DiskHandlerError, PermissionError):
    """A guest path (through ``..`` or a symlink) would leave the guest filesystem's root."""


class FilesystemError(DiskHandlerError, OSError):
    """The guest filesystem cannot be found, mounted, or written (e.g. it is full)."""


class ImageWarning(UserWarning):
    """Something about an image is suspicious but readable (stale checksum, size mismatch)."""


class GuestLinkWarning(UserWarning):
    """A download skipped guest entries the host copy must not hold: links leading out of the
    destination, absolute or dangling links, device nodes, FIFOs, sockets.

    ``skipped`` maps each skipped guest path to the reason; the message shows the first ten.
    """

    def __init__(self, message: str, skipped: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.skipped = dict(skipped or {})


class SnapshotNotFoundError(DiskHandlerError, LookupError):
    """No internal snapshot of that name (or id); ``names`` lists the ones that exist."""

    def __init__(self, path: Path, wanted: str, names: list[str]) -> None:
        self.path = path
        self.wanted = wanted
        self.names = names
        listing = ", ".join(repr(n) for n in names) if names else "none"
        super().__init__(f"{path}: no internal snapshot named {wanted!r}; existing snapshots: {listing}")

    @override
    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0])
