"""The one stream shape every disk format shares.

A format subclasses :class:`DiskImage` and implements two methods over *virtual* disk offsets:

* ``_readinto_at(offset, buf)`` — fill ``buf`` (a writable memoryview) with the bytes at ``offset``;
* ``_write_at(offset, data)`` — store ``data`` at ``offset`` (only called on writable images).

The base guarantees ``0 <= offset`` and ``offset + len(buf) <= size`` and ``len(buf) > 0``, holds
``self._lock`` around both calls (FUSE calls from several threads), and gives ``read``, ``readinto``,
``seek``, ``tell``, ``write``, positional ``read_at``/``readinto_at``/``write_at``, ``flush``, ``close``
and the context manager for free.

Ownership: a :class:`DiskImage` owns the file descriptors it opened and the parent images of its chain;
``close()`` closes all of them.
"""

from __future__ import annotations

import errno
import html
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from typing_extensions import Buffer, override

from diskhandler.errors import ImageFormatError, ReadOnlyImageError

if TYPE_CHECKING:
    from diskhandler.formats._files import PolicyName
    from diskhandler.formats.chain import ChainGuard

__all__ = ["DiskImage", "DiskView", "pread_exact", "preadinto_exact", "pwrite_all", "zero_fill"]

_ZEROS = bytes(1 << 20)


def zero_fill(buf: memoryview) -> None:
    """Set every byte of ``buf`` to zero."""
    n = len(buf)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        buf[pos : pos + step] = _ZEROS[:step]
        pos += step


