"""One lifecycle for every FUSE child process: start, wait until live, stop, and never outlive the owner.

Two kinds of FUSE servers run as child processes of the process that mounts them (the *owner*):

* diskhandler's own vdfuse server (:mod:`diskhandler.vdfuse`), which reports readiness on a pipe;
* third-party filesystem drivers (``fuse2fs``, ``ntfs-3g``, ``fusefat``), which are live once their
  mount point appears in ``/proc/self/mountinfo``.

Both stop the same way: ``SIGTERM`` (libfuse's handler leaves its loop, unmounts, and runs the
filesystem's ``destroy``, which flushes), a bounded wait, then ``SIGKILL`` and a lazy unmount.

**Nothing is orphaned.** When the owner dies without unmounting — ``SIGTERM``, ``SIGKILL``, a crash —
its mounts must not run on, holding the image's locks. ``prctl(PR_SET_PDEATHSIG)`` is not the tool: it
fires when the *thread* that forked exits, not the process, and does not cross ``exec`` of a setuid
helper. Instead the owner holds the only write end of a pipe, the :class:`Lifeline`; the kernel closes
it however the owner ends, and the child watching the read end sees end-of-file. Every child of the
owner (and anything it forks, see :func:`os.register_at_fork` below) is kept from inheriting that
write end, so end-of-file means exactly "the owner is gone".

Third-party drivers cannot watch a pipe, so a watcher does it for them: the owner tells the watcher
(over the same pipe, one short line per message) which driver processes and mount points to *guard*.
When the owner is gone the watcher stops each guarded driver the clean way (``SIGTERM``: unmount and
flush), waits for it, kills and lazily unmounts one that hangs, and only then lets its own server
finish. In a :class:`~diskhandler.DiskOperations` stack the vdfuse server is the watcher of the
filesystem driver mounted on it — the order matters, since the driver's last writes go through the
vdfuse server. A driver mounted on its own (:func:`~diskhandler.filesystems.mount_filesystem` without
a vdfuse view) gets a small watcher process of its own (this module, run with the standard library only).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from diskhandler.errors import FilesystemError

__all__ = [
    "ChildProcess",
    "ForkedChild",
    "Lifeline",
    "LifelineWatcher",
    "detach",
    "is_mountpoint",
    "stop_child",
    "wait_mounted",
    "wait_ready",
]

READY = b"R"
# How long a guarded driver gets to flush and unmount after its owner died, before it is killed.
DRIVER_GRACE = 20.0


def _filesystem_error(code: int, message: str, path: str | None = None) -> FilesystemError:
    # imported on use: the standalone watcher runs this module without the diskhandler package
    from diskhandler.errors import FilesystemError  # noqa: PLC0415

    return FilesystemError(code, message, path)


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
        # Freeze the owner's objects, garbage included: the child never collects them, so no file
        # object of the owner's is finalised here and closes a descriptor number the child has since
        # reused. (gc.collect() did the same but costs tens of milliseconds in a large process.) Then
        # only ``keep_fds`` survive (no descriptor, no image lock of the owner).
        gc.freeze()
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
            raise _filesystem_error(errno.ETIMEDOUT, f"{what} was not ready within {timeout} s")
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
    # /proc/self/mountinfo reports a change of the mount table as POLLPRI: wake up at once, not at
    # the next tick of a sleep loop (20 ms is a fifth of a small transfer's whole time).
    with open("/proc/self/mountinfo", "rb") as table:
        changes = select.poll()
        changes.register(table, select.POLLPRI | select.POLLERR)
        while True:
            table.seek(0)
            table.read()  # re-arms the notification
            if is_mountpoint(mountpoint):
                return
            if process.poll() is not None:
                raise _filesystem_error(errno.EIO, failed(), str(mountpoint))
            if time.monotonic() > deadline:
                stop_child(process, mountpoint, timeout=10.0, what="the driver")
                raise _filesystem_error(errno.ETIMEDOUT, f"not mounted within {timeout} s", str(mountpoint))
            changes.poll(20)  # milliseconds: also notice a driver that exits without mounting


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
            _wait_exit(process, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            detach(mountpoint)
            raise _filesystem_error(
                errno.ETIMEDOUT, f"{what} did not stop within {timeout} s; killed", str(mountpoint)
            ) from None
    detach(mountpoint)
    return int(process.returncode)


def _wait_exit(process: ChildProcess, timeout: float) -> None:
    """Wait for ``process`` to exit and reap it, woken by its pidfd the moment it does."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:  # already reaped, or no pidfd_open (Linux < 5.3): the polling wait
        process.wait(timeout)
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    process.wait(0 if ready else 0.001)


