"""DiskOperations: files in and out of a disk image's guest filesystem, without booting the guest.

::

    from diskhandler import DiskOperations

    with DiskOperations("disk.vdi") as d:          # mounts on entry, unmounts and flushes on exit
        d.upload("results.txt", "/root/results.txt", owner=(0, 0), mode=0o644)
        d.download("/var/log", "guest-logs")       # directories are copied recursively

How it works: the image is shown as ``EntireDisk``/``PartitionN`` files by a vdfuse child process
(:mod:`diskhandler.vdfuse`), and the chosen partition's filesystem is mounted from its ``PartitionN``
file by a userspace driver (``fuse2fs -o fakeroot`` for ext2/3/4, ``ntfs-3g``, ``fusefat``) — the guest's
metadata is parsed in user space, never by the host kernel, and no root is needed. ``method="kernel"``
asks for a loop mount of that file instead (root only).

Guest paths are confined to the guest. A path is resolved one component at a time inside the guest's
mount, reading each symlink with ``readlink`` and never letting the host kernel follow one: ``..`` stops
at the guest's root, and an absolute symlink target is *re-rooted* into the guest (chroot semantics,
like ``openat2``'s ``RESOLVE_IN_ROOT``): ``/root/evil -> /etc/passwd`` means the guest's
``/etc/passwd``, never the host's. More than 40 symlinks in one path raise :class:`GuestPathError`.
Only regular files are read from or written to the guest (never device nodes or FIFOs), and the final
open uses ``O_NOFOLLOW``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import posixpath
import shutil
import stat
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from diskhandler import _locking
from diskhandler.errors import FilesystemError, GuestPathError
from diskhandler.filesystems import FilesystemMount, MountMethod, detect_filesystem, mount_filesystem
from diskhandler.formats import DiskImage, open_image

if TYPE_CHECKING:
    from diskhandler.vdfuse import VDFuseMount

__all__ = ["MAX_SYMLINK_HOPS", "DiskOperations", "ProgressCallback", "no_progress"]

ProgressCallback = Callable[[int, int], None]
MAX_SYMLINK_HOPS = 40
_CHUNK = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_progress(done: int, total: int) -> None:
    """The default progress callback: does nothing."""


# Mounted instances, so that an interpreter exiting with one still open unmounts it cleanly (the
# filesystem driver and the vdfuse server are child processes that would otherwise outlive it).
_MOUNTED: weakref.WeakSet[DiskOperations] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    for ops in list(_MOUNTED):
        with contextlib.suppress(Exception):
            ops.close_connection()


class DiskOperations:
    """Move files in and out of the filesystem on a disk image.

    Args:
        image: the disk image (VDI, VHD, VMDK, QCOW2 or raw; the *leaf* of a snapshot chain), or a
            VirtualBox ``.vbox`` machine file (its first disk's current image is used; see :meth:`for_vm`).
        readonly: mount read-only; works even while a VM is running on the image.
        format: the image format, detected when omitted.
        partition: the partition number to mount; by default the largest partition with a filesystem
            diskhandler can open (the whole disk for a partition-less disk).
        method: ``"fuse"`` (userspace drivers, the default) or ``"kernel"`` (a loop mount, root only).

    Nothing happens until :meth:`mount` (or entering a ``with`` block); :meth:`close_connection`
    unmounts, flushes every layer and releases the image.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        readonly: bool = False,
        format: str | None = None,
        partition: int | None = None,
        method: MountMethod = "fuse",
    ) -> None:
        path = Path(image)
        if path.suffix.lower() == ".vbox":
            path = _vbox_disk(path, 0)
        if method not in ("fuse", "kernel"):
            raise ValueError(f"unknown mount method {method!r}; expected 'fuse' or 'kernel'")
        self.image = path
        self.readonly = readonly
        self.format = format
        self.method: MountMethod = method
        self._partition_wanted = partition
        self.partition: int | None = None
        self.filesystem: str | None = None
        self._workdir: Path | None = None
        self._view: VDFuseMount | None = None
        self._fs: FilesystemMount | None = None
        self._root: str | None = None

    # -- construction from a VM ---------------------------------------------------------------------

    @classmethod
    def for_vm(cls, vm: Any, target: str | int | None = None, **kwargs: Any) -> Self:
        """Open the disk a VM uses *now*: the leaf of its snapshot chain, not a stale base.

        ``vm`` may be:

        * a path to a VirtualBox ``.vbox`` machine file (its attached disks' current images, in
          controller/port order; ``target`` is the index, default 0);
        * a libvirt domain XML string, or an object with one of ``xml_desc()``, ``XMLDesc()`` or
          ``xml()`` returning it (a ``vmanager.VirtualMachine``, a ``libvirt.virDomain``): the
          ``<disk device="disk">`` elements' ``<source file=...>``, chosen by ``target`` — a target
          device name such as ``"vda"`` or an index, default the first disk;
        * an object with a ``disks()`` method returning a mapping of target names to image paths or a
          sequence of image paths.

        Further keyword arguments go to the constructor.
        """
        return cls(_disk_of_vm(vm, target), **kwargs)

    # -- mounting -----------------------------------------------------------------------------------

    @property
    def mounted(self) -> bool:
        """Whether the guest filesystem is mounted."""
        return self._root is not None

    def mount(self, partition: int | None = None) -> None:
        """Mount the guest filesystem (a no-op when already mounted).

        Raises:
            FileNotFoundError: no such image.
            ImageInUseError: a writable mount of an image a running VM or another writer holds.
            MissingDependencyError: no ``/dev/fuse``, or the filesystem's driver is not installed.
            FilesystemError: no filesystem diskhandler can open, or the partition asked for has none.
        """
        if self._root is not None:
            return
        if partition is None:
            partition = self._partition_wanted
        if not self.image.exists():
            raise FileNotFoundError(errno.ENOENT, "no such disk image", str(self.image))
        # imported here so that ``python -m diskhandler.vdfuse`` finds it not yet imported
        from diskhandler.vdfuse import ENTIRE_DISK, check_fuse_available, mount_vdfuse  # noqa: PLC0415

        check_fuse_available()
        if not self.readonly:
            _locking.check_not_in_use(self.image)
        with open_image(self.image, format=self.format) as disk:
            number, fstype = _choose_volume(disk, partition)
        import tempfile  # noqa: PLC0415  (lazy: keeps ``import diskhandler`` fast)

        workdir = Path(tempfile.mkdtemp(prefix="diskhandler-"))
        (workdir / "view").mkdir()
        (workdir / "root").mkdir()
        try:
            self._view = mount_vdfuse(
                self.image, workdir / "view", readonly=self.readonly, format=self.format
            )
            device = workdir / "view" / (f"Partition{number}" if number else ENTIRE_DISK)
            self._fs = mount_filesystem(
                device,
                workdir / "root",
                fstype,
                readonly=self.readonly,
                method=self.method,
                guard=self._view.lifeline,  # the vdfuse server stops the driver if this process dies
            )
        except BaseException:
            self._workdir = workdir
            self._teardown()
            raise
        self._workdir = workdir
        self.partition = number
        self.filesystem = fstype
        self._root = os.fspath(workdir / "root")
        _MOUNTED.add(self)

    def close_connection(self) -> None:
        """Unmount the guest filesystem and the image view, flushing everything; a no-op when closed."""
        self._teardown()

    close = close_connection

    def _teardown(self) -> None:
        self._root = None
        _MOUNTED.discard(self)
        errors: list[BaseException] = []
        for step in (self._fs, self._view):
            if step is None:
                continue
            try:
                step.unmount()
            except Exception as exc:  # keep going: the image must be released
                errors.append(exc)
        self._fs = None
        self._view = None
        if self._workdir is not None:
            for sub in ("root", "view", ""):
                with contextlib.suppress(OSError):  # left in place when something is still mounted there
                    (self._workdir / sub).rmdir()
            self._workdir = None
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.mount()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_connection()

    def __repr__(self) -> str:
        state = f"mounted partition {self.partition or '-'} ({self.filesystem})" if self.mounted else "closed"
        return f"<DiskOperations {str(self.image)!r} {state}>"

    # -- guest paths --------------------------------------------------------------------------------

    def _mount_root(self) -> str:
        if self._root is None:
            raise FilesystemError(errno.ENOTCONN, "not mounted: call mount() first", str(self.image))
        return self._root

    def _resolve(self, guest_path: str | os.PathLike[str], *, follow_last: bool = True) -> str:
        """The host path of ``guest_path`` inside the mounted guest; no component is a symlink.

        The last component may not exist (it is to be created); every earlier one must be a directory.
        With ``follow_last=False`` a final symlink is returned itself (to remove it, or stat it).
        """
        root = self._mount_root()
        text = os.fspath(guest_path)
        if not isinstance(text, str):
            raise TypeError(f"guest paths are str, got {type(text).__name__}")
        if "\0" in text:
            raise ValueError(f"guest path {text!r} contains a NUL byte")
        pending = [c for c in reversed(text.split("/")) if c not in ("", ".")]
        resolved: list[str] = []
        hops = 0
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            last = not pending
            candidate = os.path.join(root, *resolved, name)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                if last:
                    resolved.append(name)
                    break
                raise FileNotFoundError(
                    errno.ENOENT, "no such directory in the guest", "/" + "/".join([*resolved, name])
                ) from None
            if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise GuestPathError(
                        errno.ELOOP,
                        f"more than {MAX_SYMLINK_HOPS} symlinks while resolving the guest path",
                        text,
                    )
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []  # re-rooted into the guest, never the host's root
                pending.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory in the guest", text)
            resolved.append(name)
        host = os.path.join(root, *resolved)
        if os.path.commonpath([root, host]) != root:  # cannot happen; a last line of defence
            raise GuestPathError(errno.EPERM, "guest path leaves the guest's root", text)
        return host

    def _guest_name(self, host: str) -> str:
        return "/" + os.path.relpath(host, self._mount_root()).replace(os.sep, "/").lstrip(".")

    # -- queries ------------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest (a dangling symlink does not)."""
        try:
            os.lstat(self._resolve(path))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def stat(self, path: str, *, follow_symlinks: bool = True) -> os.stat_result:
        """``os.stat`` of a guest path (``lstat`` with ``follow_symlinks=False``)."""
        host = self._resolve(path, follow_last=follow_symlinks)
        try:
            return os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", path) from None

    def listdir(self, path: str = "/") -> list[str]:
        """The names in a guest directory, sorted."""
        host = self._resolve(path)
        try:
            return sorted(os.listdir(host))
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such directory in the guest", path) from None

    # -- changes ------------------------------------------------------------------------------------

    def mkdir(
        self,
        path: str,
        *,
        parents: bool = False,
        exist_ok: bool = False,
        mode: int = 0o755,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """Create a guest directory (and its missing parents with ``parents=True``)."""
        self._check_writable()
        if parents:
            parts = [p for p in path.split("/") if p]
            current = "/"
            for i, part in enumerate(parts):
                current = posixpath.join(current, part)
                self._mkdir_one(current, mode, owner, exist_ok=exist_ok or i < len(parts) - 1)
        else:
            self._mkdir_one(path, mode, owner, exist_ok=exist_ok)

    def _mkdir_one(self, path: str, mode: int, owner: tuple[int, int] | None, *, exist_ok: bool) -> None:
        host = self._resolve(path)
        try:
            os.mkdir(host, mode)
        except FileExistsError:
            if exist_ok and stat.S_ISDIR(os.lstat(host).st_mode):
                return
            raise FileExistsError(errno.EEXIST, "already exists in the guest", path) from None
        except OSError as exc:
            raise _guest_error(exc, path) from exc
        if not self._has_permissions:
            return
        os.chmod(host, mode, follow_symlinks=False)
        if owner is not None:
            os.chown(host, owner[0], owner[1], follow_symlinks=False)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a guest file, symlink (not its target) or empty directory; trees with ``recursive=True``."""
        self._check_writable()
        host = self._resolve(path, follow_last=False)
        if host == self._mount_root():
            raise GuestPathError(errno.EPERM, "refusing to remove the guest filesystem's root", path)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", path) from None
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                shutil.rmtree(host)
            else:
                os.rmdir(host)
        else:
            os.unlink(host)

    @property
    def _has_permissions(self) -> bool:
        return self.filesystem != "vfat"  # FAT keeps no owners or modes: both are ignored there

    def _check_writable(self) -> None:
        self._mount_root()
        if self.readonly:
            raise FilesystemError(errno.EROFS, "mounted read-only", str(self.image))

    # -- the two transfer primitives ----------------------------------------------------------------

    def put_file(
        self,
        src: str | os.PathLike[str],
        dst: str,
        *,
        owner: tuple[int, int] | None = None,
        mode: int | None = None,
        callback: ProgressCallback = no_progress,
    ) -> None:
        """Copy one host file to the guest path ``dst`` (into it, when ``dst`` is a guest directory).

        ``mode`` defaults to the host file's permission bits; ``owner`` is a ``(uid, gid)`` pair (FAT
        keeps neither; both are ignored there).
        When the guest filesystem fills up, the partial file is removed and
        :class:`FilesystemError` (``ENOSPC``) is raised; a file being overwritten is truncated first,
        so after a failed overwrite it is gone too (never half-written).
        """
        self._check_writable()
        src_path = Path(src)
        host = self._resolve(dst)
        if os.path.isdir(host) and not os.path.islink(host):
            host = self._resolve(posixpath.join(dst, src_path.name))
        with src_path.open("rb") as fin:
            st_src = os.fstat(fin.fileno())
            if not stat.S_ISREG(st_src.st_mode):
                raise FilesystemError(errno.EINVAL, "only regular files can be uploaded", str(src_path))
            if mode is None:
                mode = stat.S_IMODE(st_src.st_mode)
            total = st_src.st_size
            existed = os.path.lexists(host)
            if existed and not stat.S_ISREG(os.lstat(host).st_mode):
                raise FilesystemError(errno.EEXIST, "exists in the guest and is not a regular file", dst)
            try:
                fd = os.open(
                    host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise _guest_error(exc, dst) from exc
            try:
                _copy_fd(fin.fileno(), fd, total, callback)
                if self._has_permissions:
                    os.fchmod(fd, mode)
                    if owner is not None:
                        os.fchown(fd, owner[0], owner[1])
            except OSError as exc:
                os.close(fd)
                fd = -1
                with contextlib.suppress(OSError):
                    os.unlink(host)
                raise _guest_error(exc, dst) from exc
            finally:
                if fd >= 0:
                    os.close(fd)

    def get_file(
        self, src: str, dst: str | os.PathLike[str], *, callback: ProgressCallback = no_progress
    ) -> None:
        """Copy one regular guest file to the host path ``dst`` (into it, when ``dst`` is a directory)."""
        host = self._resolve(src)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", src) from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise FilesystemError(errno.EISDIR if kind == "a directory" else errno.EINVAL, f"{kind}", src)
        out = Path(dst)
        if out.is_dir():
            out = out / posixpath.basename(host)
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FilesystemError(errno.EINVAL, "not a regular file", src)
            with out.open("wb") as fout:
                try:
                    _copy_fd(fd, fout.fileno(), st.st_size, callback)
                except BaseException:
                    fout.close()
                    out.unlink(missing_ok=True)
                    raise
        finally:
            os.close(fd)

    # -- trees --------------------------------------------------------------------------------------

    def upload(
        self,
        src: str | os.PathLike[str],
        dst: str,
        *,
        owner: tuple[int, int] | None = None,
        mode: int | None = None,
        callback: ProgressCallback = no_progress,
    ) -> None:
        """Copy a host file or directory tree to the guest.

        A directory becomes ``dst`` (created with its parents); inside it, sub-directories, regular
        files and symlinks (their text copied, not followed) are copied. ``owner`` applies to
        everything created; ``mode`` to files only (directories keep their host permissions).
        ``callback(bytes_done, bytes_total)`` sees the whole transfer.
        """
        src_path = Path(src)
        if not src_path.is_dir():
            self.put_file(src_path, dst, owner=owner, mode=mode, callback=callback)
            return
        self._check_writable()
        entries = list(_walk_host(src_path))
        total = sum(size for _rel, kind, size in entries if kind == "file")
        progress = _Progress(callback, total)
        self.mkdir(dst, parents=True, exist_ok=True, mode=stat.S_IMODE(src_path.stat().st_mode), owner=owner)
        for rel, kind, _size in entries:
            host_src = src_path / rel
            guest = posixpath.join(dst, rel.as_posix())
            if kind == "dir":
                dir_mode = stat.S_IMODE(host_src.lstat().st_mode)
                self.mkdir(guest, exist_ok=True, mode=dir_mode, owner=owner)
            elif kind == "link" and self._has_permissions:  # FAT has no symlinks
                target_host = self._resolve(guest, follow_last=False)
                if os.path.lexists(target_host):
                    os.unlink(target_host)
                os.symlink(os.readlink(host_src), target_host)
                if owner is not None:
                    os.chown(target_host, owner[0], owner[1], follow_symlinks=False)
            elif kind == "file":
                self.put_file(host_src, guest, owner=owner, mode=mode, callback=progress.child())

    def download(
        self, src: str, dst: str | os.PathLike[str], *, callback: ProgressCallback = no_progress
    ) -> None:
        """Copy a guest file or directory tree to the host.

        For a directory, ``dst`` is created and filled with its regular files and sub-directories.
        Symlinks inside the tree are recreated only when relative and pointing inside the copied tree;
        others, and device nodes, FIFOs and sockets, are skipped, so the copy never refers to a host file.
        """
        host = self._resolve(src)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", src) from None
        if not stat.S_ISDIR(st.st_mode):
            self.get_file(src, dst, callback=callback)
            return
        out = Path(dst)
        entries = list(_walk_host(Path(host)))
        total = sum(size for _rel, kind, size in entries if kind == "file")
        progress = _Progress(callback, total)
        out.mkdir(parents=True, exist_ok=True)
        for rel, kind, _size in entries:
            guest = posixpath.join(src, rel.as_posix())
            target = out / rel
            if kind == "dir":
                target.mkdir(exist_ok=True)
            elif kind == "link":
                link = os.readlink(os.path.join(host, rel))
                inside = posixpath.normpath(posixpath.join(posixpath.dirname(rel.as_posix()), link))
                if not link.startswith("/") and inside != ".." and not inside.startswith("../"):
                    if target.is_symlink():
                        target.unlink()
                    os.symlink(link, target)
            elif kind == "file":
                self.get_file(guest, target, callback=progress.child())


# -- helpers --------------------------------------------------------------------------------------


class _Progress:
    """Turns per-file progress into whole-transfer progress."""

    def __init__(self, callback: ProgressCallback, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def child(self) -> ProgressCallback:
        base = self.done

        def report(done: int, _total: int) -> None:
            self.done = base + done
            self.callback(self.done, self.total)

        return report


def _walk_host(top: Path) -> Iterable[tuple[Path, str, int]]:
    """(relative path, "dir" | "file" | "link" | "other", size) for everything under ``top``, parents first.

    Symlinks are reported, never followed.
    """
    stack = [Path()]
    while stack:
        rel = stack.pop()
        with os.scandir(top / rel) as it:
            items = sorted(it, key=lambda e: e.name)
        for entry in items:
            sub = rel / entry.name
            if entry.is_symlink():
                yield sub, "link", 0
            elif entry.is_dir(follow_symlinks=False):
                yield sub, "dir", 0
                stack.append(sub)
            elif entry.is_file(follow_symlinks=False):
                yield sub, "file", entry.stat(follow_symlinks=False).st_size
            else:
                yield sub, "other", 0


def _copy_fd(src: int, dst: int, total: int, callback: ProgressCallback) -> None:
    done = 0
    callback(0, total)
    while True:
        chunk = os.read(src, _CHUNK)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            n = os.write(dst, view)
            view = view[n:]
        done += len(chunk)
        callback(done, max(total, done))


def _guest_error(exc: OSError, path: str) -> OSError:
    if exc.errno in _NO_SPACE:
        return FilesystemError(
            errno.ENOSPC, "the guest filesystem is full (the partial file was removed)", path
        )
    if exc.errno == errno.EROFS:
        return FilesystemError(errno.EROFS, "the guest filesystem is read-only", path)
    return type(exc)(exc.errno, exc.strerror, path)


def _choose_volume(disk: DiskImage, wanted: int | None) -> tuple[int | None, str]:
    """(partition number or None for the whole disk, filesystem type) to mount."""
    from diskhandler.partitions import list_partitions  # noqa: PLC0415

    partitions = list_partitions(disk)
    try:
        if wanted is not None:
            for part in partitions:
                if part.number == wanted:
                    fstype = detect_filesystem(part)
                    if fstype is None:
                        raise FilesystemError(
                            errno.ENODEV,
                            f"partition {wanted} holds no filesystem diskhandler can open "
                            "(ext2/3/4, NTFS or FAT)",
                            str(disk.path),
                        )
                    return wanted, fstype
            numbers = ", ".join(str(p.number) for p in partitions) or "none"
            raise FilesystemError(
                errno.ENOENT, f"no partition {wanted} on this disk (partitions: {numbers})", str(disk.path)
            )
        best: tuple[int, int | None, str] | None = None
        for part in partitions:
            fstype = detect_filesystem(part)
            if fstype is not None and (best is None or part.size > best[0]):
                best = (part.size, part.number, fstype)
        if best is None and not partitions:
            fstype = detect_filesystem(disk)
            if fstype is not None:
                best = (disk.size, None, fstype)
        if best is None:
            seen = f"{len(partitions)} partition(s)" if partitions else "no partition table"
            raise FilesystemError(
                errno.ENODEV,
                f"no filesystem diskhandler can open (ext2/3/4, NTFS, FAT) on this disk ({seen})",
                str(disk.path),
            )
        return best[1], best[2]
    finally:
        for part in partitions:
            part.close()


def _vbox_disk(vbox: Path, index: int) -> Path:
    from diskhandler.formats._vbox import current_disks  # noqa: PLC0415

    disks = current_disks(vbox)
    if not disks:
        raise FileNotFoundError(errno.ENOENT, "the machine has no hard disk attached", str(vbox))
    if not 0 <= index < len(disks):
        raise IndexError(f"{vbox} has {len(disks)} hard disk(s); there is no disk {index}")
    return disks[index]


def _disk_of_vm(vm: Any, target: str | int | None) -> Path:
    if isinstance(vm, os.PathLike) or (isinstance(vm, str) and not vm.lstrip().startswith("<")):
        path = Path(vm)
        if path.suffix.lower() == ".vbox":
            return _vbox_disk(path, int(target or 0))
        raise ValueError(f"{path} is not a .vbox machine file; pass the image path to DiskOperations()")
    disks = getattr(vm, "disks", None)
    if callable(disks):
        listed = disks()
        if isinstance(listed, Mapping):
            return _pick({str(k): Path(v) for k, v in listed.items()}, target, "disks()")
        paths = [Path(p) for p in listed]
        return _pick({str(i): p for i, p in enumerate(paths)}, target, "disks()")
    xml_text: str | None = vm if isinstance(vm, str) else None
    for name in ("xml_desc", "XMLDesc", "xml"):
        method = getattr(vm, name, None)
        if xml_text is None and callable(method):
            xml_text = str(method())
    if xml_text is None:
        raise TypeError(
            "for_vm needs a .vbox path, a domain XML string, or an object with xml_desc(), XMLDesc(), "
            f"xml() or disks(); got {type(vm).__name__}"
        )
    import xml.etree.ElementTree as ET  # noqa: PLC0415  (lazy: only for_vm parses XML)

    try:
        domain = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ValueError(f"the VM's domain XML does not parse: {exc}") from exc
    mapping: dict[str, Path] = {}
    for disk in domain.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        source = disk.find("source")
        dev = disk.find("target")
        file = source.get("file") if source is not None else None
        if file is None:
            continue
        dev_name = dev.get("dev") if dev is not None else None
        mapping[dev_name or str(len(mapping))] = Path(file)
    return _pick(mapping, target, "the domain XML")


def _pick(mapping: dict[str, Path], target: str | int | None, where: str) -> Path:
    if not mapping:
        raise FileNotFoundError(errno.ENOENT, f"no file-backed hard disk in {where}")
    if target is None:
        return next(iter(mapping.values()))
    if isinstance(target, int):
        values = list(mapping.values())
        if not 0 <= target < len(values):
            raise IndexError(f"{where} lists {len(values)} disk(s); there is no disk {target}")
        return values[target]
    if target not in mapping:
        raise KeyError(f"no disk with target {target!r} in {where} (targets: {', '.join(mapping)})")
    return mapping[target]
