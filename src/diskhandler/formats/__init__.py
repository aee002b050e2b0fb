"""The block layer: every supported disk image format as one seekable binary stream.

``open_image`` and ``create_image`` are the entry points; :class:`DiskImage` is the stream.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from diskhandler._locking import check_not_in_use, lock_chain
from diskhandler.formats._detect import (
    FORMAT_NAMES,
    SUFFIXES,
    canonical_format,
    detect_format,
    format_class,
)
from diskhandler.formats._files import ParentPolicy, checked_path, normalize_policy
from diskhandler.formats._stream import DiskImage
from diskhandler.formats.chain import ChainGuard

__all__ = ["FORMAT_NAMES", "DiskImage", "ParentPolicy", "create_image", "detect_format", "open_image"]


def open_image(
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    format: str | None = None,
    parents: ParentPolicy = "any",
    _guard: ChainGuard | None = None,
) -> DiskImage:
    """Open the disk image at ``path`` and its whole snapshot chain.

    The format is detected from the file's magic numbers unless ``format`` names it. Parents are found
    the way each format records them and are always opened read-only: only the leaf is written.

    ``parents`` says where the other files the image names (parents, backing files, VMDK extents) may
    be: ``"any"`` (default; where the image says, as qemu does), ``"same-dir"`` (the folder of
    ``path`` or below, symbolic links resolved), ``"none"`` (only a self-contained image opens) or a
    folder given as a ``pathlib.Path``. Use ``"same-dir"`` or ``"none"`` for images you did not make.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SpecialFileError: ``path`` (or a file it names) is a directory, FIFO, device, socket or a file
            of /proc or /sys.
        ImagePathError: a path has a NUL byte, cannot be encoded or is too long.
        ImageFormatError: the file is damaged (the error names the file and the field).
        ChainError: a parent is missing, does not match, or the chain loops.
        ParentPolicyError: a parent, backing file or extent is where ``parents`` forbids.
        UnsupportedImageError: the image uses a feature diskhandler does not implement.
        ImageInUseError: ``writable=True`` and another process holds the image.
    """
    policy = normalize_policy(parents)
    p = checked_path(path)
    guard = attrs.evolve(_guard or ChainGuard(), policy=policy).enter(p)
    name = canonical_format(format) if format else detect_format(p)
    if writable:
        check_not_in_use(p)  # before any parser runs: a running VM's image is never touched
    image = format_class(name).open(p, writable=writable, guard=guard)
    image._parents = policy  # reopening a part later (a qcow2 snapshot's backing file) keeps the policy
    if writable:
        try:
            lock_chain(image)  # every file written (each VMDK extent), and the parents as QEMU does
            image._start_writing()  # only now may the format change the file (a VHDX log replay)
        except BaseException:
            image.close()
            raise
    return image


def create_image(
    path: str | os.PathLike[str],
    size: int | None = None,
    format: str | None = None,
    *,
    parent: str | os.PathLike[str] | None = None,
    **options: Any,
) -> DiskImage:
    """Create a new image at ``path`` and return it open for writing.

    Args:
        path: the new file; it must not exist yet (nothing is ever overwritten).
        size: virtual size in bytes; taken from ``parent`` when omitted.
        format: ``raw``, ``vdi``, ``vhd`` (alias ``vpc``), ``vmdk`` or ``qcow2``; from the suffix of
            ``path`` when omitted.
        parent: make a differencing child (VDI diff, VHD diff, qcow2 overlay, VMDK delta link).
        options: format-specific (e.g. ``subformat="fixed"``, ``block_size=...``, ``cluster_size=...``).
    """
    p = checked_path(path, "new image")
    if p.exists():
        raise FileExistsError(17, "refusing to overwrite an existing file", str(p))
    if format is None:
        suffix = p.suffix.lower()
        if suffix not in SUFFIXES:
            raise ValueError(
                f"cannot tell the format of {p} from its suffix {suffix!r}; pass format= "
                f"(one of {', '.join(FORMAT_NAMES)})"
            )
        format = SUFFIXES[suffix]
    name = canonical_format(format)
    parent_path = checked_path(parent, "parent") if parent is not None else None
    if size is None and parent_path is None:
        raise ValueError("create_image needs a size (or a parent to take the size from)")
    if size is not None and size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return format_class(name).create(p, size, parent=parent_path, guard=ChainGuard(), **options)
