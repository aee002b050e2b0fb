"""Overlay rollback: the system disk is a throwaway qcow2 overlay over a read-only base.

The overlay is created before the domain is defined (or started, if it went missing) and replaced by a
fresh one while the domain is shut off, so no file is touched while QEMU has it open. QEMU reads raw,
VDI, VMDK, VHD and qcow2 bases through a qcow2 overlay.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Final

from . import _domain_info
from ._libvirt import SNAPSHOT_DELETE_METADATA_ONLY
from .errors import ConfigError, DiskNotFoundError, UnsupportedOperationError
from .state import STOPPED

if TYPE_CHECKING:
    from .machine import VirtualMachine

__all__ = ["OVERLAY_SUFFIX", "create_overlay", "discard", "ensure", "overlay_bases"]

OVERLAY_SUFFIX: Final = ".vmanager-overlay.qcow2"


@functools.lru_cache(maxsize=256)
def overlay_bases(text: str) -> tuple[tuple[Path, Path, str], ...]:
    """(overlay, base, base format) for each disk of a domain XML that is a vmanager overlay."""
    out = []
    for disk in _domain_info.disks(text):
        if disk.path is None or not disk.path.name.endswith(OVERLAY_SUFFIX):
            continue
        if not disk.chain:
            raise ConfigError("rollback", f"overlay {disk.path} has no backing file in the domain XML")
        base, fmt = disk.chain[0]
        out.append((disk.path, base, fmt))
    return tuple(out)


def create_overlay(overlay: Path, base: Path, fmt: str, field: str = "hd_location") -> None:
    """A fresh qcow2 overlay over ``base`` (which QEMU then opens read-only through it)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise UnsupportedOperationError("overlays need qemu-img (Debian package qemu-utils)")
    if not base.exists():
        raise DiskNotFoundError(field, base)
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    cmd = [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base.absolute()), "-F", fmt, str(overlay)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(field, f"cannot create an overlay over {base}: {proc.stderr.strip()}")


def ensure(xml: str) -> None:
    """Re-create overlays that went missing while the domain was off (before it starts)."""
    for overlay, base, fmt in overlay_bases(xml):
        if not overlay.exists():
            create_overlay(overlay, base, fmt)


def discard(vm: VirtualMachine) -> None:
    """See :meth:`VirtualMachine.discard_overlay`."""
    vm._require("discard the overlay of", *STOPPED)
    bases = overlay_bases(vm.xml_desc())
    if not bases:
        raise UnsupportedOperationError(
            f"VM {vm.name!r} has no overlay; define it with rollback='overlay' (VirtualMachine.with_overlay)"
        )
    for snap in vm._dom.snapshots():
        snap.delete(SNAPSHOT_DELETE_METADATA_ONLY)
    for overlay, base, fmt in bases:
        overlay.unlink(missing_ok=True)
        create_overlay(overlay, base, fmt)
