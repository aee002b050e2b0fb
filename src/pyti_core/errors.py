"""Errors raised by pyti_core.

Every error pyti_core raises on purpose derives from :class:`PytiError`, and also from the builtin
exception it *is*, so ``except ValueError`` or ``except OSError`` in a caller keeps working::

    PytiError
    ├── RawDataError (ValueError)       a raw-data record is not JSON, too large, or breaks the schema
    │   └── ChannelFrameError           a live-channel frame from the guest is not a valid event
    ├── GuestImageError                 the tiny guest could not be built (package missing, tool failed)
    │   ├── CpioEntryError (ValueError) an entry cannot go into a newc cpio archive
    │   └── ImagePrepareError           a user's disk image cannot take the agent (no init system, no python3)
    ├── ConfigError (ValueError)        a job file is unreadable TOML or has a missing/mistyped key
    ├── TaskError (ValueError)          a task or recipe cannot be built (unknown recipe, bad kind, ...)
    ├── TaskManagerClosedError (RuntimeError)
    │                                   a job was submitted to a TaskManager after close()
    ├── PackageError (OSError)          pip could not resolve, download or build what the guest needs
    │   └── UnsafeArchiveError          an sdist holds a path that would land outside its folder
    ├── FarmError                       the farm (Dask) could not do its work
    │   ├── SchedulerLostError (ConnectionError)
    │   │                               the Dask scheduler could not be reached, or went away mid-run
    │   └── LedgerError                 the ledger file is not a pyti ledger, damaged, or missing
    │       └── LedgerInUseError        another submitter holds the ledger's lock
    └── GuestRunError                   a run's VM or IO disk failed where no record can say it (.serial_log)
        └── GuestBootError (TimeoutError)
                                        the guest did not report ready within its boot timeout
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ChannelFrameError",
    "ConfigError",
    "CpioEntryError",
    "FarmError",
    "GuestBootError",
    "GuestImageError",
    "GuestRunError",
    "ImagePrepareError",
    "LedgerError",
    "LedgerInUseError",
    "PackageError",
    "PytiError",
    "RawDataError",
    "SchedulerLostError",
    "TaskError",
    "TaskManagerClosedError",
    "UnsafeArchiveError",
]


class PytiError(Exception):
    """Root of every error pyti_core raises on purpose."""


class RawDataError(PytiError, ValueError):
    """A raw-data record (or report) is not valid: not JSON, oversized, or missing/mistyped fields.

    ``record`` is the index of the offending record in its file when known, else ``None``.
    """

    def __init__(self, message: str, *, record: int | None = None) -> None:
        self.record = record
        where = f"record {record}: " if record is not None else ""
        super().__init__(f"{where}{message}")


class ChannelFrameError(RawDataError):
    """A frame the guest sent on the live channel is not a valid event (JSON, JSON-RPC 2.0, schema).

    The host drops such a frame and counts it; it never reaches the caller of a run.
    """


class ConfigError(PytiError, ValueError):
    """A job file cannot be used. ``path`` is the file, ``key`` the dotted key at fault (or ``None``)."""

    def __init__(self, path: str | Path | None, key: str | None, message: str) -> None:
        self.path = Path(path) if path is not None else None
        self.key = key
        self.message = message
        where = [str(self.path)] if self.path is not None else []
        if key:
            where.append(key)
        super().__init__(": ".join([*where, message]))


class TaskError(PytiError, ValueError):
    """A task, recipe or agent job cannot be built from what was given."""


class TaskManagerClosedError(PytiError, RuntimeError):
    """A job was submitted to a :class:`~pyti_core.task_manager.TaskManager` that is closed."""


class PackageError(PytiError, OSError):
    """Resolving, downloading, building or unpacking a distribution failed.

    ``command`` is pip's argv when pip failed (else empty), ``stderr`` the tail of its error output.
    """

    def __init__(self, message: str, *, command: Sequence[str] = (), stderr: str = "") -> None:
        self.command = tuple(command)
        self.stderr = stderr
        self.message = message
        text = message
        if stderr.strip():
            text = f"{message}\n--- pip said (last lines) ---\n{stderr.rstrip()}"
        super().__init__(text)

    def __str__(self) -> str:  # OSError's own __str__ would show the args tuple
        return str(self.args[0]) if self.args else self.message


class UnsafeArchiveError(PackageError):
    """An archive (sdist) contains a member that is absolute, climbs out with ``..``, or is too large."""


class FarmError(PytiError):
    """The farm could not do its work (see :mod:`pyti_core.farm`)."""


class SchedulerLostError(FarmError, ConnectionError):
    """The Dask scheduler at ``address`` could not be reached or went away while jobs were running.

    Nothing is lost: every result that arrived is in the ledger, and running the same command again
    resumes the rest.
    """

    def __init__(self, address: str, message: str) -> None:
        self.address = address
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # ConnectionError (an OSError) would show the args tuple
        return self.message


class LedgerError(FarmError):
    """The ledger at ``path`` cannot be used: not a pyti ledger, damaged, missing, or closed."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class LedgerInUseError(LedgerError):
    """Another process is submitting jobs with this ledger (it holds ``<ledger>.lock``)."""


