"""How a partition's files are reached: userspace filesystem drivers, a kernel mount only on request.

The guest's filesystem is untrusted data. By default it is parsed in user space by a FUSE driver that
runs as a child process — ``fuse2fs -o fakeroot`` for ext2/3/4, ``ntfs-3g`` for NTFS, ``fusefat`` for
FAT — never by the host kernel, and no root privileges are needed. ``method="kernel"`` loop-mounts the
partition instead (root only; faster, but the host kernel then parses the guest's metadata).

The filesystem type is told from the superblock magic, read through diskhandler (no ``blkid``):

* ext2/3/4: ``0xEF53`` (little-endian) at byte 1080;
* NTFS: ``"NTFS    "`` at byte 3;
* FAT12/16/32: ``"FAT"`` at byte 54 (FAT12/16) or 82 (FAT32) and the boot signature ``55 AA`` at 510.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from diskhandler._fusechild import Lifeline, is_mountpoint, spawn_watcher, stop_child, wait_mounted
from diskhandler.errors import FilesystemError, MissingDependencyError
from diskhandler.formats import DiskImage

__all__ = [
    "FILESYSTEM_TYPES",
    "FilesystemMount",
    "detect_filesystem",
    "detect_filesystem_bytes",
    "is_mountpoint",
    "mount_filesystem",
]

FILESYSTEM_TYPES = ("ext", "ntfs", "vfat")
MountMethod = Literal["fuse", "kernel"]

_EXT_MAGIC_OFFSET = 1080
_EXT_MAGIC = b"\x53\xef"
_PROBE_SIZE = 4096

# (driver program, Debian package) per filesystem type.
_DRIVERS: dict[str, tuple[str, str]] = {
    "ext": ("fuse2fs", "fuse2fs"),
    "ntfs": ("ntfs-3g", "ntfs-3g"),
    "vfat": ("fusefat", "fusefat"),
}
_KERNEL_TYPES = {"ext": "ext4", "ntfs": "ntfs3", "vfat": "vfat"}


def detect_filesystem_bytes(head: bytes) -> str | None:
    """The filesystem type (``"ext"``, ``"ntfs"``, ``"vfat"``) whose superblock starts ``head``, or None.

    ``head`` is the first 4 KiB of a partition (fewer bytes simply match less).
    """
    if head[_EXT_MAGIC_OFFSET : _EXT_MAGIC_OFFSET + 2] == _EXT_MAGIC:
        return "ext"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[510:512] == b"\x55\xaa" and (head[54:57] == b"FAT" or head[82:85] == b"FAT"):
        return "vfat"
    return None


def detect_filesystem(volume: DiskImage) -> str | None:
    """The filesystem type on ``volume`` (a disk or a partition view), or ``None`` when unknown."""
    return detect_filesystem_bytes(volume.read_at(0, _PROBE_SIZE))


_EXT_INCOMPAT_OFFSET = 1024 + 0x60  # s_feature_incompat in the superblock
_EXT_INCOMPAT_RECOVER = 0x0004  # needs_recovery: the journal holds transactions not yet written


def _ext_needs_recovery(device: Path) -> bool:
    """Whether the ext filesystem in ``device`` has a journal that must be replayed before use."""
    with device.open("rb") as f:
        f.seek(_EXT_INCOMPAT_OFFSET)
        raw = f.read(4)
    return len(raw) == 4 and bool(int.from_bytes(raw, "little") & _EXT_INCOMPAT_RECOVER)


def _require(program: str, package: str, what: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise MissingDependencyError(
            f"{what} needs the program {program}; "
            f"install the Debian package {package} (apt-get install {package})"
        )
    return found


class FilesystemMount:
    """A guest filesystem mounted at ``mountpoint``; :meth:`unmount` flushes it and stops the driver.

    Attributes:
        device: the file holding the filesystem (a ``PartitionN`` file of a vdfuse view).
        mountpoint: where the guest's files are.
        fstype: ``"ext"``, ``"ntfs"`` or ``"vfat"``.
        method: ``"fuse"`` (a userspace driver process) or ``"kernel"`` (a loop mount).
        readonly: whether it was mounted read-only.
    """

    def __init__(
        self,
        device: Path,
        *,
        mountpoint: Path,
        fstype: str,
        method: MountMethod,
        readonly: bool,
        process: subprocess.Popen[bytes] | None,
        log: Path | None,
        guard: Lifeline | None = None,
        watcher: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.device = device
        self.mountpoint = mountpoint
        self.fstype = fstype
        self.method = method
        self.readonly = readonly
        self.process = process
        self._log = log
        self._guard = guard
        self._watcher = watcher

    @property
    def pid(self) -> int | None:
        """The driver process's PID (``None`` for a kernel mount)."""
        return self.process.pid if self.process is not None else None

    def unmount(self, timeout: float = 120.0) -> None:
        """Flush the filesystem and unmount it; for a FUSE driver, wait until the driver has exited."""
        try:
            if self.method == "kernel":
                if is_mountpoint(self.mountpoint):
                    proc = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, check=False)
                    if proc.returncode != 0:
                        raise FilesystemError(
                            errno.EBUSY,
                            f"umount failed: {proc.stderr.decode(errors='replace').strip()}",
                            str(self.mountpoint),
                        )
                return
            assert self.process is not None
            # libfuse's SIGTERM handler leaves the loop, unmounts and runs the driver's destroy
            # callback (fuse2fs closes the filesystem there: journal, bitmaps, superblock).
            stop_child(self.process, self.mountpoint, timeout=timeout, what=f"the {self.fstype} driver")
            if self.process.returncode not in (0, -signal.SIGTERM):
                raise FilesystemError(
                    errno.EIO,
                    f"the {self.fstype} driver exited with status {self.process.returncode}: "
                    f"{self._stderr()}",
                    str(self.mountpoint),
                )
        finally:
            if self._log is not None:
                self._log.unlink(missing_ok=True)
            self._unguard()

    def _unguard(self) -> None:
        """Stopped the normal way: the watcher forgets this mount (its own watcher exits)."""
        if self._guard is None:
            return
        if not is_mountpoint(self.mountpoint):
            self._guard.release(self.pid, self.mountpoint)
        if self._watcher is not None:
            self._guard.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watcher.wait(10.0)
        self._guard = None

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        try:
            return self._log.read_text(errors="replace").strip()
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()

    def __repr__(self) -> str:
        where = f"{str(self.device)!r} at {str(self.mountpoint)!r}"
        return f"<FilesystemMount {self.fstype} {where} ({self.method})>"


