"""vmanager: virtual machines over libvirt.

::

    from vmanager import VirtualMachine, VMConfig

    vm = VirtualMachine("demo", "test:///default", config={"name": "demo", "memory": "256",
                                                           "hd_location": "disk.qcow2"})
    vm.start()
    vm.snapshot("clean", description="before the test")
    vm.rollback("clean")
    vm.stop()

``VirtualMachine(name, uri=None, config=None)``: ``uri=None`` runs libvirt's QEMU driver inside this
process (``qemu:///embed``, no daemon). ``from vmanager import *`` gives the names below.
"""

from __future__ import annotations

from ._accel import detect_accelerator
from ._diskformat import DiskFormat
from ._domain_xml import domain_xml
from ._libvirt import Connection, connect, default_uri
from ._snapshots import Snapshot
from .compat import PyTICompat
from .config import Channel, Disk, VMConfig
from .errors import (
    ConfigError,
    DiskInUseError,
    DiskNotFoundError,
    DomainNotFoundError,
    HypervisorConnectionError,
    HypervisorError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
    VManagerError,
    VMStateError,
    VMTimeoutError,
)
from .machine import VirtualMachine
from .state import RunState

__all__ = [
    "Channel",
    "ConfigError",
    "Connection",
    "Disk",
    "DiskFormat",
    "DiskInUseError",
    "DiskNotFoundError",
    "DomainNotFoundError",
    "HypervisorConnectionError",
    "HypervisorError",
    "PyTICompat",
    "RunState",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "UnsupportedOperationError",
    "VMConfig",
    "VMStateError",
    "VMTimeoutError",
    "VManagerError",
    "VirtualMachine",
    "connect",
    "default_uri",
    "detect_accelerator",
    "domain_xml",
]
