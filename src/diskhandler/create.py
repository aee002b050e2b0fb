"""New disks with a partition table and a filesystem in one call (the IO disk of a test run).

The filesystem is built by the host's own tools on a temporary flat file of the partition's size —
``mke2fs -t ext4 -d FOLDER`` (e2fsprogs) for ext2/3/4, ``mkfs.vfat`` + ``mcopy`` (dosfstools, mtools)
for FAT — and then copied into the partition through diskhandler, skipping all-zero chunks so the new
image stays sparse. None of this needs root. (Reading images never uses host tools; creating a
filesystem is the one place where they are worth their weight.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from diskhandler.errors import FilesystemError, MissingDependencyError
from diskhandler.formats import DiskImage, create_image

__all__ = ["copy_sparse", "create_io_disk", "make_filesystem"]

_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_EXT = ("ext2", "ext3", "ext4")
_FAT = ("vfat", "fat", "fat32", "fat16")


def _tool(program: str, package: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise MissingDependencyError(
            f"creating this filesystem needs {program}; install the Debian package {package}"
        )
    return found


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, check=False)
    if proc.returncode != 0:
        raise FilesystemError(
            errno.EIO,
            f"{what} failed ({Path(argv[0]).name} exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}",
        )


def make_filesystem(
    volume: DiskImage,
    filesystem: str = "ext4",
    files: str | os.PathLike[str] | None = None,
    *,
    label: str = "",
) -> None:
    """Write a new ``filesystem`` (ext2/3/4 or vfat) over all of ``volume``, filled from ``files``.

    ``volume`` is a writable disk or partition view. Existing data on it is replaced.

    Raises:
        MissingDependencyError: mke2fs, mkfs.vfat or mcopy is not installed.
        FilesystemError: the tool failed (e.g. the files do not fit).
        ValueError: an unknown filesystem name.
    """
    fs = filesystem.lower()
    if fs not in _EXT and fs not in _FAT:
        raise ValueError(f"unknown filesystem {filesystem!r}; expected one of ext2, ext3, ext4, vfat")
    source = Path(files) if files is not None else None
    if source is not None and not source.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "files must be a folder", str(source))
    import tempfile  # noqa: PLC0415  (lazy: keeps ``import diskhandler`` fast)

    with tempfile.TemporaryDirectory(prefix="diskhandler-mkfs-") as tmp:
        flat = Path(tmp) / "fs.img"
        with flat.open("wb") as f:
            f.truncate(volume.size)
        if fs in _EXT:
            argv = [_tool("mke2fs", "e2fsprogs"), "-q", "-F", "-t", fs, "-E", "root_owner=0:0"]
            if label:
                argv += ["-L", label]
            if source is not None:
                argv += ["-d", str(source)]
            _run([*argv, str(flat)], f"mke2fs of the {fs} filesystem")
        else:
            argv = [_tool("mkfs.vfat", "dosfstools")]
            if label:
                argv += ["-n", label[:11]]
            _run([*argv, str(flat)], "mkfs.vfat")
            if source is not None and any(source.iterdir()):
                mcopy = _tool("mcopy", "mtools")
                items = [str(p) for p in sorted(source.iterdir())]
                _run([mcopy, "-s", "-p", "-Q", "-i", str(flat), *items, "::/"], "mcopy of the files")
        copy_sparse(flat, volume)


def copy_sparse(flat: Path, volume: DiskImage) -> None:
    """Copy the flat file ``flat`` onto ``volume``: its data extents only, and in them non-zero chunks.

    The volume must read as zeros where nothing is written (a new image does), and be at least as large.
    This is how a filesystem made by a host tool in a flat file, or a sparse raw disk, lands in any
    format without allocating what is only zeros.
    """
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    zeros = memoryview(_ZERO_CHUNK)
    with flat.open("rb", buffering=0) as f:
        fd = f.fileno()
        for start, end in _data_extents(fd, os.fstat(fd).st_size):
            offset = start
            while offset < end:
                n = os.preadv(fd, [view[: min(_CHUNK, end - offset)]], offset)
                if n == 0:
                    break
                if view[:n] != zeros[:n]:
                    volume.write_at(offset, view[:n])
                offset += n
    volume.flush()


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of ``fd`` that hold data (everything when holes are not reported)."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                extents.append((offset, size))
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


def create_io_disk(
    path: str | os.PathLike[str],
    size: int,
    format: str = "vdi",
    filesystem: str = "ext4",
    files: str | os.PathLike[str] | None = None,
    *,
    partition_table: str | None = "mbr",
    label: str = "",
) -> Path:
    """Create a disk image with one partition spanning it and a filesystem, optionally filled from a folder.

    Args:
        path: the new image (it must not exist).
        size: the virtual disk size in bytes.
        format: ``vdi``, ``vhd``, ``vhdx``, ``vmdk``, ``qcow2`` or ``raw``.
        filesystem: ``ext4`` (or ``ext2``/``ext3``) or ``vfat``.
        files: a host folder whose contents become the filesystem's root.
        partition_table: ``"mbr"``, ``"gpt"`` or ``None`` (the filesystem fills the whole disk).
        label: the filesystem label.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. On failure the half-made image is removed.
    """
    from diskhandler.partitions import PartitionSpec, create_partition_table  # noqa: PLC0415

    p = Path(path)
    fs = filesystem.lower()
    if fs not in _EXT and fs not in _FAT:
        raise ValueError(f"unknown filesystem {filesystem!r}; expected one of ext2, ext3, ext4, vfat")
    if partition_table not in ("mbr", "gpt", None):
        raise ValueError(f"partition_table must be 'mbr', 'gpt' or None, got {partition_table!r}")
    image = create_image(p, size, format)
    try:
        with image:
            if partition_table is None:
                make_filesystem(image, fs, files, label=label)
            else:
                part_type = "linux" if fs in _EXT else "fat32"
                (part,) = create_partition_table(image, partition_table, [PartitionSpec(type=part_type)])
                with part:
                    make_filesystem(part, fs, files, label=label)
    except BaseException:
        for leftover in {p, *_extent_files(p)}:
            leftover.unlink(missing_ok=True)
        raise
    return p


def _extent_files(path: Path) -> list[Path]:
    """Files a multi-file format may have created beside ``path`` (VMDK extents)."""
    return sorted(path.parent.glob(f"{path.stem}-*{path.suffix}")) if path.suffix == ".vmdk" else []