# -- the lifeline ---------------------------------------------------------------------------------

# Write ends held by this process; a forked child closes them all at once (see _close_in_child).
_WRITE_ENDS: weakref.WeakSet[Lifeline] = weakref.WeakSet()


def _close_in_child() -> None:
    for lifeline in list(_WRITE_ENDS):
        lifeline._forget()


os.register_at_fork(after_in_child=_close_in_child)


class Lifeline:
    """The owner's side: a pipe whose write end only the owner holds.

    Create it before starting the child, give the child :attr:`read_fd` (then :meth:`child_started`
    closes the owner's copy), tell it what to guard with :meth:`guard`, and :meth:`close` it once the
    child has been stopped the normal way. Its end-of-file tells the child the owner is gone.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        _WRITE_ENDS.add(self)
        # Dropped without close() (a mount object forgotten while mounted): the write end closes
        # with it, and the child stops as if the owner had gone, instead of running until exit.
        self._on_drop = weakref.finalize(self, _close_quietly, self._write_fd)
        self._on_drop.atexit = False  # at exit the owner unmounts in order; the kernel closes the rest

    def child_started(self) -> None:
        """Close the owner's copy of the read end (the child has its own)."""
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def guard(self, pid: int | None, mountpoint: str | os.PathLike[str]) -> None:
        """When the owner dies, the watcher stops ``pid`` (``None``: a kernel mount) and unmounts."""
        self._send({"guard": pid, "mountpoint": os.fspath(mountpoint)})

    def release(self, pid: int | None, mountpoint: str | os.PathLike[str]) -> None:
        """The guarded driver has been stopped normally: the watcher forgets it."""
        self._send({"release": pid, "mountpoint": os.fspath(mountpoint)})

    def _send(self, message: dict[str, Any]) -> None:
        if self._write_fd < 0:
            return
        line = _encode(message)
        if len(line) > select.PIPE_BUF:  # atomic writes only; mount points are short
            raise ValueError(f"mount point too long for the lifeline: {message['mountpoint']!r}")
        with contextlib.suppress(BrokenPipeError):  # the child is gone: nothing left to guard
            os.write(self._write_fd, line)

    def close(self) -> None:
        """Close both ends (a no-op when closed)."""
        self.child_started()
        if self._write_fd >= 0:
            self._on_drop()  # closes the write end, once
            self._write_fd = -1
        _WRITE_ENDS.discard(self)

    def _forget(self) -> None:
        """In a forked child: close the owner's write end without touching the owner's copy."""
        self._on_drop()  # the child's copy of the write end (the owner's stays open)
        self._write_fd = -1
        _WRITE_ENDS.discard(self)


def _encode(message: dict[str, Any]) -> bytes:
    """One lifeline message: ``guard|release PID|- MOUNTPOINT-AS-HEX`` and a newline (no json import)."""
    verb = "guard" if "guard" in message else "release"
    pid = message[verb]
    return f"{verb} {pid if pid is not None else '-'} {os.fsencode(message['mountpoint']).hex()}\n".encode()