class GuestImageError(PytiError):
    """The tiny guest could not be built: a package is missing, a tool failed, or a file is malformed.

    ``command`` and ``output`` hold the failing command and what it printed, when one failed.
    """

    def __init__(self, message: str, *, command: Sequence[str] | None = None, output: str = "") -> None:
        self.command = tuple(command) if command is not None else None
        self.output = output
        detail = f"\n{output.strip()}" if output.strip() else ""
        super().__init__(f"{message}{detail}")


class CpioEntryError(GuestImageError, ValueError):
    """An entry cannot go into a newc cpio archive (bad or duplicate name, file too large)."""


class ImagePrepareError(GuestImageError):
    """A user's disk image cannot take the agent: no systemd or SysV init, no ``python3``, read-only, ...

    ``image`` is the disk image's path.
    """

    def __init__(self, image: str | Path, message: str) -> None:
        self.image = Path(image)
        super().__init__(f"{self.image}: {message}")


class GuestRunError(PytiError):
    """A run failed where no raw-data record can describe it.

    The VM could not be defined, started or stopped, or the IO disk could not be made or read back.
    ``serial_log`` holds what the guest wrote on its serial console (empty if it never ran), ``vm`` the
    name of the VM. The cause (a vmanager or diskhandler error) is chained as ``__cause__``.
    """

    def __init__(self, message: str, *, vm: str = "", serial_log: str = "") -> None:
        self.message = message
        self.vm = vm
        self.serial_log = serial_log
        super().__init__(message)


class GuestBootError(GuestRunError, TimeoutError):
    """The guest did not print its ready marker within ``timeout`` seconds (or stopped before it).

    The message ends with the last lines of the serial console; ``serial_log`` holds all of it.
    """

    def __init__(self, message: str, *, vm: str = "", serial_log: str = "", timeout: float = 0.0) -> None:
        self.timeout = timeout
        tail = "\n".join(serial_log.rstrip().splitlines()[-_BOOT_TAIL_LINES:])
        text = f"{message}\n--- serial console (last lines) ---\n{tail}" if tail else message
        super().__init__(text, vm=vm, serial_log=serial_log)

    def __str__(self) -> str:  # TimeoutError (an OSError) would show the args tuple
        return str(self.args[0]) if self.args else self.message


_BOOT_TAIL_LINES = 40


def vmanager_errors() -> tuple[type[Exception], ...]:
    """``(vmanager.VManagerError,)`` for an ``except`` clause, or ``()`` when vmanager cannot load.

    pyti_core imports vmanager (and libvirt with it) only where a VM runs, so that records, reports and
    the agent work on a host without libvirt-python.
    """
    try:
        from vmanager import VManagerError  # noqa: PLC0415
    except ImportError:
        return ()
    return (VManagerError,)