def pread_exact(fd: int, offset: int, length: int, path: Path, what: str) -> bytes:
    """Read exactly ``length`` bytes at ``offset``; a short read means the file is truncated."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ImageFormatError(
            path,
            what,
            f"file ends at {offset + len(data)} but {what} needs {length} bytes at offset {offset}"
            " (truncated image?)",
        )
    return data


def preadinto_exact(fd: int, buf: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``buf`` from ``offset``; a short read means the file is truncated."""
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise ImageFormatError(
                path,
                what,
                f"file ends at {offset + done} but {what} needs {total} bytes at offset {offset}"
                " (truncated image?)",
            )
        done += n


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class DiskImage(io.RawIOBase):
    """A virtual disk as a seekable binary stream of ``size`` bytes.

    Attributes:
        path: the image file (for multi-file formats, the descriptor).
        size: the virtual disk size in bytes.
        format: the format name (``"raw"``, ``"vdi"``, ``"vhd"``, ``"vmdk"``, ``"qcow2"``).
        parent: the next image down the snapshot chain, or ``None``.
        chain: the files of the chain, leaf first.
    """

    format: ClassVar[str] = "?"
    _parents: PolicyName | Path = "any"  # the normalized parents= policy it was opened with

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        size: int,
        writable: bool,
        parent: DiskImage | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.size = size
        self.parent = parent
        self._fd = fd
        self._writable = writable
        self._pos = 0
        self._lock = threading.RLock()

    # -- what a format implements -------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes) -> bool:
        """Whether a file starting with ``head`` (4 KiB) and ending with ``tail`` (1 KiB) is ours."""
        return False

    @classmethod
    def open(cls, path: Path, *, writable: bool, guard: ChainGuard) -> Self:
        """Open an existing image (and, through ``guard.open_parent``, its parents)."""
        raise NotImplementedError

    @classmethod
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        """Create a new image (a child of ``parent`` when given) and return it open for writing."""
        raise NotImplementedError

    def _readinto_at(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def _write_at(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """Write cached metadata to the file. Called by :meth:`flush` and :meth:`close`."""

    def _start_writing(self) -> None:
        """Called once a writable image is locked, before any write: a format that must change the
        file when it is opened for writing (replay a log, mark the file in use) does it here."""

    def _files(self) -> list[tuple[Path, int]]:
        """The files this image (not its parents) is made of, with their open descriptors; locked
        together when the image is written."""
        return [(self.path, self._fd)] if self._fd >= 0 else []

    def _close_files(self) -> None:
        """Close descriptors other than ``self._fd`` (extents, ...). Called once by :meth:`close`."""

    # -- helpers for formats ------------------------------------------------------------------

    def _read_parent(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from the parent image, zeros past its end (or everywhere without a parent)."""
        parent = self.parent
        if parent is None or offset >= parent.size:
            zero_fill(buf)
            return
        n = min(len(buf), parent.size - offset)
        parent.readinto_at(offset, buf[:n])
        if n < len(buf):
            zero_fill(buf[n:])

    # -- public API -----------------------------------------------------------------------------

    @property
    def chain(self) -> tuple[Path, ...]:
        """The image files of the snapshot chain, leaf first."""
        files: list[Path] = []
        image: DiskImage | None = self
        while image is not None:
            files.append(image.path)
            image = image.parent
        return tuple(files)

    def iter_chain(self) -> Iterator[DiskImage]:
        """The images of the chain, leaf first."""
        image: DiskImage | None = self
        while image is not None:
            yield image
            image = image.parent

    @override
    def readable(self) -> bool:
        return True

    @override
    def writable(self) -> bool:
        return self._writable and not self.closed

    @override
    def seekable(self) -> bool:
        return True

    @override
    def fileno(self) -> int:
        raise io.UnsupportedOperation(
            f"{type(self).__name__} has no single file descriptor: its bytes are virtual"
        )

    @override
    def tell(self) -> int:
        self._check_open()
        return self._pos

    @override
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    @override
    def readinto(self, buffer: Buffer) -> int:
        n = self.readinto_at(self._pos, buffer)
        self._pos += n
        return n

    @override
    def read(self, size: int = -1) -> bytes:
        self._check_open()
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        buf = bytearray(min(size, max(0, self.size - self._pos)))
        n = self.readinto(buf)
        return bytes(buf[:n])

    @override
    def readall(self) -> bytes:
        return self.read(-1)

    @override
    def write(self, data: Buffer) -> int:
        n = self.write_at(self._pos, data)
        self._pos += n
        return n

    def read_at(self, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` without moving the stream position."""
        self._check_open()
        buf = bytearray(max(0, min(size, self.size - offset)))
        n = self.readinto_at(offset, buf)
        return bytes(buf[:n])

    def readinto_at(self, offset: int, buffer: Buffer) -> int:
        """Fill ``buffer`` from ``offset`` (short at the end of the disk); thread-safe."""
        self._check_open()
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        with self._lock:
            self._check_open()
            self._readinto_at(offset, view[:n])
        return n

    def write_at(self, offset: int, data: Buffer) -> int:
        """Write all of ``data`` at ``offset``; thread-safe. Writing past the end is an error."""
        self._check_open()
        if not self._writable:
            raise ReadOnlyImageError(
                f"{self.path}: image is open read-only; open it with writable=True to write"
            )
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        view = memoryview(data).cast("B")
        if not view:
            return 0
        if offset + len(view) > self.size:
            raise OSError(
                errno.ENOSPC,
                f"write of {len(view)} bytes at {offset} goes past the end of the {self.size}-byte disk",
                str(self.path),
            )
        with self._lock:
            self._check_open()
            self._write_at(offset, view)
        return len(view)

    @override
    def flush(self) -> None:
        if self.closed or self._fd < 0:
            return
        if self._writable:
            with self._lock:
                self._flush()

    def sync(self) -> None:
        """Flush metadata and ask the OS to put every written byte on stable storage."""
        self.flush()
        if self._writable:
            os.fsync(self._fd)

    @override
    def close(self) -> None:
        # Under the lock: a read or write running in another thread (FUSE) finishes first, and none
        # starts on a descriptor that is being closed (each re-checks ``closed`` inside the lock).
        with self._lock:
            if self.closed:
                return
            try:
                self.flush()
            finally:
                try:
                    self._close_files()
                finally:
                    try:
                        fd, self._fd = self._fd, -1
                        if fd >= 0:  # views over another image (partitions) own no descriptor
                            os.close(fd)
                    finally:
                        if self.parent is not None:
                            self.parent.close()
                        super().close()

    @override
    def __enter__(self) -> Self:
        self._check_open()
        return self

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed image {self.path}")

    def _repr_html_(self) -> str:
        """For Jupyter: format, size, the chain and the partitions and LVM volumes of the disk."""
        mode = "writable" if self.writable() else "read-only"
        head = (
            f"<b>DiskImage</b> <code>{html.escape(str(self.path))}</code> — {html.escape(self.format)},"
            f" {_human(self.size)} ({self.size} bytes), {mode}"
        )
        if self.closed:
            return f"<div>{head}, closed</div>"
        chain = ""
        if self.parent is not None:
            items = "".join(
                f"<li><code>{html.escape(str(image.path))}</code> ({html.escape(image.format)})</li>"
                for image in self.iter_chain()
            )
            chain = f"<div>snapshot chain, leaf first:<ol>{items}</ol></div>"
        return f"<div>{head}{chain}{_partition_table_html(self)}</div>"

    @override
    def __repr__(self) -> str:
        mode = "rw" if self._writable else "ro"
        state = " closed" if self.closed else ""
        extra = f" chain={len(self.chain)}" if self.parent is not None else ""
        return (
            f"<{type(self).__name__} {str(self.path)!r} {self.format} {self.size} bytes {mode}{extra}{state}>"
        )


class DiskView(DiskImage):
    """A ``DiskImage`` over part of another one (a partition, a logical volume): it owns no file.

    Flushing and syncing go to the disk it is part of; closing the view leaves the disk open, and
    closing the disk makes the view unusable. Subclasses name themselves in errors (``_view_label``).
    """

    def __init__(self, disk: DiskImage, *, size: int, writable: bool) -> None:
        super().__init__(disk.path, -1, size=size, writable=writable)
        self.disk = disk

    def _view_label(self) -> str:
        raise NotImplementedError

    @override
    def flush(self) -> None:
        if not self.closed and self._writable and not self.disk.closed:
            self.disk.flush()

    @override
    def sync(self) -> None:
        self.flush()
        if self._writable and not self.disk.closed:
            self.disk.sync()

    @override
    def _check_open(self) -> None:
        super()._check_open()
        if self.disk.closed:
            raise ValueError(f"I/O operation on {self._view_label()} of closed image {self.path}")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


def _partition_table_html(disk: DiskImage) -> str:
    """The partitions and logical volumes of ``disk`` as an HTML table (errors shown, never raised)."""
    import warnings  # noqa: PLC0415

    from diskhandler.errors import DiskHandlerError  # noqa: PLC0415
    from diskhandler.partitions import Partition, list_partitions  # noqa: PLC0415  (partitions imports us)

    try:
        with warnings.catch_warnings(record=True):
            parts = list_partitions(disk)
    except (DiskHandlerError, OSError) as exc:
        return f"<div>partitions: {html.escape(str(exc))}</div>"
    if not parts:
        return "<div><i>no partition table, no LVM volumes</i></div>"
    rows = []
    for p in parts:
        if isinstance(p, Partition):
            kind = f"{p.scheme.upper()} {html.escape(p.type_name)}" + (
                f" [{html.escape(p.name)}]" if p.name else ""
            )
            where = str(p.start)
        else:
            note = f" — {html.escape(p.reason)}" if p.reason else ""
            kind = f"LVM {html.escape(p.layout)}{note}"
            where = "extents"
        rows.append(
            f"<tr><td>{html.escape(p.key)}</td><td>{kind}</td><td>{where}</td><td>{_human(p.size)}</td></tr>"
        )
        p.close()
    return (
        "<table><tr><th>partition</th><th>type</th><th>start</th><th>size</th></tr>"
        + "".join(rows)
        + "</table>"
    )
