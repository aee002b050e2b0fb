"""The vdfuse view: a disk image as plain files in a FUSE filesystem.

Like VirtualBox's ``vdfuse``, a mount shows::

    EntireDisk      the whole virtual disk
    Partition1..N   each partition (MBR primaries 1-4, EBR logical partitions from 5, GPT entries)

as regular files, read-write (read-only with ``-r``). A partition-less disk shows only ``EntireDisk``.
``EntireDisk`` and the partition files exclude each other while open: opening ``EntireDisk`` while a
partition file is open (or the other way round) fails with ``EBUSY``. Every FUSE ``flush``, ``fsync``
and ``release`` flushes the image's metadata, so a killed process leaves a valid image; unmounting
flushes and closes everything.

From the shell::

    pyti-vdfuse disk.vdi /mnt/disk        # daemonizes once the mount is live
    pyti-vdfuse -r -f disk.vdi /mnt/disk  # read-only, in the foreground

From Python, :func:`mount_vdfuse` runs the same program in a child process (libfuse's main loop blocks
and installs signal handlers, so it does not belong in the caller's process) and returns once the
mount is live::

    with mount_vdfuse("disk.vdi", "/mnt/disk") as m:
        data = (m.mountpoint / "Partition1").read_bytes()

This is the only module that imports the FUSE binding (mfusepy, over libfuse3 or libfuse2).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from diskhandler._fusechild import (
    READY,
    ChildProcess,
    Lifeline,
    LifelineWatcher,
    fork_child,
    stop_child,
    wait_ready,
)
from diskhandler.errors import (
    ChainError,
    DiskHandlerError,
    FilesystemError,
    ImageFileError,
    ImageFormatError,
    ImageInUseError,
    ImagePathError,
    MissingDependencyError,
    ParentPolicyError,
    PartitionTableError,
    ReadOnlyImageError,
    SpecialFileError,
    UnsupportedImageError,
)
from diskhandler.formats import DiskImage, ParentPolicy, open_image
from diskhandler.formats._files import PARENT_POLICIES

__all__ = ["ENTIRE_DISK", "VDFuseMount", "VDFuseOperations", "check_fuse_available", "main", "mount_vdfuse"]

ENTIRE_DISK = "EntireDisk"
_PARTITION_PREFIX = "Partition"


def check_fuse_available() -> None:
    """Raise :class:`MissingDependencyError` unless FUSE can be used here (``/dev/fuse`` + libfuse)."""
    if not os.path.exists("/dev/fuse"):
        raise MissingDependencyError(
            "/dev/fuse does not exist: load the fuse kernel module (modprobe fuse) or, in a container, "
            "pass the device in (--device /dev/fuse)"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MissingDependencyError("/dev/fuse is not readable and writable by this user")
    try:
        _import_binding()
    except (ImportError, OSError, AttributeError) as exc:
        raise MissingDependencyError(
            f"mfusepy cannot load libfuse: {exc}; install the Debian package libfuse3-3 "
            "(or libfuse2) and the Python package mfusepy"
        ) from exc


# Where Debian-like and Fedora-like systems keep libfuse. libfuse3 comes first: its writeback cache
# lets the kernel gather a filesystem driver's 4 KiB writes into large requests, and its requests
# may be as large as the kernel allows (1 MiB); libfuse2 is the fallback. mfusepy itself would pick
# libfuse2 whenever both are installed. Setting FUSE_LIBRARY_PATH (mfusepy's own variable) chooses.
_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64",
            "/usr/lib")  # fmt: skip
_LIBFUSE_CANDIDATES = tuple(f"{d}/libfuse3.so.3" for d in _LIBDIRS) + tuple(
    f"{d}/libfuse.so.2" for d in _LIBDIRS
)


def _import_binding() -> Any:
    """Import mfusepy, pointing it at libfuse3 when installed (else libfuse2); the module."""
    hint = None
    if "mfusepy" not in sys.modules and not os.environ.get("FUSE_LIBRARY_PATH"):
        hint = next((c for c in _LIBFUSE_CANDIDATES if os.path.exists(c)), None)
        if hint is not None:
            os.environ["FUSE_LIBRARY_PATH"] = hint
    try:
        import mfusepy  # noqa: PLC0415  (lazy: ``--help`` and errors need no libfuse)
    finally:
        if hint is not None:
            os.environ.pop("FUSE_LIBRARY_PATH", None)
    return mfusepy


def libfuse_version() -> tuple[int, int]:
    """The (major, minor) version of the libfuse the vdfuse server uses."""
    binding = _import_binding()
    return int(binding.fuse_version_major), int(binding.fuse_version_minor)


def _errno_of(exc: BaseException) -> int:
    """The errno a FUSE caller sees for ``exc`` (the one boundary where errors are translated)."""
    if isinstance(exc, ReadOnlyImageError):
        return errno.EROFS
    if isinstance(exc, ImageInUseError):
        return errno.EBUSY
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, ValueError):  # damaged image data, closed image
        return errno.EIO
    return errno.EIO


# The view's operations (each maps to VDFuseOperations) and those that would change its fixed tree.
_OPERATIONS = ("getattr", "readdir", "statfs", "access", "truncate", "utimens", "open", "read", "write",
               "flush", "fsync", "release", "destroy")  # fmt: skip
_TREE_CHANGES = ("create", "mkdir", "rmdir", "unlink", "rename", "symlink", "link", "mknod", "chmod", "chown")
_FUSE_CAP_WRITEBACK_CACHE = 1 << 16  # libfuse3 fuse_common.h
_MAX_REQUEST = 1 << 20  # the kernel's largest FUSE request (256 pages)


def _make_operations_class() -> type[Any]:
    binding = _import_binding()

    def adapt(name: str) -> Callable[..., Any]:
        def method(self: Any, *args: Any) -> Any:
            try:
                return getattr(self.core, name)(*args)
            except binding.FuseOSError:
                raise
            except Exception as exc:
                raise binding.FuseOSError(_errno_of(exc)) from exc

        method.__name__ = name
        return method

    def refuse(name: str) -> Callable[..., Any]:
        def method(self: Any, path: str, *args: Any) -> Any:
            raise binding.FuseOSError(errno.EROFS)  # the view's files are fixed: one per disk/partition

        method.__name__ = name
        return method

    def init_with_config(self: Any, conn: Any, config: Any) -> None:
        core: VDFuseOperations = self.core
        if conn is not None and binding.fuse_version_major >= 3:
            conn.max_write = (
                min(_MAX_REQUEST, conn.max_write or _MAX_REQUEST) if conn.max_write else _MAX_REQUEST
            )
            conn.max_readahead = _MAX_REQUEST
            if not core.readonly and conn.capable & _FUSE_CAP_WRITEBACK_CACHE:
                conn.want |= _FUSE_CAP_WRITEBACK_CACHE
        core.init("/")

    namespace: dict[str, Any] = {name: adapt(name) for name in _OPERATIONS}
    namespace.update({name: refuse(name) for name in _TREE_CHANGES})
    namespace["init_with_config"] = init_with_config
    namespace["use_ns"] = True
    namespace["__init__"] = lambda self, core: setattr(self, "core", core)
    namespace["__doc__"] = "mfusepy adapter around VDFuseOperations; every error becomes FuseOSError."
    return type("_Operations", (binding.Operations,), namespace)


class VDFuseOperations:
    """The filesystem behind a vdfuse mount, independent of the FUSE binding (tests call it directly).

    Args:
        disk: the open image; it is closed by :meth:`destroy`.
        partitions: views of its partitions (``[]`` for a partition-less disk).
        readonly: refuse writes with ``EROFS``.
        on_ready: called once when the kernel has the mount live (FUSE ``init``).
    """

    def __init__(
        self,
        disk: DiskImage,
        partitions: Sequence[DiskImage],
        *,
        readonly: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.disk = disk
        self.readonly = readonly or not disk.writable()
        self._on_ready = on_ready
        self.files: dict[str, DiskImage] = {ENTIRE_DISK: disk}
        for index, part in enumerate(partitions, start=1):
            # PartitionN, or VG-LV for an LVM logical volume (the partitions module names them)
            name = getattr(part, "view_name", None) or f"{_PARTITION_PREFIX}{getattr(part, 'number', index)}"
            self.files[name] = part
        # "/name" -> (the image read, first byte, size): partitions go straight to the disk; a logical
        # volume maps its extents itself
        self._ranges: dict[str, tuple[DiskImage, int, int]] = {}
        for name, image in self.files.items():
            if image is disk:
                self._ranges["/" + name] = (disk, 0, image.size)
            elif hasattr(image, "extent_map"):
                self._ranges["/" + name] = (image, 0, image.size)
            else:
                self._ranges["/" + name] = (disk, getattr(image, "start", 0), image.size)
        self._open: dict[str, int] = dict.fromkeys(self.files, 0)
        self._open_lock = threading.Lock()
        st = os.stat(disk.path)
        self._times = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        self._uid = os.getuid()
        self._gid = os.getgid()

    def _file(self, path: str) -> tuple[str, DiskImage]:
        name = path.lstrip("/")
        image = self.files.get(name)
        if image is None:
            raise FileNotFoundError(errno.ENOENT, "no such file in the vdfuse view", path)
        return name, image

    # -- lifecycle --------------------------------------------------------------------------------

    def init(self, path: str) -> None:
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        for name, image in self.files.items():
            if name != ENTIRE_DISK:
                image.close()
        self.disk.close()

    # -- metadata ---------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        atime, mtime, ctime = self._times
        common = {"st_uid": self._uid, "st_gid": self._gid, "st_atime": atime, "st_mtime": mtime}
        common["st_ctime"] = ctime
        if path == "/":
            mode = 0o555 if self.readonly else 0o755
            return {**common, "st_mode": stat.S_IFDIR | mode, "st_nlink": 2, "st_size": 0}
        _name, image = self._file(path)
        mode = 0o444 if self.readonly else 0o644
        blocks = (image.size + 511) // 512
        return {**common, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": image.size,
                "st_blocks": blocks}  # fmt: skip

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return [".", "..", *self.files]

    def statfs(self, path: str) -> dict[str, int]:
        total = sum(image.size for image in self.files.values())
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total // 4096, "f_bfree": 0,
                "f_bavail": 0, "f_files": len(self.files), "f_ffree": 0, "f_namemax": 255}  # fmt: skip

    def access(self, path: str, amode: int) -> None:
        if path != "/":
            self._file(path)
        if amode & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only vdfuse view", path)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        _name, image = self._file(path)
        if self.readonly:
            raise OSError(errno.EROFS, "read-only vdfuse view", path)
        if length != image.size:
            raise OSError(errno.EPERM, "a disk's size is fixed; its files cannot be resized", path)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        """Accepted and ignored (``touch`` works); the times shown are the image file's."""
        if path != "/":
            self._file(path)

    # -- open files -------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        name, _image = self._file(path)
        if (flags & os.O_ACCMODE) != os.O_RDONLY and self.readonly:
            raise OSError(errno.EROFS, "read-only vdfuse view", path)
        with self._open_lock:
            if name == ENTIRE_DISK:
                busy = any(n != ENTIRE_DISK and count for n, count in self._open.items())
            else:
                busy = self._open[ENTIRE_DISK] > 0
            if busy:
                raise OSError(
                    errno.EBUSY,
                    "EntireDisk and the partition files cannot be open at the same time",
                    path,
                )
            self._open[name] += 1
        return 0

    def _range(self, path: str) -> tuple[DiskImage, int, int]:
        found = self._ranges.get(path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such file in the vdfuse view", path)
        return found

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        disk, start, length = self._range(path)
        if offset >= length:
            return b""
        return disk.read_at(start + offset, min(size, length - offset))

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        """Write what fits before the end of the file (a short write); nothing fits: ``ENOSPC``."""
        disk, start, length = self._range(path)
        if self.readonly:
            raise OSError(errno.EROFS, "read-only vdfuse view", path)
        if offset >= length:
            raise OSError(errno.ENOSPC, "write past the end of the disk", path)
        if offset + len(data) > length:
            data = data[: length - offset]
        return disk.write_at(start + offset, data)

    def flush(self, path: str, fh: int) -> None:
        self._sync(path)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self._file(path)
        if not self.readonly:
            self.disk.sync()  # metadata written, then the image file on stable storage

    def release(self, path: str, fh: int) -> None:
        name, _image = self._file(path)
        try:
            self._sync(path)
        finally:
            with self._open_lock:
                self._open[name] = max(0, self._open[name] - 1)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no file of the view is open (at most ``timeout`` seconds); whether it is idle."""
        deadline = time.monotonic() + timeout
        while True:
            with self._open_lock:
                if not any(self._open.values()):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _sync(self, path: str) -> None:
        self._file(path)
        if not self.readonly:
            self.disk.flush()  # partitions are views: the disk holds the metadata


# -- the program --------------------------------------------------------------------------------


def _partitions_of(disk: DiskImage) -> list[DiskImage]:
    try:
        from diskhandler.partitions import list_partitions  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - the partitions module ships with diskhandler
        raise MissingDependencyError(f"diskhandler.partitions is unavailable: {exc}") from exc
    parts: list[DiskImage] = []
    for part in list_partitions(disk):
        # the container of the logical partitions is not shown (they are), nor an LVM volume of a
        # layout diskhandler cannot read
        if part.is_extended or not getattr(part, "supported", True):
            part.close()
        else:
            parts.append(part)
    return parts


def _serve(
    image: str,
    mountpoint: str,
    *,
    readonly: bool,
    foreground: bool,
    image_format: str | None,
    on_ready: Callable[[], None] | None,
    lifeline_fd: int | None = None,
    parents: ParentPolicy = "any",
) -> None:
    binding = _import_binding()

    disk = open_image(image, writable=not readonly, format=image_format, parents=parents)
    try:
        partitions = _partitions_of(disk)
    except BaseException:
        disk.close()
        raise
    core = VDFuseOperations(disk, partitions, readonly=readonly, on_ready=on_ready)
    ops = _make_operations_class()(core)
    if lifeline_fd is not None:
        main_thread = threading.get_ident()

        def owner_gone() -> None:
            # The guarded filesystem driver has been stopped (its last writes came through us); once
            # its files are closed, leave libfuse's loop the way SIGTERM always does: unmount, then
            # ``destroy`` flushes and closes the image, releasing its locks.
            core.wait_idle(10.0)
            signal.pthread_kill(main_thread, signal.SIGTERM)

        LifelineWatcher(lifeline_fd, owner_gone).start()
    options: dict[str, Any] = {
        "foreground": foreground,
        "nothreads": True,
        "fsname": f"vdfuse:{Path(image).name}".replace(",", "_"),
        "subtype": "vdfuse",
        "default_permissions": True,
    }
    if binding.fuse_version_major < 3:  # libfuse3 takes these from ``init`` (see init_with_config)
        options.update(big_writes=True, max_read=1 << 17, max_write=1 << 17)
    if readonly:
        options["ro"] = True
    try:
        binding.FUSE(ops, mountpoint, **options)
    except RuntimeError as exc:
        raise FilesystemError(
            errno.EIO, f"libfuse could not mount the vdfuse view: {exc}", mountpoint
        ) from exc
    finally:
        if not disk.closed:  # the mount failed before FUSE ``destroy`` ran
            core.destroy("/")


_ERROR_TYPES: dict[str, type[DiskHandlerError]] = {
    cls.__name__: cls
    for cls in (
        ImageFormatError,
        UnsupportedImageError,
        ChainError,
        PartitionTableError,
        ReadOnlyImageError,
        ImageInUseError,
        MissingDependencyError,
        FilesystemError,
        ParentPolicyError,
        ImageFileError,
        SpecialFileError,
        ImagePathError,
    )
}


def _describe_error(exc: BaseException) -> dict[str, Any]:
    info: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, OSError):
        info["errno"] = exc.errno
        info["strerror"] = exc.strerror
        info["filename"] = None if exc.filename is None else str(exc.filename)
    for attr in ("path", "holder", "field"):
        value = getattr(exc, attr, None)
        if value is not None:
            info[attr] = str(value)
    return info


def _rebuild_error(info: dict[str, Any], image: Path) -> Exception:
    """The child's error as the same diskhandler class in the parent."""
    kind = info.get("type", "")
    message = str(info.get("message", "vdfuse failed"))
    path = Path(info.get("path") or image)
    if kind == "ImageInUseError":
        err: Exception = ImageInUseError(path, info.get("holder"))
        err.args = (message,)
        return err
    if kind in ("ImageFileError", "SpecialFileError", "ImagePathError"):
        return _ERROR_TYPES[kind](
            int(info.get("errno") or errno.EIO), info.get("strerror") or message, info.get("filename")
        )
    if kind in ("ImageFormatError", "UnsupportedImageError", "ChainError", "ParentPolicyError"):
        cls = _ERROR_TYPES[kind]
        assert issubclass(cls, ImageFormatError)
        err = cls(path, info.get("field"), "")
        err.args = (message,)
        return err
    if kind in ("PartitionTableError", "MissingDependencyError", "ReadOnlyImageError"):
        return _ERROR_TYPES[kind](message)
    if kind == "FileNotFoundError":
        return FileNotFoundError(errno.ENOENT, message)
    if kind == "PermissionError":
        return PermissionError(errno.EACCES, message)
    return FilesystemError(int(info.get("errno") or errno.EIO), message, str(path))


def main(argv: Sequence[str] | None = None) -> int:
    """``pyti-vdfuse IMAGE MOUNTPOINT [-r] [-f]``: show a disk image as EntireDisk / PartitionN files."""
    import argparse  # noqa: PLC0415  (only the command line needs it; keeps ``import diskhandler`` fast)

    parser = argparse.ArgumentParser(
        prog="pyti-vdfuse",
        description="Show a disk image (VDI, VHD, VMDK, QCOW2, raw) as EntireDisk and Partition1..N files.",
    )
    parser.add_argument("image", help="the disk image (the leaf of a snapshot chain)")
    parser.add_argument("mountpoint", help="an existing empty directory")
    parser.add_argument("-r", "--readonly", action="store_true", help="read-only: writes fail with EROFS")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("--format", default=None, help="the image format (detected when omitted)")
    parser.add_argument(
        "--parents",
        default="any",
        metavar="any|same-dir|none|FOLDER",
        help="where the image's parents, backing files and extents may be (default: any, as qemu;"
        " same-dir or none for an image you did not make)",
    )
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    return _run_server(
        args.image,
        args.mountpoint,
        readonly=args.readonly,
        foreground=args.foreground,
        image_format=args.format,
        ready_fd=args.ready_fd,
        lifeline_fd=args.lifeline_fd,
        parents=args.parents if args.parents in PARENT_POLICIES else Path(args.parents),
    )


def _run_server(
    image: str,
    mountpoint: str,
    *,
    readonly: bool,
    foreground: bool,
    image_format: str | None,
    ready_fd: int | None,
    lifeline_fd: int | None = None,
    parents: ParentPolicy = "any",
) -> int:
    """Serve the view until unmounted; report readiness (or the error) on ``ready_fd``."""

    def report(payload: bytes) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, payload)
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        check_fuse_available()
        if not os.path.isdir(mountpoint):
            raise NotADirectoryError(errno.ENOTDIR, "the mount point must be a directory", mountpoint)
        _serve(
            image,
            mountpoint,
            readonly=readonly,
            foreground=foreground,
            image_format=image_format,
            on_ready=lambda: report(READY),
            lifeline_fd=lifeline_fd,
            parents=parents,
        )
    except (DiskHandlerError, OSError) as exc:
        import json  # noqa: PLC0415  (lazy: only errors travel as JSON)

        report(json.dumps(_describe_error(exc)).encode())
        print(f"pyti-vdfuse: {exc}", file=sys.stderr)
        return 1
    return 0


