"""``diskimage://``: the files inside a disk image's guest filesystem as an fsspec filesystem.

Chained like fsspec's archive filesystems (``zip://inner::outer``): the part after ``::`` names the
image, the part before it a path inside the guest::

    import fsspec

    with fsspec.open("diskimage://etc/hostname::/vms/disk.vdi", "rt") as f:
        print(f.read())

    fs = fsspec.filesystem("diskimage", fo="/vms/disk.vdi", partition=1)
    fs.ls("/etc")
    fs.get("/var/log", "guest-logs", recursive=True)

Storage options (``fsspec.open(url, diskimage={...})`` or keyword arguments of
``fsspec.filesystem``):

* ``mode``: ``"r"`` (the default) mounts read-only — it works while a VM runs on the image and
  writes fail with ``EROFS``; ``"a"`` mounts read-write (as zip's ``"a"``: change what is there).
* ``partition``: the partition to mount (a number, or ``"VG/LV"`` for an LVM volume); by default the
  largest one with a filesystem diskhandler can open.
* ``format``: the image format, detected when omitted.

The image must be a local file, or come through one of fsspec's local caches
(``diskimage://etc/hostname::simplecache::s3://bucket/disk.vdi``, read-only: the cached copy is never
uploaded back). Everything goes through :class:`~diskhandler.DiskOperations`: guest paths are
confined to the guest (``..`` and absolute symlinks re-rooted inside it). An instance keeps its image
mounted until :meth:`DiskImageFileSystem.close` (or the interpreter's exit); fsspec caches instances,
so opening many files of one image mounts it once.

This is the only module that imports fsspec (the ``fsspec`` extra).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import warnings
import weakref
from typing import Any, ClassVar

from fsspec import AbstractFileSystem
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

from diskhandler.errors import FilesystemError, ImageWarning
from diskhandler.operations import MAX_WALK_DEPTH, DiskOperations

__all__ = ["DiskImageFileSystem"]


class DiskImageFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """The guest filesystem of a disk image (VDI, VHD, VMDK, QCOW2, raw), read and written by path.

    Args:
        fo: the image: a local path, or a path on ``target_protocol`` when chained.
        mode: ``"r"`` read-only (default) or ``"a"`` read-write.
        partition: the partition to mount (default: the largest with a filesystem).
        format: the image format (detected when omitted).
        target_protocol, target_options: where ``fo`` lives (set by fsspec when chaining).
    """

    protocol: ClassVar[str | tuple[str, ...]] = "diskimage"
    root_marker = "/"

    def __init__(
        self,
        fo: str | os.PathLike[str] = "",
        mode: str = "r",
        *,
        partition: int | str | None = None,
        format: str | None = None,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("r", "a"):
            raise ValueError(f"mode {mode!r} not understood: 'r' (read-only) or 'a' (read-write)")
        image = _local_image(fo, target_protocol, target_options, writable=mode == "a")
        self.mode = mode
        self.ops = DiskOperations(image, readonly=mode == "r", partition=partition, format=format)
        self.ops.mount()
        # dropped by fsspec's instance cache (or never cached): unmount then, not at interpreter exit
        weakref.finalize(self, self.ops.close_connection)

    # -- paths ----------------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(stringify_path(path))
        if text.startswith("diskimage://"):
            text = text[len("diskimage://") :]
        elif text.startswith("diskimage::"):
            text = text[len("diskimage::") :]
        text = text.split("::", 1)[0]
        return "/" + text.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        return {}

    # -- listing ----------------------------------------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        try:
            st = self.ops.stat(path, follow_symlinks=False)
        except NotADirectoryError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the guest", path) from None
        info = _info(path, st)
        if stat.S_ISLNK(st.st_mode):
            info["destination"] = self.ops.readlink(path)
            try:  # the link's kind is its target's, followed inside the guest
                target = self.ops.stat(path)
                info.update(type=_kind(target.st_mode), size=target.st_size)
            except (FileNotFoundError, NotADirectoryError, OSError):
                info.update(type="other", size=0)
        return info

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        entry = self.info(path)
        if entry["type"] != "directory":
            return [entry] if detail else [path]
        children = [posixpath.join(path, name) for name in self.ops.listdir(path)]
        if not detail:
            return children
        return [self.info(child) for child in children]

    def walk(
        self,
        path: str,
        maxdepth: int | None = None,
        topdown: bool = True,
        on_error: str | Any = "omit",
        **kwargs: Any,
    ) -> Any:
        """fsspec's walk, where every folder is entered once, however many links lead to it.

        Links to folders are followed (as fsspec's local filesystem does), so a guest link looping
        back to an ancestor (``/a/loop -> /a``) would otherwise be walked until the guest path had 40
        links in it, and folders each linking twice to the next (``d0/x -> ../d1``, ``d0/y -> ../d1``,
        ...) would double the walk at every level: a folder already entered is shown, empty.
        """
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        detail = kwargs.pop("detail", False)
        yield from self._walk(self._strip_protocol(path), maxdepth, topdown, on_error, detail, set(), 0)

    def _walk(  # noqa: PLR0917  (private; the walk's state)
        self,
        path: str,
        maxdepth: int | None,
        topdown: bool,
        on_error: str | Any,
        detail: bool,
        entered: set[tuple[int, int]],
        level: int,
    ) -> Any:
        if level > MAX_WALK_DEPTH:  # as DiskOperations.walk: a crafted filesystem nests 2000 deep
            warnings.warn(
                ImageWarning(
                    f"{path}: nested deeper than {MAX_WALK_DEPTH} folders below the walk's start"
                    " (a crafted filesystem?); walked past it"
                ),
                stacklevel=3,
            )
            return
        try:
            listing = self.ls(path, detail=True)
            st = self.ops.stat(path)
        except OSError as exc:
            if on_error == "raise":
                raise
            if callable(on_error):
                on_error(exc)
            return
        entered.add((st.st_dev, st.st_ino))
        dirs: dict[str, Any] = {}
        files: dict[str, Any] = {}
        for info in listing:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info["name"] == path:
                files[""] = info
            elif info["type"] == "directory":
                dirs[name] = info
            else:
                files[name] = info
        shown_dirs: Any = dirs if detail else list(dirs)
        shown_files: Any = files if detail else list(files)
        if topdown:
            yield path, shown_dirs, shown_files
        if maxdepth is None or maxdepth > 1:
            for name in list(shown_dirs):
                sub = posixpath.join(path, name)
                try:
                    key = self.ops.stat(sub)
                except OSError:
                    continue
                if (key.st_dev, key.st_ino) in entered:
                    continue  # a folder this walk entered already (a loop, or a second link): shown only
                yield from self._walk(
                    sub,
                    None if maxdepth is None else maxdepth - 1,
                    topdown,
                    on_error,
                    detail,
                    entered,
                    level + 1,
                )
        if not topdown:
            yield path, shown_dirs, shown_files

    # -- files --------------------------------------------------------------------------------------------

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if not autocommit:
            raise NotImplementedError("diskimage writes go straight to the guest; transactions are not kept")
        path = self._strip_protocol(path)
        if mode != "rb":
            self._check_writable(path)
            self.ops.mkdir(posixpath.dirname(path), parents=True, exist_ok=True)  # as object stores do
        return self.ops.open(path, mode)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return self.ops.read_bytes(self._strip_protocol(path), start, end)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self._check_writable(path)
        self.ops.mkdir(posixpath.dirname(path), parents=True, exist_ok=True)
        with self.ops.open(path, "xb" if mode == "create" else "wb") as f:
            f.write(value)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if truncate or not self.exists(path):
            self.pipe_file(path, b"")
        else:
            self._check_writable(path)
            os.utime(self.ops._resolve(path))

    # -- folders ------------------------------------------------------------------------------------------

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self._check_writable(path)
        if self.ops.exists(path):
            raise FileExistsError(errno.EEXIST, "already exists in the guest", path)
        self.ops.mkdir(path, parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        self._check_writable(path)
        self.ops.mkdir(path, parents=True, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        path = self._strip_protocol(path)
        self._check_writable(path)
        if not self.ops.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory in the guest", path)
        self.ops.remove(path)

    def _rm(self, path: str) -> None:
        path = self._strip_protocol(path)
        self._check_writable(path)
        self.ops.remove(path, recursive=self.ops.isdir(path) and not self.ops.islink(path))

    # -- copies and moves ---------------------------------------------------------------------------------

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        self._check_writable(dst)
        if self.ops.isdir(src):
            self.ops.mkdir(dst, parents=True, exist_ok=True)
            return
        self.ops.mkdir(posixpath.dirname(dst), parents=True, exist_ok=True)
        with self.ops.open(src, "rb") as fin, self.ops.open(dst, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)

    def mv(
        self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any
    ) -> None:
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        self._check_writable(dst)
        if self.ops.isdir(dst) and not self.ops.isdir(src):
            dst = posixpath.join(dst, posixpath.basename(src))
        self.ops.rename(src, dst)

    def put_file(
        self,
        lpath: str,
        rpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        mode: str = "overwrite",
        **kwargs: Any,
    ) -> None:
        rpath = self._strip_protocol(rpath)
        self._check_writable(rpath)
        if mode == "create" and self.ops.exists(rpath):
            raise FileExistsError(errno.EEXIST, "already exists in the guest", rpath)
        if os.path.isdir(lpath):
            self.ops.mkdir(rpath, parents=True, exist_ok=True)
            return
        self.ops.mkdir(posixpath.dirname(rpath), parents=True, exist_ok=True)
        if self.ops.isdir(rpath):
            raise IsADirectoryError(errno.EISDIR, "a directory in the guest", rpath)
        self.ops.put_file(lpath, rpath, callback=_progress(callback))

    def get_file(
        self,
        rpath: str,
        lpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        outfile: Any = None,
        **kwargs: Any,
    ) -> None:
        rpath = self._strip_protocol(rpath)
        if self.ops.isdir(rpath):
            if outfile is None:
                os.makedirs(lpath, exist_ok=True)
            return
        if kwargs.get("_in_tree") and not self.ops.isfile(rpath):
            return  # a device node, FIFO, socket or dead link inside a tree: skipped, as download does
        if outfile is not None:
            with self.ops.open(rpath, "rb") as fin:
                while chunk := fin.read(1 << 20):
                    outfile.write(chunk)
            return
        if os.path.isdir(lpath):
            raise IsADirectoryError(errno.EISDIR, "a directory on the host", lpath)
        os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)  # as fsspec's own get_file
        self.ops.get_file(rpath, lpath, callback=_progress(callback))

    def get(
        self,
        rpath: Any,
        lpath: Any,
        recursive: bool = False,
        callback: Callback = DEFAULT_CALLBACK,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """fsspec's get; copying a tree skips what is neither a regular file nor a folder."""
        super().get(rpath, lpath, recursive=recursive, callback=callback, maxdepth=maxdepth,
                    _in_tree=recursive, **kwargs)  # fmt: skip

    # -- metadata -----------------------------------------------------------------------------------------

    def chmod(self, path: str, mode: int, **kwargs: Any) -> None:
        self.ops.chmod(self._strip_protocol(path), mode)

    def symlink(self, target: str, link: str, **kwargs: Any) -> None:
        self.ops.symlink(target, self._strip_protocol(link))

    def islink(self, path: str) -> bool:
        return self.ops.islink(self._strip_protocol(path))

    def created(self, path: str) -> Any:
        return self.modified(path)

    def modified(self, path: str) -> Any:
        import datetime  # noqa: PLC0415

        st = self.ops.stat(self._strip_protocol(path))
        return datetime.datetime.fromtimestamp(st.st_mtime, tz=datetime.UTC)

    def ukey(self, path: str) -> str:
        st = self.ops.stat(self._strip_protocol(path))
        return f"{self.ops.image}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmount the image, flushing everything (a no-op when already closed)."""
        self.ops.close_connection()

    def _check_writable(self, path: str) -> None:
        if self.mode == "r":
            raise FilesystemError(
                errno.EROFS,
                "the diskimage filesystem is read-only; pass mode='a' to write "
                "(fsspec.open(url, 'wb', diskimage={'mode': 'a'}))",
                path,
            )

    def _repr_html_(self) -> str:
        return self.ops._repr_html_()


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _info(path: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "name": path,
        "size": st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
        "type": _kind(st.st_mode),
        "islink": stat.S_ISLNK(st.st_mode),
        "mode": st.st_mode,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime,
        "ino": st.st_ino,
        "nlink": st.st_nlink,
    }


def _progress(callback: Callback) -> Any:
    def report(done: int, total: int) -> None:
        callback.set_size(total)
        callback.absolute_update(done)

    return report


def _local_image(
    fo: str | os.PathLike[str],
    target_protocol: str | None,
    target_options: dict[str, Any] | None,
    *,
    writable: bool,
) -> str:
    """The local path of the image ``fo`` names (possibly through one of fsspec's local caches)."""
    text = str(stringify_path(fo))
    if not text:
        raise ValueError("diskimage needs the image: fsspec.open('diskimage://PATH::IMAGE') or fo=IMAGE")
    import fsspec  # noqa: PLC0415

    fs, inner = (
        fsspec.core.url_to_fs(text, **(target_options or {}))
        if target_protocol is None
        else (
            fsspec.filesystem(target_protocol, **(target_options or {})),
            text,
        )
    )
    if isinstance(fs, LocalFileSystem):
        return str(fs._strip_protocol(inner))
    if not getattr(fs, "local_file", False):
        raise ValueError(
            f"diskimage reads images from local files; {text!r} is on {type(fs).__name__}: copy it "
            "locally, or chain a local cache (diskimage://PATH::simplecache::PROTOCOL://IMAGE)"
        )
    if writable:
        raise ValueError("a cached copy of a remote image is never written back: use mode='r'")
    with fs.open(inner, "rb") as f:
        return str(f.name)