def _driver_argv(fstype: str, device: Path, mountpoint: Path, readonly: bool) -> list[str]:
    program, package = _DRIVERS[fstype]
    exe = _require(program, package, f"reading an {fstype} filesystem")
    if fstype == "ext":
        opts = ["fakeroot", "nosuid", "nodev", "big_writes", "max_write=131072"]
        opts.append("ro" if readonly else "rw")
        return [exe, str(device), str(mountpoint), "-f", "-o", ",".join(opts)]
    if fstype == "ntfs":
        opts = ["no_detach", "nosuid", "nodev", "ro" if readonly else "rw"]
        return [exe, str(device), str(mountpoint), "-o", ",".join(opts)]
    opts = ["nosuid", "nodev"] + ([] if readonly else ["rw+"])
    return [exe, "-f", "-o", ",".join(opts), str(device), str(mountpoint)]


def mount_filesystem(
    device: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    fstype: str,
    *,
    readonly: bool = False,
    method: MountMethod = "fuse",
    timeout: float = 60.0,
    guard: Lifeline | None = None,
) -> FilesystemMount:
    """Mount the ``fstype`` filesystem in the file ``device`` at ``mountpoint`` and return once live.

    The mount never outlives this process: if it dies without unmounting (killed, crashed), the
    driver is stopped the clean way (flush, unmount) within seconds. ``guard`` is the lifeline of the
    process serving ``device`` (a vdfuse view's :attr:`~diskhandler.vdfuse.VDFuseMount.lifeline`),
    which then watches the driver, stopping it before itself; without one a small watcher process is
    started for this mount (see :mod:`diskhandler._fusechild`).

    Raises:
        MissingDependencyError: the driver is not installed (the message names the Debian package).
        FilesystemError: the driver refused the filesystem or did not come up in time.
        ValueError: an unknown ``fstype`` or ``method``.
    """
    dev = Path(device)
    mp = Path(mountpoint)
    if fstype not in _DRIVERS:
        raise ValueError(f"unknown filesystem type {fstype!r}; expected one of {', '.join(FILESYSTEM_TYPES)}")
    if method == "kernel":
        fs = _kernel_mount(dev, mp, fstype, readonly)
        if guard is not None:
            guard.guard(None, mp)
            fs._guard = guard
        return fs
    if method != "fuse":
        raise ValueError(f"unknown mount method {method!r}; expected 'fuse' or 'kernel'")
    if fstype == "ext" and _ext_needs_recovery(dev):
        raise FilesystemError(
            errno.EUCLEAN,
            "the ext3/4 journal needs recovery (the guest was not shut down cleanly), and fuse2fs cannot "
            "replay it: run `e2fsck -fy` on the partition, boot the guest once and shut it down cleanly, "
            "or mount with method='kernel' (root needed)",
            str(dev),
        )
    argv = _driver_argv(fstype, dev, mp, readonly)
    import tempfile  # noqa: PLC0415  (lazy: keeps ``import diskhandler`` fast)

    log_fd, log_name = tempfile.mkstemp(prefix="diskhandler-fs-", suffix=".log")
    log = Path(log_name)
    watcher = None
    if guard is None:
        guard = Lifeline()
        watcher = spawn_watcher(guard)
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_fd)
    except BaseException:
        log.unlink(missing_ok=True)
        if watcher is not None:
            guard.close()
            watcher.wait()
        raise
    finally:
        os.close(log_fd)
    guard.guard(process.pid, mp)  # before the mount is live: a death while it comes up is covered too
    fs = FilesystemMount(
        device=dev,
        mountpoint=mp,
        fstype=fstype,
        method="fuse",
        readonly=readonly,
        process=process,
        log=log,
        guard=guard,
        watcher=watcher,
    )

    def failed() -> str:
        message = fs._stderr() or f"exit status {process.returncode}"
        log.unlink(missing_ok=True)
        return f"{Path(argv[0]).name} could not mount the {fstype} filesystem: {message}"

    try:
        wait_mounted(mp, process, timeout, failed)
    finally:
        if process.poll() is not None:
            log.unlink(missing_ok=True)
            fs._unguard()
    return fs


def _kernel_mount(dev: Path, mp: Path, fstype: str, readonly: bool) -> FilesystemMount:
    _require("mount", "mount", "a kernel mount")
    opts = ["loop", "nosuid", "nodev", "noexec", "ro" if readonly else "rw"]
    proc = subprocess.run(
        ["mount", "-t", _KERNEL_TYPES[fstype], "-o", ",".join(opts), str(dev), str(mp)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise FilesystemError(
            errno.EIO,
            f"kernel mount of the {fstype} filesystem failed (it needs root): "
            f"{proc.stderr.decode(errors='replace').strip()}",
            str(dev),
        )
    return FilesystemMount(
        device=dev, mountpoint=mp, fstype=fstype, method="kernel", readonly=readonly, process=None, log=None
    )