# -- the Python twin ------------------------------------------------------------------------------


class VDFuseMount:
    """A live vdfuse mount served by a child process; unmount (or leave the ``with`` block) to stop it.

    Attributes:
        image: the disk image.
        mountpoint: where ``EntireDisk`` and ``PartitionN`` are.
        readonly: whether writes are refused.
        process: the child serving the mount.
        lifeline: the pipe whose end-of-file tells the child this process is gone (see
            :mod:`diskhandler._fusechild`); filesystem drivers mounted on the view are guarded through it.
    """

    def __init__(
        self, image: Path, mountpoint: Path, readonly: bool, process: ChildProcess, lifeline: Lifeline
    ) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.readonly = readonly
        self.process = process
        self.lifeline = lifeline

    @property
    def files(self) -> list[str]:
        """The names the view shows (``EntireDisk``, ``Partition1``, ...)."""
        return sorted(os.listdir(self.mountpoint))

    def unmount(self, timeout: float = 60.0) -> None:
        """Unmount: the child flushes and closes the image, then exits. A no-op when already done.

        Files of the view must be closed first (a filesystem driver on top must be unmounted first).
        """
        try:
            stop_child(self.process, self.mountpoint, timeout=timeout, what="vdfuse")
        finally:
            self.lifeline.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()

    def __repr__(self) -> str:
        state = "live" if self.process.poll() is None else "stopped"
        return f"<VDFuseMount {str(self.image)!r} at {str(self.mountpoint)!r} {state}>"


