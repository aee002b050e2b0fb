"""Who else has an image open: QEMU's image locks, and diskhandler's own writer lock.

QEMU (since 2.10) marks the image files it opens with open-file-description (OFD) byte-range locks,
one byte per block-layer permission: byte ``100 + bit`` means "I hold this permission", byte
``200 + bit`` means "I do not let others hold it". Bit 0 is *consistent read*, bit 1 is *write*. A
running guest with a writable disk therefore has read locks on bytes 101 and 201 of the image.

diskhandler's writers take the same locks on every file they write — the leaf of the chain, and each
extent of a multi-file VMDK (split parts, flat extents) — so two diskhandler writers exclude each other,
QEMU refuses to start on an image diskhandler is writing, and diskhandler refuses to write an image a
running guest holds. The parents of a chain being written are locked as QEMU locks a backing file
(consistent read held; write and resize not shared), so nobody writes a parent under a child being
written, and a parent somebody writes is refused. The locks belong to the open file descriptions, so
they vanish when the image is closed or its process dies. Readers take no lock and are never refused
(as ``qemu-img --force-share``).

The kernel reports OFD lock holders with PID -1, so the holding process is found through the lock
lines of ``/proc/<pid>/fdinfo/<fd>`` (matched on device and inode).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from diskhandler.errors import ImageInUseError

if TYPE_CHECKING:
    from diskhandler.formats._stream import DiskImage

__all__ = ["check_not_in_use", "find_lock_holders", "lock_as_parent", "lock_chain", "lock_for_writing"]

# fcntl commands for OFD locks (linux/fcntl.h); the stdlib fcntl module only names them on 3.12+.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

_PERM_BASE = 100
_SHARED_BASE = 200
_CONSISTENT_READ = 0
_WRITE = 1
_RESIZE = 3
# A parent (QEMU's backing file): nobody may write or resize it, or forbid reading it consistently.
_PARENT_CONFLICTS = (_PERM_BASE + _WRITE, _PERM_BASE + _RESIZE, _SHARED_BASE + _CONSISTENT_READ)
_PARENT_BYTES = (_PERM_BASE + _CONSISTENT_READ, _SHARED_BASE + _WRITE, _SHARED_BASE + _RESIZE)
# Bytes whose lock means someone writes, or forbids others to write.
_WRITER_BYTES = (_PERM_BASE + _WRITE, _SHARED_BASE + _WRITE)
# Bytes a diskhandler writer locks: consistent read + write held, write not shared.
_OUR_BYTES = (_PERM_BASE + _CONSISTENT_READ, _PERM_BASE + _WRITE, _SHARED_BASE + _WRITE)

# struct flock on x86_64 / aarch64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (+ padding).
_FLOCK = struct.Struct("hhqqi4x")


def _flock(fd: int, cmd: int, kind: int, start: int, length: int = 1) -> tuple[int, int]:
    """One fcntl lock call; returns the (l_type, l_pid) the kernel wrote back."""
    packed = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
    result = fcntl.fcntl(fd, cmd, packed)
    l_type, _whence, _start, _len, l_pid = _FLOCK.unpack(result)
    return l_type, l_pid


def _conflicting_bytes(fd: int, candidates: tuple[int, ...] = _WRITER_BYTES) -> list[int]:
    """The bytes of ``candidates`` another open file description holds a lock on."""
    found = []
    for byte in candidates:
        l_type, _pid = _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte)
        if l_type != fcntl.F_UNLCK:
            found.append(byte)
    return found


def find_lock_holders(path: str | os.PathLike[str], exclude_pid: int | None = None) -> list[str]:
    """Processes holding a byte-range lock on ``path``, as ``"name (pid N)"``, best effort.

    Reads the ``lock:`` lines of every ``/proc/<pid>/fdinfo/<fd>``; processes whose ``/proc`` entries
    cannot be read (another user's, or gone meanwhile) are skipped.
    """
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders: list[str] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude_pid:
            continue
        fdinfo = Path(entry.path, "fdinfo")
        try:
            fds = list(os.scandir(fdinfo))
        except OSError:
            continue
        for fd_entry in fds:
            try:
                text = Path(fd_entry.path).read_text()
            except OSError:
                continue
            if any(line.startswith("lock:") and f" {key} " in line for line in text.splitlines()):
                holders.append(f"{_process_name(entry.name)} (pid {entry.name})")
                break
    return holders


def _process_name(pid: str) -> str:
    """The program's name: argv[0]'s base name (``comm`` is cut to 15 characters), else ``comm``."""
    try:
        argv0 = Path("/proc", pid, "cmdline").read_bytes().split(b"\0", 1)[0]
        if argv0:
            return os.path.basename(os.fsdecode(argv0)).split()[0]
    except (OSError, IndexError):
        pass
    try:
        return Path("/proc", pid, "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _in_use_error(path: Path, byte_list: list[int], role: str = "") -> ImageInUseError:
    holders = find_lock_holders(path)
    holder = ", ".join(holders) if holders else None
    what = "is written by" if _PERM_BASE + _WRITE in byte_list else "is reserved for writing by"
    if _PERM_BASE + _RESIZE in byte_list:
        what = "is resized by"
    if role:
        what = f"({role}) {what}"
    return ImageInUseError(
        path,
        holder,
        f"it {what} that process (lock bytes {', '.join(map(str, byte_list))}); stop the VM or close the "
        "other writer first, or open the image read-only",
    )


def check_not_in_use(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ImageInUseError` when another process writes ``path`` (or forbids writing it)."""
    p = Path(path)
    from diskhandler.formats._files import open_image_file  # noqa: PLC0415  (formats imports us)

    fd = open_image_file(p)
    try:
        found = _conflicting_bytes(fd)
    finally:
        os.close(fd)
    if found:
        raise _in_use_error(p, found)


def lock_for_writing(path: str | os.PathLike[str], fd: int) -> None:
    """Take the writer locks on ``fd`` (an open descriptor of ``path``), or raise ImageInUseError.

    The locks last as long as ``fd``'s open file description: closing the image releases them.
    """
    p = Path(path)
    found = _conflicting_bytes(fd)
    if found:
        raise _in_use_error(p, found)
    for byte in _OUR_BYTES:
        _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
    # Two writers may have checked at the same moment: look again now that ours are in place.
    found = _conflicting_bytes(fd)
    if found:
        for byte in _OUR_BYTES:
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
        raise _in_use_error(p, found)


def lock_as_parent(path: str | os.PathLike[str], fd: int, role: str = "a parent") -> None:
    """Lock ``fd`` as QEMU locks a backing file, or raise ImageInUseError when someone writes it."""
    p = Path(path)
    found = _conflicting_bytes(fd, _PARENT_CONFLICTS)
    if found:
        raise _in_use_error(p, found, role)
    for byte in _PARENT_BYTES:
        _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
    found = _conflicting_bytes(fd, _PARENT_CONFLICTS)
    if found:
        for byte in _PARENT_BYTES:
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
        raise _in_use_error(p, found, role)


def lock_chain(image: DiskImage) -> None:
    """Lock every file of a chain opened for writing: the leaf's as a writer, its parents' as parents.

    Raises ImageInUseError naming the file and its holder; the caller closes the image, which drops
    every lock already taken.
    """
    for path, fd in image._files():
        lock_for_writing(path, fd)
    parent = image.parent
    while parent is not None:
        for path, fd in parent._files():
            lock_as_parent(path, fd, f"a parent of {image.path}")
        parent = parent.parent
