"""Errors raised by vmanager.

Every error vmanager raises on purpose derives from :class:`VManagerError`, and also from the builtin
exception it *is*, so ``except LookupError`` or ``except TimeoutError`` in a caller keeps working.
``libvirt.libvirtError`` never escapes vmanager: it is translated at one boundary (``vmanager._libvirt``)
into the most specific class below and chained (``raise ... from``), so ``__cause__`` keeps libvirt's
own message and error code::

    VManagerError
    ├── HypervisorConnectionError (ConnectionError)  the hypervisor URI cannot be opened / was lost
    ├── ConfigError (ValueError)                     a VMConfig value (or the domain XML) is invalid
    ├── DiskNotFoundError (FileNotFoundError)        a disk, ISO, kernel or initrd file does not exist
    ├── DiskInUseError                               a disk is attached to another domain (named)
    ├── DomainNotFoundError (LookupError)            no domain of that name on the connection
    ├── SnapshotNotFoundError (LookupError)          no snapshot of that name (lists the ones that exist)
    ├── SnapshotExistsError                          a snapshot of that name already exists
    ├── UnsupportedOperationError                    the driver / disk format cannot do it (says what to do)
    ├── VMStateError                                 the domain is in the wrong run state for the operation
    ├── VMTimeoutError (TimeoutError)                a wait (shutdown, state, console) ran out of time
    └── HypervisorError                              any other failure reported by libvirt
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import RunState

__all__ = [
    "ConfigError",
    "DiskInUseError",
    "DiskNotFoundError",
    "DomainNotFoundError",
    "HypervisorConnectionError",
    "HypervisorError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "UnsupportedOperationError",
    "VMStateError",
    "VMTimeoutError",
    "VManagerError",
]


class VManagerError(Exception):
    """Root of every error vmanager raises on purpose."""


class HypervisorConnectionError(VManagerError, ConnectionError):
    """The hypervisor at ``uri`` cannot be reached (or the connection broke)."""

    def __init__(self, uri: str, message: str) -> None:
        self.uri = uri
        self.message = message
        super().__init__(f"cannot connect to hypervisor {uri!r}: {message}")


class ConfigError(VManagerError, ValueError):
    """A configuration value is invalid; ``field`` names it (``None`` for the whole config)."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class DiskNotFoundError(VManagerError, FileNotFoundError):
    """A file the VM needs (disk image, ISO, kernel, initrd) does not exist.

    ``field`` is the config field that names it (e.g. ``hd_location``), ``path`` the missing file.
    """

    def __init__(self, field: str, path: str | Path) -> None:
        self.field = field
        self.path = Path(path)
        super().__init__(2, f"{field}: no such file: {self.path}", str(self.path))

    def __str__(self) -> str:
        return f"{self.field}: no such file: {self.path}"


class DiskInUseError(VManagerError):
    """A disk image is already attached to another domain on the same connection.

    Two VMs writing one image corrupt it; the check runs before a domain is defined or started.
    """

    def __init__(self, path: str | Path, vm: str, other_vm: str) -> None:
        self.path = Path(path)
        self.vm = vm
        self.other_vm = other_vm
        super().__init__(
            f"disk {self.path} of VM {vm!r} is attached to VM {other_vm!r}; "
            f"detach it there (or undefine {other_vm!r}) first"
        )


class DomainNotFoundError(VManagerError, LookupError):
    """No domain called ``name`` exists on the connection."""

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        super().__init__(f"no VM named {name!r} on {uri!r}; pass config=... to define it")

    def __str__(self) -> str:  # LookupError would quote the whole message otherwise
        return str(self.args[0])


class SnapshotNotFoundError(VManagerError, LookupError):
    """No snapshot called ``name``; ``available`` lists the snapshots that do exist."""

    def __init__(self, vm: str, name: str, available: Iterable[str]) -> None:
        self.vm = vm
        self.name = name
        self.available = tuple(available)
        have = ", ".join(repr(n) for n in self.available) if self.available else "none"
        super().__init__(f"VM {vm!r} has no snapshot {name!r} (snapshots: {have})")

    def __str__(self) -> str:
        return str(self.args[0])


class SnapshotExistsError(VManagerError):
    """A snapshot called ``name`` already exists on the VM."""

    def __init__(self, vm: str, name: str) -> None:
        self.vm = vm
        self.name = name
        super().__init__(f"VM {vm!r} already has a snapshot {name!r}; delete it or pick another name")


class UnsupportedOperationError(VManagerError):
    """The hypervisor driver, or the VM's disks, cannot do what was asked; the message says what would."""


class VMStateError(VManagerError):
    """The operation needs the VM in one of ``required`` states but it is in ``state``."""

    def __init__(self, vm: str, operation: str, state: RunState, required: Iterable[RunState]) -> None:
        self.vm = vm
        self.operation = operation
        self.state = state
        self.required = tuple(required)
        need = " or ".join(s.name for s in self.required)
        super().__init__(f"cannot {operation} VM {vm!r}: it is {state.name}, needs {need}")


class VMTimeoutError(VManagerError, TimeoutError):
    """``operation`` did not finish within ``timeout`` seconds."""

    def __init__(self, vm: str, operation: str, timeout: float, detail: str = "") -> None:
        self.vm = vm
        self.operation = operation
        self.timeout = timeout
        msg = f"VM {vm!r}: {operation} did not finish within {timeout:g} s"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class HypervisorError(VManagerError):
    """libvirt reported a failure that has no more specific class; ``code`` is libvirt's error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        self.message = message
        super().__init__(message)
