"""One lifecycle for every FUSE child process: start, wait until live, stop, and never outlive the owner.

Two kinds of FUSE servers run as child processes of the process that mounts them (the *owner*):

* diskhandler's own vdfuse server (:mod:`diskhandler.vdfuse`), which reports readiness on a pipe;
* third-party filesystem drivers (``fuse2fs``, ``ntfs-3g``, ``fusefat``), which are live once their
  mount point appears in ``/proc/self/mountinfo``.

Both stop the same way: ``SIGTERM`` (libfuse's handler leaves its loop, unmounts, and runs the
filesystem's ``destroy``, which flushes), a bounded wait, then ``SIGKILL`` and a lazy unmount.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from diskhandler.errors import FilesystemError

__all__ = [
    "ChildProcess",
    "ForkedChild",
    "detach",
    "is_mountpoint",
    "stop_child",
    "wait_mounted",
    "wait_ready",
]

READY = b"R"


# -- mount points ---------------------------------------------------------------------------------


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mount point of this process's mount namespace."""
    target = os.fsencode(os.path.abspath(path))
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return os.path.ismount(path)


def detach(mountpoint: str | os.PathLike[str]) -> None:
    """Lazily unmount ``mountpoint`` (its server is gone or hangs); a no-op when nothing is mounted."""
    for argv in (["fusermount3", "-u", "-z"], ["fusermount", "-u", "-z"], ["umount", "-l"]):
        if not is_mountpoint(mountpoint):
            return
        if shutil.which(argv[0]):
            subprocess.run([*argv, os.fspath(mountpoint)], capture_output=True, check=False)


# -- the child processes --------------------------------------------------------------------------


class ChildProcess(Protocol):
    """What the lifecycle needs of a child: ``subprocess.Popen`` or a forked :class:`ForkedChild`."""

    pid: int
    returncode: Any

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ForkedChild:
    """A forked child, reaped with ``waitpid``; the subset of ``subprocess.Popen`` the lifecycle uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_child(run: Callable[[], int], keep_fds: tuple[int, ...]) -> ForkedChild:
    """Fork; the child detaches (own session, no terminal, only ``keep_fds`` open) and runs ``run``.

    The child never returns into the caller's code: it leaves with ``os._exit(run())``.
    """
    pid = os.fork()
    if pid:
        return ForkedChild(pid)
    code = 1
    try:
        os.setsid()  # a Ctrl-C meant for the owner does not reach the mount
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        # Collect the owner's pending garbage first, while the descriptors it may close are still the
        # inherited ones; then only ``keep_fds`` survive (no descriptor, no image lock of the owner).
        gc.collect()
        low = 3
        for fd in sorted(keep_fds):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        code = run()
    finally:
        os._exit(code)


def wait_ready(fd: int, process: ChildProcess, timeout: float, what: str) -> bytes:
    """Read the child's readiness report from ``fd``: :data:`READY`, an error message, or ``b""``.

    On timeout the child is killed and :class:`FilesystemError` (``ETIMEDOUT``) raised.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            process.kill()
            process.wait()
            raise FilesystemError(errno.ETIMEDOUT, f"{what} was not ready within {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        if chunks == [READY]:
            return READY


def wait_mounted(mountpoint: Path, process: ChildProcess, timeout: float, failed: Callable[[], str]) -> None:
    """Wait until ``mountpoint`` is mounted by ``process``.

    Raises:
        FilesystemError: the process exited first (the message from ``failed()``), or ``ETIMEDOUT``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not is_mountpoint(mountpoint):
        if process.poll() is not None:
            raise FilesystemError(errno.EIO, failed(), str(mountpoint))
        if time.monotonic() > deadline:
            stop_child(process, mountpoint, timeout=10.0, what="the driver")
            raise FilesystemError(errno.ETIMEDOUT, f"not mounted within {timeout} s", str(mountpoint))
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def stop_child(process: ChildProcess, mountpoint: Path, *, timeout: float, what: str) -> int:
    """Stop a FUSE child the clean way and make sure nothing stays mounted; its exit status.

    ``SIGTERM`` makes libfuse leave its loop, unmount and run the filesystem's ``destroy`` (which
    flushes). A child that does not exit within ``timeout`` seconds is killed, its mount lazily
    detached, and :class:`FilesystemError` (``ETIMEDOUT``) raised. A child that already died (``kill -9``)
    leaves its mount behind: it is detached too.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            detach(mountpoint)
            raise FilesystemError(
                errno.ETIMEDOUT, f"{what} did not stop within {timeout} s; killed", str(mountpoint)
            ) from None
    detach(mountpoint)
    return int(process.returncode)