def mount_vdfuse(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    readonly: bool = False,
    format: str | None = None,
    timeout: float = 60.0,
    spawn: bool | None = None,
    parents: ParentPolicy = "any",
) -> VDFuseMount:
    """Mount the vdfuse view of ``image`` at ``mountpoint`` and return once it is live.

    The view is served by a child process: libfuse's loop blocks and installs signal handlers, so it
    never runs in the caller's process. A single-threaded caller forks (the child starts in
    milliseconds, with the modules already imported); a multi-threaded one, or ``spawn=True``, starts
    ``python -m diskhandler.vdfuse`` instead (about 0.2 s more), since forking a threaded process is
    unsafe. The child runs in its own session (a Ctrl-C meant for the caller does not unmount it).
    Errors the child meets before mounting (a damaged image, an image in use, no ``/dev/fuse``) are
    raised here with their diskhandler type.

    Raises:
        MissingDependencyError: no ``/dev/fuse``, or neither libfuse3 nor libfuse2.
        ImageInUseError: a writable view of an image a VM or another writer holds.
        ImageFormatError, PartitionTableError: the image or its partition table is damaged.
        FilesystemError: the mount failed or did not come up within ``timeout`` seconds.
    """
    check_fuse_available()
    img = Path(image)
    mp = Path(mountpoint)
    if not img.exists():
        raise FileNotFoundError(errno.ENOENT, "no such disk image", str(img))
    if not mp.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the mount point must be an existing directory", str(mp))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    lifeline = Lifeline()
    process: ChildProcess
    try:
        try:
            if spawn is None:
                spawn = threading.active_count() > 1
            if spawn:
                process = _spawn(
                    img, mp, readonly, format, write_end, lifeline=lifeline.read_fd, parents=parents
                )
            else:
                process = _fork(
                    img, mp, readonly, format, write_end, lifeline=lifeline.read_fd, parents=parents
                )
        finally:
            os.close(write_end)
            lifeline.child_started()
        try:
            message = wait_ready(read_end, process, timeout, "vdfuse")
        finally:
            os.close(read_end)
    except BaseException:
        lifeline.close()
        raise
    if message == READY:
        return VDFuseMount(img, mp, readonly, process, lifeline)
    lifeline.close()
    process.wait()
    if message:
        try:
            import json  # noqa: PLC0415

            info = json.loads(message)
        except ValueError:
            info = {"message": message.decode(errors="replace")}
        raise _rebuild_error(info, img)
    raise FilesystemError(
        errno.EIO, f"vdfuse exited with status {process.returncode} before the mount was live", str(mp)
    )