def _decode(line: bytes) -> dict[str, Any]:
    verb, pid, mountpoint = line.decode("ascii").split()
    if verb not in ("guard", "release"):
        raise ValueError(f"unknown lifeline message {verb!r}")
    return {verb: None if pid == "-" else int(pid), "mountpoint": os.fsdecode(bytes.fromhex(mountpoint))}


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _Guarded:
    def __init__(self, pid: int | None, mountpoint: str) -> None:
        self.pid = pid
        self.mountpoint = mountpoint
        self.pidfd = -1
        if pid is not None:
            with contextlib.suppress(OSError):  # already gone: only the mount point is left to check
                self.pidfd = os.pidfd_open(pid)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _exited(self, timeout: float) -> bool:
        if self.pidfd < 0:
            return True
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(ready)

    def _signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def stop(self, grace: float) -> None:
        """Stop the driver the clean way (flush, unmount), kill it when it hangs, then detach its mount."""
        if self.pid is None:  # a kernel mount: umount flushes; lazily when busy
            subprocess.run(["umount", self.mountpoint], capture_output=True, check=False)
        else:
            self._signal(signal.SIGTERM)
            if not self._exited(grace):
                self._signal(signal.SIGKILL)
                self._exited(5.0)
        detach(self.mountpoint)
        self.close()


class LifelineWatcher:
    """The child's side: reads guard messages from the lifeline; on end-of-file, stops what it guards.

    Args:
        fd: the lifeline's read end (owned from now on).
        on_owner_gone: called, in the watcher's thread, once every guarded driver has been stopped.
        grace: how long a guarded driver gets to flush and unmount before it is killed.
    """

    def __init__(self, fd: int, on_owner_gone: Callable[[], None], *, grace: float = DRIVER_GRACE) -> None:
        self._fd = fd
        self._on_owner_gone = on_owner_gone
        self._grace = grace
        self._guarded: list[_Guarded] = []

    def start(self) -> threading.Thread:
        """Watch in a daemon thread."""
        thread = threading.Thread(target=self.run, name="lifeline", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Watch until the owner is gone, then stop the guarded drivers and call ``on_owner_gone``."""
        pending = b""
        while True:
            try:
                data = os.read(self._fd, 4096)
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._handle(line)
        os.close(self._fd)
        for guarded in reversed(self._guarded):  # the last mounted is the first to go
            guarded.stop(self._grace)
        self._guarded.clear()
        self._on_owner_gone()

    def _handle(self, line: bytes) -> None:
        try:
            message = _decode(line)
            mountpoint = str(message["mountpoint"])
        except (ValueError, KeyError, TypeError):
            return  # only the owner writes here; a garbled line is ignored rather than fatal
        if "guard" in message:
            pid = message["guard"]
            self._guarded.append(_Guarded(int(pid) if pid is not None else None, mountpoint))
        elif "release" in message:
            for guarded in [g for g in self._guarded if g.mountpoint == mountpoint]:
                guarded.close()
                self._guarded.remove(guarded)


# -- a watcher of its own, for a driver mounted without a vdfuse view ------------------------------


# The watcher runs this very file on its own: only the standard library, no diskhandler package (whose
# imports take a tenth of a second and 20 MiB), no site-packages, no environment (-I -S).
_WATCHER = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("_diskhandler_watcher", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[2:]))
"""


def spawn_watcher(lifeline: Lifeline) -> subprocess.Popen[bytes]:
    """Start a watcher process for ``lifeline`` (for drivers mounted outside a vdfuse stack)."""
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHER, os.path.abspath(__file__), str(lifeline.read_fd)],
        pass_fds=(lifeline.read_fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    lifeline.child_started()
    return process


def main(argv: list[str] | None = None) -> int:
    """The watcher process: ``python -m diskhandler._fusechild FD`` (or this file run on its own)."""
    args = sys.argv[1:] if argv is None else argv
    LifelineWatcher(int(args[0]), lambda: None).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
