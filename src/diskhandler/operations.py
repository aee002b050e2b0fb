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
import html
import os
import posixpath
import re
import shutil
import stat
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from diskhandler import _locking
from diskhandler.errors import FilesystemError, GuestLinkWarning, GuestPathError, ImageWarning
from diskhandler.filesystems import FilesystemMount, MountMethod, detect_filesystem, mount_filesystem
from diskhandler.formats import DiskImage, ParentPolicy, open_image

if TYPE_CHECKING:
    from diskhandler.vdfuse import VDFuseMount

__all__ = ["MAX_SYMLINK_HOPS", "MAX_WALK_DEPTH", "DiskOperations", "ProgressCallback", "no_progress"]

ProgressCallback = Callable[[int, int], None]
MAX_SYMLINK_HOPS = 40
MAX_WALK_DEPTH = 128
"""Folders more than this many levels below where a walk (``walk``, ``find``, ``glob``, ``download``)
starts are not entered: a crafted filesystem can nest 2000 (PATH_MAX allows it), past Python's
recursion limit and into paths the kernel looks up slower at every level."""
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
        partition: the partition number to mount, or an LVM logical volume as ``"VG/LV"``; by default
            the largest partition or logical volume with a filesystem diskhandler can open (the whole
            disk for a disk without either).
        method: ``"fuse"`` (userspace drivers, the default) or ``"kernel"`` (a loop mount, root only).
        parents: where the image's parents, backing files and extents may be, as for
            :func:`~diskhandler.open_image`: ``"any"`` (default), ``"same-dir"``, ``"none"`` or a folder.

    Nothing happens until :meth:`mount` (or entering a ``with`` block); :meth:`close_connection`
    unmounts, flushes every layer and releases the image.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        readonly: bool = False,
        format: str | None = None,
        partition: int | str | None = None,
        method: MountMethod = "fuse",
        parents: ParentPolicy = "any",
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
        self.parents: ParentPolicy = parents
        self._partition_wanted = partition
        self.partition: int | str | None = None
        self.filesystem: str | None = None
        self._workdir: Path | None = None
        self._view: VDFuseMount | None = None
        self._fs: FilesystemMount | None = None
        self._root: str | None = None
        self._owner = os.getpid()

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

        A VM under overlays or external snapshots (``vmanager``'s overlay rollback, or snapshots of
        a VDI/VMDK/VHD/raw disk) names the top qcow2 overlay: that is the image opened, and its backing
        chain (of any format) is followed, so the files seen are the VM's current state and writes go
        to the overlay, never to the frozen disk below.

        Further keyword arguments go to the constructor.
        """
        path = _disk_of_vm(vm, target)
        if kwargs.get("format") is None:
            # The format the VM declares, never one read from the disk's bytes: a guest owns those of
            # a raw disk and could make it a qcow2 whose backing file is a host file.
            kwargs["format"] = _declared_formats(vm).get(path)
        return cls(path, **kwargs)

    # -- mounting -----------------------------------------------------------------------------------

    @property
    def mounted(self) -> bool:
        """Whether the guest filesystem is mounted."""
        return self._root is not None

    def mount(self, partition: int | str | None = None) -> None:
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
        with open_image(self.image, format=self.format, parents=self.parents) as disk:
            number, view_name, fstype = _choose_volume(disk, partition)
        import tempfile  # noqa: PLC0415  (lazy: keeps ``import diskhandler`` fast)

        workdir = Path(tempfile.mkdtemp(prefix="diskhandler-"))
        (workdir / "view").mkdir()
        (workdir / "root").mkdir()
        try:
            self._view = mount_vdfuse(
                self.image, workdir / "view", readonly=self.readonly, format=self.format, parents=self.parents
            )
            device = workdir / "view" / (view_name or ENTIRE_DISK)
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
        self._owner = os.getpid()
        _MOUNTED.add(self)

    def close_connection(self) -> None:
        """Unmount the guest filesystem and the image view, flushing everything; a no-op when closed."""
        self._teardown()

    close = close_connection

    def _teardown(self) -> None:
        self._root = None
        _MOUNTED.discard(self)
        if self._owner != os.getpid():
            # A forked copy of the owner (a finalizer or garbage collection run in the child): the
            # mount and its processes belong to the owner, which alone stops them.
            self._fs = self._view = self._workdir = None
            return
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
        except NotADirectoryError:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory in the guest", path) from None
        except OSError as exc:
            raise _unlistable(exc, path) from exc

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
                try:
                    shutil.rmtree(host)
                except RecursionError:  # shutil recurses once per level (Python < 3.13)
                    raise FilesystemError(
                        errno.ELOOP,
                        "the guest tree loops or is nested too deep to remove (a crafted filesystem?);"
                        " part of it may be gone: check the filesystem (e2fsck) and remove the rest",
                        path,
                    ) from None
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

    # -- what fsspec users expect, on guest paths ----------------------------------------------------

    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory in the guest (symlinks followed inside the guest)."""
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a regular file in the guest (symlinks followed inside the guest)."""
        try:
            return stat.S_ISREG(self.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def islink(self, path: str) -> bool:
        """Whether ``path`` itself is a symlink in the guest."""
        try:
            return stat.S_ISLNK(self.stat(path, follow_symlinks=False).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def walk(
        self, path: str = "/", *, maxdepth: int | None = None, topdown: bool = True
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        """``(directory, sub-directory names, other names)`` for ``path`` and below, like :func:`os.walk`.

        Guest paths are absolute; symlinks are listed among the other names and never followed, so
        a walk stays in the tree it started in. ``maxdepth=1`` lists ``path`` only.
        """
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        top = posixpath.normpath("/" + path.lstrip("/"))
        host = self._resolve(top)
        seen: set[tuple[int, int]] = set()
        with contextlib.suppress(OSError):
            st = os.lstat(host)
            seen.add((st.st_dev, st.st_ino))
        yield from self._walk(top, host, 1, maxdepth, topdown, seen)

    def _walk(  # noqa: PLR0917  (private, recursive)
        self,
        guest: str,
        host: str,
        depth: int,
        maxdepth: int | None,
        topdown: bool,
        seen: set[tuple[int, int]],
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        dirs: list[str] = []
        files: list[str] = []
        if depth - 1 > MAX_WALK_DEPTH:
            warnings.warn(
                ImageWarning(
                    f"{guest}: nested deeper than {MAX_WALK_DEPTH} folders below the walk's start"
                    " (a crafted filesystem?); walked past it"
                ),
                stacklevel=3,
            )
            return
        try:
            with os.scandir(host) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        # A crafted filesystem can link a directory into itself: each is walked once.
                        st = entry.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                        dirs.append(entry.name)
                    else:
                        files.append(entry.name)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such directory in the guest", guest) from None
        except NotADirectoryError:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory in the guest", guest) from None
        except OSError as exc:
            if depth == 1:
                raise _unlistable(exc, guest) from exc
            # as os.walk, a sub-directory that cannot be listed does not end the walk; it is said
            warnings.warn(ImageWarning(f"{_unlistable(exc, guest)}; walked past it"), stacklevel=3)
            return
        dirs.sort()
        files.sort()
        if topdown:
            yield guest, dirs, files
        if maxdepth is None or depth < maxdepth:
            for name in list(dirs):
                yield from self._walk(
                    posixpath.join(guest, name), os.path.join(host, name), depth + 1, maxdepth, topdown, seen
                )
        if not topdown:
            yield guest, dirs, files

    def find(self, path: str = "/", *, maxdepth: int | None = None, withdirs: bool = False) -> list[str]:
        """Every file (and directory, with ``withdirs=True``) below ``path``, as sorted guest paths.

        A file ``path`` gives ``[path]``; a missing one ``[]``.
        """
        top = posixpath.normpath("/" + path.lstrip("/"))
        if not self.exists(top):
            return []
        if not self.isdir(top):
            return [top]
        found: list[str] = [top] if withdirs and top != "/" else []
        for directory, dirs, files in self.walk(top, maxdepth=maxdepth):
            found += [posixpath.join(directory, f) for f in files]
            if withdirs:
                found += [posixpath.join(directory, d) for d in dirs]
        return sorted(found)

    def glob(self, pattern: str) -> list[str]:
        """Guest paths matching ``pattern``: ``*``, ``?``, ``[...]`` within a name, ``**`` across folders."""
        parts = [p for p in pattern.split("/") if p]
        fixed: list[str] = []
        for part in parts:
            if _has_magic(part):
                break
            fixed.append(part)
        root = "/" + "/".join(fixed)
        rest = parts[len(fixed) :]
        if not rest:
            return [root] if self.exists(root) else []
        if not self.isdir(root):
            return []
        regex = _glob_regex(parts)
        depth = None if "**" in rest else len(rest)
        return [p for p in self.find(root, maxdepth=depth, withdirs=True) if regex.fullmatch(p)]

    def open(
        self,
        path: str,
        mode: str = "rb",
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Open a regular guest file: ``"rb"``, ``"wb"``, ``"ab"``, ``"xb"`` (and their text forms).

        The path is resolved inside the guest like every other; a file opened for writing is created
        with mode 0644 when new. Device nodes, FIFOs and sockets are refused.
        """
        kind = mode.replace("b", "").replace("t", "")
        create = os.O_WRONLY | os.O_CREAT
        flags = {
            "r": os.O_RDONLY,
            "w": create | os.O_TRUNC,
            "a": create | os.O_APPEND,
            "x": create | os.O_EXCL,
        }
        if kind not in flags or ("b" in mode and "t" in mode) or len(mode) != len(set(mode)):
            raise ValueError(f"unsupported mode {mode!r}: use r, w, a or x, binary or text")
        if kind != "r":
            self._check_writable()
        host = self._resolve(path)
        if os.path.lexists(host) and not stat.S_ISREG(os.lstat(host).st_mode):
            if stat.S_ISDIR(os.lstat(host).st_mode):
                raise IsADirectoryError(errno.EISDIR, "a directory in the guest", path)
            raise FilesystemError(errno.EINVAL, "not a regular file in the guest", path)
        try:
            fd = os.open(host, flags[kind] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, "no such file in the guest", path) from None
            if isinstance(exc, FileExistsError):
                raise FileExistsError(errno.EEXIST, "already exists in the guest", path) from None
            raise _guest_error(exc, path) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped under us: never read a device
                raise FilesystemError(errno.EINVAL, "not a regular file in the guest", path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        if "b" in mode:
            return os.fdopen(fd, kind + "b")
        return os.fdopen(fd, kind, encoding=encoding or "utf-8", errors=errors, newline=newline)

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes of a guest file (``[start:end]`` when given, as in slicing)."""
        f: IO[bytes]
        with self.open(path, "rb") as f:
            if start is None and end is None:
                return f.read()
            size = os.fstat(f.fileno()).st_size
            first, last, _ = slice(start, end).indices(size)
            f.seek(first)
            return f.read(max(0, last - first))

    def write_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Replace (or create) a guest file with ``data``; ``mode`` sets its permission bits."""
        with self.open(path, "wb") as f:
            try:
                f.write(data)
                f.flush()
                if mode is not None and self._has_permissions:
                    os.fchmod(f.fileno(), mode)
            except OSError as exc:
                raise _guest_error(exc, path) from exc

    def read_text(self, path: str, encoding: str = "utf-8", errors: str | None = None) -> str:
        """The text of a guest file."""
        return self.read_bytes(path).decode(encoding, errors or "strict")

    def write_text(self, path: str, text: str, encoding: str = "utf-8", errors: str | None = None) -> None:
        """Replace (or create) a guest file with ``text``."""
        self.write_bytes(path, text.encode(encoding, errors or "strict"))

    def put(
        self,
        src: str | os.PathLike[str],
        dst: str,
        *,
        recursive: bool = False,
        owner: tuple[int, int] | None = None,
        mode: int | None = None,
        callback: ProgressCallback = no_progress,
    ) -> None:
        """fsspec's ``put``: :meth:`put_file` for a file, :meth:`upload` of a tree with ``recursive=True``."""
        if os.path.isdir(src) and not recursive:
            raise IsADirectoryError(errno.EISDIR, "a directory: pass recursive=True", os.fspath(src))
        self.upload(src, dst, owner=owner, mode=mode, callback=callback)

    def get(
        self,
        src: str,
        dst: str | os.PathLike[str],
        *,
        recursive: bool = False,
        callback: ProgressCallback = no_progress,
    ) -> None:
        """fsspec's ``get``: :meth:`get_file` for a file, :meth:`download` of a tree (``recursive=True``)."""
        if self.isdir(src) and not recursive:
            raise IsADirectoryError(errno.EISDIR, "a directory in the guest: pass recursive=True", src)
        self.download(src, dst, callback=callback)

    def rename(self, src: str, dst: str) -> None:
        """Rename a guest file, directory or symlink (the link itself); a file ``dst`` is replaced."""
        self._check_writable()
        old = self._resolve(src, follow_last=False)
        new = self._resolve(dst, follow_last=False)
        if self._mount_root() in (old, new):
            raise GuestPathError(errno.EPERM, "refusing to rename the guest filesystem's root", src)
        try:
            os.rename(old, new)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", src) from None
        except OSError as exc:
            raise _guest_error(exc, dst) from exc

    mv = rename

    def chmod(self, path: str, mode: int, *, follow_symlinks: bool = True) -> None:
        """Set the permission bits of a guest path (the link itself has none to set)."""
        self._check_writable()
        self._check_permissions(path)
        host = self._resolve(path, follow_last=follow_symlinks)
        if stat.S_ISLNK(self._lstat(host, path).st_mode):
            return  # Linux keeps no mode on a symlink
        try:
            os.chmod(host, mode, follow_symlinks=False)
        except OSError as exc:
            raise _guest_error(exc, path) from exc

    def chown(self, path: str, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """Set the owner of a guest path (``-1`` leaves one of them unchanged)."""
        self._check_writable()
        self._check_permissions(path)
        host = self._resolve(path, follow_last=follow_symlinks)
        self._lstat(host, path)
        try:
            os.chown(host, uid, gid, follow_symlinks=False)
        except OSError as exc:
            raise _guest_error(exc, path) from exc

    def symlink(self, target: str, link: str, *, owner: tuple[int, int] | None = None) -> None:
        """Create the guest symlink ``link`` -> ``target`` (guest text, resolved inside the guest)."""
        self._check_writable()
        if not self._has_permissions:
            raise FilesystemError(errno.EPERM, "FAT has no symlinks", link)
        if "\0" in target:
            raise ValueError(f"symlink target {target!r} contains a NUL byte")
        host = self._resolve(link, follow_last=False)
        try:
            os.symlink(target, host)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "already exists in the guest", link) from None
        except OSError as exc:
            raise _guest_error(exc, link) from exc
        if owner is not None:
            os.chown(host, owner[0], owner[1], follow_symlinks=False)

    def readlink(self, path: str) -> str:
        """The text of a guest symlink, as stored (never resolved on the host)."""
        host = self._resolve(path, follow_last=False)
        if not stat.S_ISLNK(self._lstat(host, path).st_mode):
            raise FilesystemError(errno.EINVAL, "not a symlink in the guest", path)
        return os.readlink(host)

    def _lstat(self, host: str, path: str) -> os.stat_result:
        try:
            return os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", path) from None

    def _check_permissions(self, path: str) -> None:
        if not self._has_permissions:
            raise FilesystemError(errno.EPERM, "FAT keeps no owners or permission bits", path)

    def _repr_html_(self) -> str:
        """A table for Jupyter: the image, the mounted filesystem and a listing of its root."""
        esc = html.escape
        rows = [("image", str(self.image))]
        if not self.mounted:
            rows.append(("state", "not mounted"))
        else:
            volume = f"partition {self.partition}" if self.partition else "whole disk"
            access = "read-only" if self.readonly else "read-write"
            rows += [("filesystem", f"{self.filesystem} on {volume} ({access}, {self.method})")]
            with contextlib.suppress(OSError):
                st = os.statvfs(self._mount_root())
                total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
                rows.append(("space", f"{_human(total - free)} used of {_human(total)}"))
        head = "".join(
            f"<tr><th style='text-align:left'>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows
        )
        out = [f"<div><b>DiskOperations</b><table>{head}</table>"]
        if self.mounted:
            out.append(self._listing_html("/", limit=50))
        out.append("</div>")
        return "".join(out)

    def _listing_html(self, path: str, *, limit: int) -> str:
        esc = html.escape
        root = self._resolve(path)
        try:
            with os.scandir(root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            return f"<p>listing failed: {esc(str(exc))}</p>"
        lines = []
        for entry in entries[:limit]:
            st = entry.stat(follow_symlinks=False)
            name = entry.name + ("/" if stat.S_ISDIR(st.st_mode) else "")
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    name += " -> " + os.readlink(entry.path)
            size = "" if stat.S_ISDIR(st.st_mode) else _human(st.st_size)
            lines.append(
                f"<tr><td><code>{stat.filemode(st.st_mode)}</code></td><td>{st.st_uid}:{st.st_gid}</td>"
                f"<td style='text-align:right'>{esc(size)}</td><td><code>{esc(name)}</code></td></tr>"
            )
        more = f"<tr><td colspan='4'>… {len(entries) - limit} more</td></tr>" if len(entries) > limit else ""
        return f"<table><caption>{esc(path)}</caption>{''.join(lines)}{more}</table>"

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
        self,
        src: str,
        dst: str | os.PathLike[str],
        *,
        callback: ProgressCallback = no_progress,
        max_bytes: int | None = None,
    ) -> None:
        """Copy one regular guest file to the host path ``dst`` (into it, when ``dst`` is a directory).

        A symbolic link ``src`` is followed inside the guest (chroot semantics). When ``dst`` is a
        directory, the file name comes from the guest: a link already there under that name is
        replaced, never written through. A file larger than ``max_bytes`` raises
        :class:`FilesystemError` (``EFBIG``) before anything is written.
        """
        host = self._resolve(src)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", src) from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise FilesystemError(errno.EISDIR if kind == "a directory" else errno.EINVAL, f"{kind}", src)
        _check_size(st.st_size, max_bytes, src)
        out = Path(dst)
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FilesystemError(errno.EINVAL, "not a regular file", src)
            if out.is_dir():
                with _HostTree(out) as tree:
                    tree.write_file(posixpath.basename(host), fd, st.st_size, callback)
                return
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
        self,
        src: str,
        dst: str | os.PathLike[str],
        *,
        callback: ProgressCallback = no_progress,
        max_bytes: int | None = None,
    ) -> None:
        """Copy a guest file or directory tree to the host.

        For a directory, ``dst`` is created and filled with its sub-directories and regular files.
        A symbolic link of the tree is recreated on the host only when it is relative and, with every
        other entry of the copy in place, leads to an existing entry without ever leaving ``dst``
        (see :doc:`security`); every other link (absolute, climbing out, dangling, looping) and every
        device node, FIFO and socket is skipped, and one :class:`GuestLinkWarning` lists what was
        skipped. Nothing is ever written through a symbolic link below ``dst``: an existing link where
        a file goes is replaced, one where a directory goes is an error. ``get_file`` reads through a
        link inside the guest instead, when its content is what you want.

        ``max_bytes`` bounds the bytes the copy may write on the host (the guest's files' sizes, sparse
        files counted in full); a larger tree raises :class:`FilesystemError` (``EFBIG``) before anything
        is written.
        """
        host = self._resolve(src)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", src) from None
        if not stat.S_ISDIR(st.st_mode):
            self.get_file(src, dst, callback=callback, max_bytes=max_bytes)
            return
        entries, skipped = _walk_guest(Path(host))
        total = sum(size for _rel, kind, size in entries if kind == "file")
        _check_size(total, max_bytes, src)
        progress = _Progress(callback, total)
        out = Path(dst)
        out.mkdir(parents=True, exist_ok=True)
        with _HostTree(out) as tree:
            links = {rel: os.readlink(os.path.join(host, rel)) for rel, kind, _ in entries if kind == "link"}
            kept, refused = tree.plan_links(entries, links)
            skipped.extend(refused)
            for rel, kind, _size in entries:
                if kind == "dir":
                    tree.mkdir(rel)
                elif kind == "file":
                    self._get_into(os.path.join(host, rel), src, rel, tree, progress.child())
                elif kind == "link" and rel in kept:
                    tree.symlink(links[rel], rel)
        if skipped:
            shown = "; ".join(f"{posixpath.join(src, rel)} ({why})" for rel, why in skipped[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            warnings.warn(
                GuestLinkWarning(
                    f"download of {src} to {out}: skipped {len(skipped)} entries the host copy must not"
                    f" hold: {shown}{more}",
                    {posixpath.join(src, rel): why for rel, why in skipped},
                ),
                stacklevel=2,
            )

    def _get_into(
        self, guest_host: str, src: str, rel: str, tree: _HostTree, callback: ProgressCallback
    ) -> None:
        """Copy the guest file at host path ``guest_host`` to ``rel`` below ``tree``, never through links."""
        fd = os.open(guest_host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FilesystemError(errno.EINVAL, "not a regular file", posixpath.join(src, rel))
            tree.write_file(rel, fd, st.st_size, callback)
        finally:
            os.close(fd)


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


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _glob_regex(parts: list[str]) -> re.Pattern[str]:
    """The regular expression of a glob over absolute guest paths (``**`` spans folders)."""
    out = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out += "/.+" if last else "(?:/[^/]+)*"
            continue
        out += "/" + _glob_part(part)
    return re.compile(out or "/")


def _glob_part(part: str) -> str:
    """One path component's pattern: ``*`` and ``?`` never cross a ``/``; ``[...]`` classes kept."""
    out = []
    i = 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := part.find("]", i + 2)) != -1:
            body = part[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _walk_guest(top: Path) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """The entries of a guest tree, parents first, as ``(relative path, kind, size)``, and the skipped.

    ``kind`` is ``"dir"``, ``"file"`` or ``"link"``; device nodes, FIFOs and sockets are skipped, and so
    is a directory seen twice (a corrupt filesystem can link a directory into itself: the walk must
    end). Symbolic links are reported, never followed.
    """
    entries: list[tuple[str, str, int]] = []
    skipped: list[tuple[str, str]] = []
    top_st = os.lstat(top)
    seen = {(top_st.st_dev, top_st.st_ino)}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(top, rel) if rel else top) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not rel:
                raise FilesystemError(
                    exc.errno or errno.EIO, f"the guest directory cannot be listed: {exc.strerror}", str(top)
                ) from exc
            # EIO: an entry the kernel refuses (a name with "/", from a crafted filesystem); ENAMETOOLONG
            skipped.append((rel, f"cannot be listed: {exc.strerror}"))
            continue
        for entry in items:
            sub = posixpath.join(rel, entry.name) if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                skipped.append((sub, f"cannot be examined: {exc.strerror}"))
                continue
            if stat.S_ISLNK(st.st_mode):
                entries.append((sub, "link", 0))
            elif stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    skipped.append((sub, "a directory already copied: the filesystem loops"))
                    continue
                if sub.count("/") + 1 > MAX_WALK_DEPTH:
                    skipped.append((sub, f"a directory nested deeper than {MAX_WALK_DEPTH} levels"))
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries.append((sub, "dir", 0))
                stack.append(sub)
            elif stat.S_ISREG(st.st_mode):
                entries.append((sub, "file", st.st_size))
            else:
                skipped.append((sub, "not a regular file, directory or link"))
    return entries, skipped


class _HostTree:
    """A download destination on the host, written only through directory descriptors.

    Every directory below the root is opened with ``O_NOFOLLOW`` relative to its parent, and every
    file and link is created relative to its directory's descriptor, so a symbolic link below the
    root — one the copy made, or one already there — is never followed while writing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_fd = -1

    def __enter__(self) -> _HostTree:
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._root_fd)

    # -- writing, never through a link ------------------------------------------------------------

    @contextlib.contextmanager
    def _parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """``(descriptor of the directory holding rel, rel's last name)``."""
        *dirs, name = rel.split("/")
        fds: list[int] = []
        fd = self._root_fd
        try:
            for i, part in enumerate(dirs):
                try:
                    fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = self.root / "/".join(dirs[: i + 1])
                        raise FilesystemError(
                            errno.ELOOP,
                            "is not a directory but a symbolic link or a file; a download never writes"
                            " through a link: remove it or choose another destination",
                            str(where),
                        ) from None
                    raise
                fds.append(fd)
            yield fd, name
        finally:
            for opened in fds:
                os.close(opened)

    def mkdir(self, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                    raise FilesystemError(
                        errno.EEXIST,
                        "exists and is not a directory (a symbolic link or a file); a download never"
                        " writes through a link: remove it or choose another destination",
                        str(self.root / rel),
                    ) from None

    def write_file(self, rel: str, src_fd: int, size: int, callback: ProgressCallback) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._parent(rel) as (fd, name):
            try:
                out = os.open(name, flags, 0o666, dir_fd=fd)
            except FileExistsError:
                if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                    raise IsADirectoryError(
                        errno.EISDIR, "is a directory on the host", str(self.root / rel)
                    ) from None
                os.unlink(name, dir_fd=fd)  # a file or a link: replaced, never written through
                out = os.open(name, flags, 0o666, dir_fd=fd)
            try:
                _copy_fd(src_fd, out, size, callback)
            except BaseException:
                os.close(out)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
                raise
            os.close(out)

    def symlink(self, target: str, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            try:
                os.symlink(target, name, dir_fd=fd)
            except FileExistsError:
                if os.readlink(name, dir_fd=fd) != target:  # planned only where nothing else is
                    raise

    # -- which links may be made ------------------------------------------------------------------

    def _lookup(
        self, parts: tuple[str, ...], planned: Mapping[tuple[str, ...], tuple[str, str]]
    ) -> tuple[str, str] | None:
        """``(kind, link text)`` of ``parts`` below the root once the copy is done, or None if absent."""
        found = planned.get(parts)
        if found is not None:
            return found
        try:
            st = os.lstat(os.path.join(self.root, *parts))  # every earlier part is a real directory
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return ("link", os.readlink(os.path.join(self.root, *parts)))
        return ("dir" if stat.S_ISDIR(st.st_mode) else "file", "")

    def _escapes(
        self, rel: str, target: str, planned: Mapping[tuple[str, ...], tuple[str, str]]
    ) -> str | None:
        """Why the link ``rel -> target`` must not be made, or None when it stays inside."""
        if target.startswith("/"):
            return "absolute link"
        resolved = list(rel.split("/")[:-1])
        pending = _steps(target)
        hops = 0
        while pending:
            name = pending.pop()
            if name == ".":  # "a/." and "a/" ask that a be a directory: checked below, as for ".."
                continue
            if name == "..":
                if not resolved:
                    return f"link to {target!r} leaves the destination"
                resolved.pop()
                continue
            found = self._lookup((*resolved, name), planned)
            if found is None:
                return f"link to {target!r} leads nowhere"
            kind, text = found
            if kind == "link":
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return f"link to {target!r} loops"
                if text.startswith("/"):
                    return f"link to {target!r} goes through an absolute link"
                pending.extend(_steps(text))
                continue
            if pending and kind != "dir":
                return f"link to {target!r} leads through a file"
            resolved.append(name)
        return None

    def plan_links(
        self, entries: list[tuple[str, str, int]], links: dict[str, str]
    ) -> tuple[set[str], list[tuple[str, str]]]:
        """The links that may be made, and the refused ones with the reason.

        A link is kept when it resolves, with every other kept link and every entry of the copy in
        place (and what the destination already holds), to an existing entry without leaving the
        root. Refusing one link can break another that went through it, so this repeats until nothing
        changes. A link is not made where the destination already holds something else.
        """
        planned: dict[tuple[str, ...], tuple[str, str]] = {}
        for rel, kind, _size in entries:
            if kind in ("dir", "file"):
                parts = tuple(rel.split("/"))
                # The plan must be what the host will hold: a directory of the copy where the host has
                # a link (or a file), or a file where it has a directory, stops the download before
                # anything is written - links judged against the plan would otherwise lead elsewhere.
                existing = self._lookup(parts, {})
                if existing is not None and (existing[0] == "dir") != (kind == "dir"):
                    here = {"link": "a symbolic link", "dir": "a directory"}.get(existing[0], "a file")
                    guest = "directory" if kind == "dir" else "file"
                    raise FilesystemError(
                        errno.EEXIST,
                        f"is {here} on the host where the guest has a {guest}; a download never writes"
                        " through a link: remove it or choose another destination",
                        str(self.root / rel),
                    )
                planned[parts] = (kind, "")
        refused: list[tuple[str, str]] = []
        candidates: dict[str, str] = {}
        for rel, target in links.items():
            existing = self._lookup(tuple(rel.split("/")), {})
            if existing is not None and existing != ("link", target):
                refused.append((rel, "something else exists there on the host"))
                continue
            candidates[rel] = target
            planned[tuple(rel.split("/"))] = ("link", target)
        while True:  # judge every link against the same plan, then drop the failures together
            failed = {
                rel: why for rel, target in candidates.items() if (why := self._escapes(rel, target, planned))
            }
            if not failed:
                return set(candidates), refused
            for rel, why in failed.items():
                del candidates[rel]
                del planned[tuple(rel.split("/"))]
                refused.append((rel, why))


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


def _steps(text: str) -> list[str]:
    """A relative link text's components, last first (a stack): empty ones dropped, except that a
    trailing ``/`` becomes ``.`` - the kernel wants a directory before it, as it does before ``.``."""
    parts = text.split("/")
    steps = [c for c in parts[:-1] if c] + [parts[-1] or "."]
    return steps[::-1]


def _check_size(size: int, max_bytes: int | None, src: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise FilesystemError(
            errno.EFBIG,
            f"the guest's files hold {size} bytes, more than the {max_bytes} this copy may write"
            " (a sparse file from a crafted filesystem?)",
            src,
        )


def _unlistable(exc: OSError, path: str) -> FilesystemError:
    """A guest directory the kernel will not list: EIO for a crafted entry name holding ``/``."""
    return FilesystemError(
        exc.errno or errno.EIO,
        f"the guest directory cannot be listed ({exc.strerror}): the filesystem is damaged or crafted",
        path,
    )


def _guest_error(exc: OSError, path: str) -> OSError:
    if exc.errno in _NO_SPACE:
        return FilesystemError(
            errno.ENOSPC, "the guest filesystem is full (the partial file was removed)", path
        )
    if exc.errno == errno.EROFS:
        return FilesystemError(errno.EROFS, "the guest filesystem is read-only", path)
    return type(exc)(exc.errno, exc.strerror, path)


def _choose_volume(disk: DiskImage, wanted: int | str | None) -> tuple[int | str | None, str | None, str]:
    """(partition number, ``"VG/LV"`` or None for the whole disk; its vdfuse file name; filesystem type)."""
    from diskhandler.partitions import LogicalVolume, list_partitions  # noqa: PLC0415

    partitions = list_partitions(disk)
    try:
        if wanted is not None:
            key = str(wanted)
            for part in partitions:
                if part.key == key:
                    if isinstance(part, LogicalVolume):
                        part.check_usable()  # a layout diskhandler cannot read says so by name
                    fstype = detect_filesystem(part)
                    if fstype is None:
                        raise FilesystemError(
                            errno.ENODEV,
                            f"partition {wanted} holds no filesystem diskhandler can open "
                            "(ext2/3/4, NTFS or FAT)",
                            str(disk.path),
                        )
                    return wanted, part.view_name, fstype
            keys = ", ".join(p.key for p in partitions) or "none"
            raise FilesystemError(
                errno.ENOENT, f"no partition {wanted} on this disk (partitions: {keys})", str(disk.path)
            )
        best: tuple[int, int | str | None, str | None, str] | None = None
        for part in partitions:
            if isinstance(part, LogicalVolume) and not part.supported:
                continue
            fstype = detect_filesystem(part)
            if fstype is not None and (best is None or part.size > best[0]):
                number = part.key if isinstance(part, LogicalVolume) else part.number
                best = (part.size, number, part.view_name, fstype)
        if best is None and not partitions:
            fstype = detect_filesystem(disk)
            if fstype is not None:
                best = (disk.size, None, None, fstype)
        if best is None:
            seen = f"{len(partitions)} partition(s)" if partitions else "no partition table"
            raise FilesystemError(
                errno.ENODEV,
                f"no filesystem diskhandler can open (ext2/3/4, NTFS, FAT) on this disk ({seen})",
                str(disk.path),
            )
        return best[1], best[2], best[3]
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


#: libvirt's ``<driver type>`` names -> diskhandler's.
_LIBVIRT_FORMATS = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vdi": "vdi",
    "vmdk": "vmdk",
    "vpc": "vhd",
    "vhdx": "vhdx",
}


def _declared_formats(vm: Any) -> dict[Path, str]:
    """The format a libvirt domain declares for each disk file (``<driver type>``); empty for a
    ``.vbox`` file or an object without domain XML."""
    xml_text: str | None = vm if isinstance(vm, str) and vm.lstrip().startswith("<") else None
    for name in ("xml_desc", "XMLDesc", "xml"):
        method = getattr(vm, name, None)
        if xml_text is None and callable(method):
            xml_text = str(method())
    if xml_text is None:
        return {}
    import xml.etree.ElementTree as ET  # noqa: PLC0415  (lazy: only for_vm parses XML)

    try:
        domain = ET.fromstring(xml_text)
    except ET.ParseError:
        return {}
    formats: dict[Path, str] = {}
    for disk in domain.iterfind("./devices/disk"):
        source, driver = disk.find("source"), disk.find("driver")
        file = source.get("file") if source is not None else None
        fmt = _LIBVIRT_FORMATS.get(driver.get("type", "")) if driver is not None else None
        if file is not None and fmt is not None:
            formats[Path(file)] = fmt
    return formats


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