def _spawn(
    img: Path,
    mp: Path,
    readonly: bool,
    format: str | None,
    write_end: int,
    *,
    lifeline: int,
    parents: ParentPolicy = "any",
) -> ChildProcess:
    argv = [sys.executable, "-m", "diskhandler.vdfuse", "-f", "--ready-fd", str(write_end)]
    argv += ["--lifeline-fd", str(lifeline)]
    if readonly:
        argv.append("-r")
    if format:
        argv += ["--format", format]
    argv += ["--parents", os.fspath(parents)]
    argv += ["--", str(img), str(mp)]
    return subprocess.Popen(
        argv,
        pass_fds=(write_end, lifeline),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _fork(
    img: Path,
    mp: Path,
    readonly: bool,
    format: str | None,
    write_end: int,
    *,
    lifeline: int,
    parents: ParentPolicy = "any",
) -> ChildProcess:
    _import_binding()  # before forking, so the child need not
    return fork_child(
        lambda: _run_server(
            str(img),
            str(mp),
            readonly=readonly,
            foreground=True,
            image_format=format,
            ready_fd=write_end,
            lifeline_fd=lifeline,
            parents=parents,
        ),
        keep_fds=(write_end, lifeline),
    )


if __name__ == "__main__":
    sys.exit(main())
