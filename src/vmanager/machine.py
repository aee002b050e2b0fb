"""VirtualMachine: one libvirt domain, its run state, its snapshots and its serial console.

::

    from vmanager import VirtualMachine, VMConfig

    config = VMConfig(name="demo", memory=256, hd_location="disk.qcow2", serial_log="serial.log")
    with VirtualMachine("demo", "test:///default", config=config) as vm:
        vm.start()
        vm.snapshot("clean", description="fresh install")
        ...
        vm.rollback("clean")      # back to the snapshot, in the run state it was taken in

The first argument is the libvirt domain name and wins over ``config.name``, which becomes the domain's
``<title>`` when the two differ. With a config, the domain is defined (persistently) unless a domain of
that name already exists, in which case the VM attaches to it and the config's hardware is not applied
(undefine the domain first to change it). Everything else (disks, overlays, serial log) is read back
from the domain's own XML, so a VM attached by name alone works the same.
"""

from __future__ import annotations

import codecs
import datetime as dt
import enum
import functools
import heapq
import html
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from xml.sax.saxutils import escape as xml_escape

import attrs

from . import _libvirt as lv
from ._accel import detect_accelerator
from ._domain_xml import plan_disks
from .config import VMConfig
from .errors import (
    ConfigError,
    DiskInUseError,
    DiskNotFoundError,
    DomainNotFoundError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
    VManagerError,
    VMStateError,
    VMTimeoutError,
)

__all__ = ["RunState", "Snapshot", "VirtualMachine"]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_POLL: Final = 0.05
_CONSOLE_KEEP: Final = 4 << 20
OVERLAY_SUFFIX: Final = ".vmanager-overlay.qcow2"


class RunState(enum.Enum):
    """A domain's run state (libvirt's ``virDomainState``)."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4  # shutting down
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


_STATES: Final = tuple(RunState)
_SNAPSHOT_STATES: Final = {
    "nostate": RunState.NOSTATE,
    "running": RunState.RUNNING,
    "blocked": RunState.BLOCKED,
    "paused": RunState.PAUSED,
    "shutdown": RunState.SHUTDOWN,
    "shutoff": RunState.SHUTOFF,
    "crashed": RunState.CRASHED,
    "pmsuspended": RunState.PMSUSPENDED,
    "disk-snapshot": RunState.SHUTOFF,
}
_REFUSES_DUPLICATE_SNAPSHOTS: Final = frozenset({"qemu", "test"})
_STOPPED: Final = (RunState.SHUTOFF, RunState.CRASHED, RunState.NOSTATE)
_ACTIVE: Final = (
    RunState.RUNNING,
    RunState.BLOCKED,
    RunState.PAUSED,
    RunState.SHUTDOWN,
    RunState.PMSUSPENDED,
)


@attrs.frozen
class Snapshot:
    """One snapshot of a VM, as libvirt records it.

    ``state`` is the VM's run state when the snapshot was taken (a rollback restores it), ``parent`` and
    ``children`` are snapshot names, ``is_current`` marks the snapshot the VM last reverted to or took.
    """

    name: str
    description: str
    parent: str | None
    children: tuple[str, ...]
    created: dt.datetime
    state: RunState
    is_current: bool

    def _repr_html_(self) -> str:
        cur = " (current)" if self.is_current else ""
        desc = html.escape(self.description) or "<i>no description</i>"
        return (
            f"<b>{html.escape(self.name)}</b>{cur}: {desc}"
            f" — {self.state.name}, {self.created:%Y-%m-%d %H:%M:%S}"
            f", parent {html.escape(self.parent or '-')}"
        )


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(kind, f"{name!r} is not a valid name (1-64 of letters, digits, '._+-')")
    return name


# Domain XML is parsed once per distinct text: libvirt hands out a fresh string on every call, and a
# start() must look at every running domain's disks, so parsing would otherwise dominate its cost.
@functools.lru_cache(maxsize=256)
def _parse_xml(text: str) -> ET.Element:
    """Parsed domain XML (cached by text; callers never modify the tree)."""
    return ET.fromstring(text)


@functools.lru_cache(maxsize=256)
def _disk_uses(text: str) -> dict[str, bool]:
    """Absolute paths of the files a domain's disks use (CD-ROMs excluded) -> written by it?"""
    uses: dict[str, bool] = {}
    for disk in _parse_xml(text).iterfind("devices/disk"):
        if disk.get("device", "disk") not in {"disk", "lun"}:
            continue
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if path:
            shared = disk.find("readonly") is not None or disk.find("shareable") is not None
            uses[os.path.abspath(path)] = uses.get(os.path.abspath(path), False) or not shared
        for backing in disk.iter("backingStore"):
            bsrc = backing.find("source")
            if bsrc is not None and bsrc.get("file"):
                uses.setdefault(os.path.abspath(bsrc.get("file", "")), False)
    return uses


@functools.lru_cache(maxsize=256)
def _overlay_bases(text: str) -> tuple[tuple[Path, Path, str], ...]:
    """(overlay, base, base format) for each disk that is a vmanager overlay."""
    out = []
    for disk in _parse_xml(text).iterfind("devices/disk"):
        source = disk.find("source")
        path = source.get("file", "") if source is not None else ""
        if not path.endswith(OVERLAY_SUFFIX):
            continue
        backing = disk.find("backingStore")
        bsrc = backing.find("source") if backing is not None else None
        bfmt = backing.find("format") if backing is not None else None
        if bsrc is None or not bsrc.get("file"):
            raise ConfigError("rollback", f"overlay {path} has no backing file in the domain XML")
        fmt = bfmt.get("type", "raw") if bfmt is not None else "raw"
        out.append((Path(path), Path(bsrc.get("file", "")), fmt))
    return tuple(out)


def _serial_log(root: ET.Element) -> Path | None:
    for serial in root.iterfind("devices/serial"):
        log = serial.find("log")
        if log is not None and log.get("file"):
            return Path(log.get("file", ""))
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None and source.get("path"):
            return Path(source.get("path", ""))
    return None


class VirtualMachine:
    """A libvirt domain with a run-state guard, snapshots, overlay rollback and a serial console.

    ``uri`` is a hypervisor URI (``None``: ``qemu:///embed`` under the user cache dir, see
    :func:`vmanager.default_uri`), an open ``libvirt.virConnect`` or a :class:`vmanager.Connection`. A
    connection given as a URI is owned and closed by :meth:`close` / the ``with`` block; an injected one
    is left open. ``config`` is a :class:`VMConfig` or a dict for :meth:`VMConfig.from_dict`.

    Used as a context manager the VM is shut down on exit (ACPI, then forced after
    ``shutdown_timeout`` seconds), so no running domain is left behind; the definition stays.
    """

    def __init__(
        self,
        name: str,
        uri: str | lv.Connection | Any | None = None,
        config: VMConfig | Mapping[str, Any] | None = None,
        *,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.name: str = _check_name("name", name)
        if isinstance(config, Mapping):
            config = VMConfig.from_dict({"name": name, **config})
        elif config is not None and not isinstance(config, VMConfig):
            raise ConfigError("config", f"expected a VMConfig or a dict, got {type(config).__name__}")
        self.config: VMConfig | None = config
        self.shutdown_timeout = shutdown_timeout
        self._owns_connection = uri is None or isinstance(uri, str)
        if uri is None or isinstance(uri, str):
            self.connection = lv.Connection(uri)
        elif isinstance(uri, lv.Connection):
            self.connection = uri
        else:
            self.connection = lv.Connection.wrap(uri)
        self._console: lv.ConsoleStream | None = None
        self._undefined = False
        self._console_decoder = _utf8_decoder()
        try:
            dom = self.connection.find(name)
            if dom is None:
                if config is None:
                    raise DomainNotFoundError(name, self.connection.uri)
                dom = self._define(config)
        except Exception:
            if self._owns_connection:
                self.connection.close()
            raise
        self._dom: lv.Domain = dom

    @classmethod
    def with_overlay(
        cls,
        name: str,
        uri: str | lv.Connection | Any | None = None,
        config: VMConfig | Mapping[str, Any] | None = None,
        *,
        overlay_dir: str | Path | None = None,
        shutdown_timeout: float = 30.0,
    ) -> VirtualMachine:
        """A VM whose system disk is a read-only base under a throwaway qcow2 overlay (QEMU only).

        :meth:`rollback` without a name then discards every change since the base (milliseconds when
        the VM is shut off), whatever the base's format (raw, VDI, VMDK, VHD, qcow2). The overlay is
        made on this machine, so the hypervisor must be local too.
        """
        if isinstance(config, Mapping):
            config = VMConfig.from_dict({"name": name, **config})
        if config is None:
            raise ConfigError("config", "with_overlay needs a config with hd_location")
        changes: dict[str, Any] = {"rollback": "overlay"}
        if overlay_dir is not None:
            changes["overlay_dir"] = Path(overlay_dir)
        return cls(name, uri, attrs.evolve(config, **changes), shutdown_timeout=shutdown_timeout)

    # -- definition ---------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.connection.uri

    def _validate_paths(self, config: VMConfig) -> bool:
        if config.validate_paths is not None:
            return config.validate_paths
        return self.connection.family != "test" and self.connection.is_local

    def _domain_type(self, config: VMConfig) -> str | None:
        if self.connection.family != "qemu":
            return None
        if config.accel == "kvm":
            return "kvm"
        if config.accel == "tcg":
            return "qemu"
        if self.connection.is_local:
            cache = lv.user_cache_dir() / "pyti" / "accel.json"
            return "kvm" if detect_accelerator(cache) == "kvm" else "qemu"
        caps = self.connection.capabilities()
        return "kvm" if "<domain type='kvm'" in caps or '<domain type="kvm"' in caps else "qemu"

    def _overlay_dir(self, config: VMConfig | None) -> Path:
        if config is not None and config.overlay_dir is not None:
            return config.overlay_dir.absolute()
        return lv.user_cache_dir() / "pyti" / "overlays"

    def _define(self, config: VMConfig) -> lv.Domain:
        family = self.connection.family
        if self._validate_paths(config):
            for field, path in config.files():
                if not path.exists():
                    raise DiskNotFoundError(field, path)
        overlays: dict[str, Path] = {}
        if config.rollback == "overlay":
            if family != "qemu" or not self.connection.is_local:
                raise UnsupportedOperationError(
                    f"overlay rollback needs a local QEMU hypervisor, not {self.uri!r}; use snapshots"
                )
            system = next(p for p in plan_disks(config, family) if p.field == "hd_location")
            overlays[system.target] = (
                self._overlay_dir(config) / f"{self.name}-{system.target}{OVERLAY_SUFFIX}"
            )
        xml = config.to_xml(family, name=self.name, domain_type=self._domain_type(config), overlays=overlays)
        self._check_disks_free(xml, active_only=False)
        for target, overlay in overlays.items():
            base = next(p for p in plan_disks(config, family) if p.target == target)
            _create_overlay(overlay, base.path, base.format)
        try:
            return self.connection.define(self.name, xml)
        except VManagerError:
            for overlay in overlays.values():
                overlay.unlink(missing_ok=True)
            raise

    def _check_disks_free(self, xml: str, *, active_only: bool) -> None:
        """Raise :class:`DiskInUseError` if another domain uses one of our disks and either side writes."""
        mine = _disk_uses(xml)
        if not mine:
            return
        for other in self.connection.domains(active_only=active_only):
            try:
                other_name = other.name()
                if other_name == self.name:
                    continue
                theirs = _disk_uses(other.XMLDesc(0))
            except lv.LibvirtError:
                continue  # the other domain vanished while we looked
            for path, writes in theirs.items():
                if path in mine and (mine[path] or writes):
                    raise DiskInUseError(path, self.name, other_name)

    # -- state ------------------------------------------------------------------------------------

    def _err(self, exc: Exception, operation: str, snapshot: str | None = None) -> VManagerError:
        return lv.translate(exc, uri=self.uri, vm=self.name, operation=operation, snapshot=snapshot)

    def xml_desc(self) -> str:
        """The domain's current libvirt XML (what ``virsh dumpxml`` prints)."""
        try:
            return str(self._dom.XMLDesc(0))
        except lv.LibvirtError as exc:
            raise self._err(exc, "read definition") from exc

    _xml_text = xml_desc

    def disks(self) -> dict[str, Path]:
        """The file-backed disks (not CD-ROMs) the domain uses now, by target name (``vda``, ``hdb``...).

        With overlay rollback these are the overlays: the files holding the disks' current state.
        """
        out: dict[str, Path] = {}
        for disk in self._xml().iterfind("devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue
            source = disk.find("source")
            target = disk.find("target")
            if source is None or target is None or not source.get("file"):
                continue
            out[target.get("dev", "")] = Path(source.get("file", ""))
        return out

    def _xml(self) -> ET.Element:
        return _parse_xml(self._xml_text())

    @property
    def state(self) -> RunState:
        """The current run state, asked from the hypervisor."""
        try:
            code = self._dom.state()[0]
        except lv.LibvirtError as exc:
            raise self._err(exc, "state") from exc
        return _STATES[code] if 0 <= code < len(_STATES) else RunState.NOSTATE

    @property
    def is_running(self) -> bool:
        """True unless the VM is shut off (paused and shutting down count as running)."""
        return self.state in _ACTIVE

    def _require(self, operation: str, *allowed: RunState) -> RunState:
        state = self.state
        if state not in allowed:
            raise VMStateError(self.name, operation, state, allowed)
        return state

    def wait_for(self, state: RunState, timeout: float = 60.0) -> None:
        """Wait until the VM is in ``state``; :class:`VMTimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.state
            if current is state:
                return
            if time.monotonic() >= deadline:
                raise VMTimeoutError(self.name, f"wait for {state.name}", timeout, f"still {current.name}")
            time.sleep(_POLL)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the VM. It must be shut off; its disks must not be in use by a running domain."""
        self._require("start", *_STOPPED)
        xml = self._xml_text()
        self._check_disks_free(xml, active_only=True)
        self._ensure_overlays(xml)
        self._reset_console()
        try:
            self._dom.create()
        except lv.LibvirtError as exc:
            raise self._err(exc, "start") from exc

    def stop(self) -> None:
        """Power the VM off at once (like pulling the plug); a no-op when it is shut off."""
        if self._undefined:
            return
        self._reset_console()
        try:
            self._dom.destroy()  # no state query first: destroy() is the cheap call, failure is rare
        except lv.LibvirtError as exc:
            if self.state in _STOPPED:  # it went away by itself meanwhile
                return
            raise self._err(exc, "stop") from exc

    def shutdown(self, timeout: float | None = None) -> bool:
        """Ask the guest to power off (ACPI); force it off after ``timeout`` seconds.

        Returns True when the guest shut down by itself, False when it had to be forced. A no-op (True)
        when the VM is already shut off. ``timeout`` defaults to ``shutdown_timeout``.
        """
        timeout = self.shutdown_timeout if timeout is None else timeout
        if self._undefined:
            return True
        state = self.state
        if state in _STOPPED:
            return True
        try:
            if state is RunState.PAUSED:
                self._dom.resume()
            self._dom.shutdown()
        except lv.LibvirtError as exc:
            if self.state in _STOPPED:
                return True
            cause: VManagerError = self._err(exc, "shutdown")
        else:
            try:
                self.wait_for(RunState.SHUTOFF, timeout)
                self._reset_console()
                return True
            except VMTimeoutError as exc:
                cause = exc
        try:
            self.stop()
        except VManagerError as exc:
            raise VMTimeoutError(self.name, "shutdown", timeout, f"forced stop failed too: {exc}") from cause
        return False

    def pause(self) -> None:
        """Freeze the running VM's CPUs."""
        self._require("pause", RunState.RUNNING, RunState.BLOCKED)
        try:
            self._dom.suspend()
        except lv.LibvirtError as exc:
            raise self._err(exc, "pause") from exc

    def resume(self) -> None:
        """Let a paused VM run again."""
        self._require("resume", RunState.PAUSED)
        try:
            self._dom.resume()
        except lv.LibvirtError as exc:
            raise self._err(exc, "resume") from exc

    def reboot(self) -> None:
        """Ask the guest to reboot (ACPI)."""
        self._require("reboot", RunState.RUNNING, RunState.BLOCKED)
        try:
            self._dom.reboot(0)
        except lv.LibvirtError as exc:
            raise self._err(exc, "reboot") from exc

    def undefine(self) -> None:
        """Stop the VM and remove it: definition, snapshots and the overlay files it created.

        Idempotent; afterwards only :meth:`stop`, :meth:`shutdown` and :meth:`close` (all no-ops) work.
        """
        if self._undefined:
            return
        self.stop()
        overlays = [overlay for overlay, _, _ in _overlay_bases(self._xml_text())]
        try:
            # Delete snapshots for real (QEMU keeps internal ones inside the qcow2 otherwise), newest
            # first so that no revert-able state is reparented needlessly.
            for snap in reversed(self._dom.listAllSnapshots(0)):
                snap.delete(0)
            self._dom.undefineFlags(lv.UNDEFINE_FLAGS)
        except lv.LibvirtError as exc:
            raise self._err(exc, "undefine") from exc
        self._undefined = True
        for overlay in overlays:
            overlay.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the console stream and, if this VM opened it, the connection. Idempotent."""
        self._reset_console()
        if self._owns_connection and not self.connection.closed:
            self.connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self.connection.closed:
                self.shutdown()
        finally:
            self.close()

    # -- overlays ------------------------------------------------------------------------------------

    @property
    def uses_overlay(self) -> bool:
        """True when the system disk is a throwaway overlay (``rollback="overlay"``)."""
        return bool(_overlay_bases(self._xml_text()))

    def _ensure_overlays(self, xml: str) -> None:
        for overlay, base, fmt in _overlay_bases(xml):
            if not overlay.exists():
                _create_overlay(overlay, base, fmt)

    def discard_overlay(self) -> None:
        """Throw the overlay away and start over from the base image; the VM must be shut off.

        Snapshots taken on the overlay go with it (their metadata is deleted).
        """
        self._require("discard the overlay of", *_STOPPED)
        bases = _overlay_bases(self._xml_text())
        if not bases:
            raise UnsupportedOperationError(
                f"VM {self.name!r} has no overlay; define it with rollback='overlay' "
                "(VirtualMachine.with_overlay)"
            )
        try:
            for snap in self._dom.listAllSnapshots(0):
                snap.delete(lv.SNAPSHOT_DELETE_METADATA_ONLY)
        except lv.LibvirtError as exc:
            raise self._err(exc, "discard snapshots") from exc
        for overlay, base, fmt in bases:
            overlay.unlink(missing_ok=True)
            _create_overlay(overlay, base, fmt)

    # -- snapshots -----------------------------------------------------------------------------------

    def _check_can_snapshot(self, root: ET.Element, running: bool) -> None:
        """Refuse up front what the driver would refuse halfway (or get wrong)."""
        if self.connection.family != "qemu":
            return
        qcow2 = 0
        for disk in root.iterfind("devices/disk"):
            if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
                continue
            driver = disk.find("driver")
            fmt = driver.get("type", "raw") if driver is not None else "raw"
            target = disk.find("target")
            dev = target.get("dev", "?") if target is not None else "?"
            source = disk.find("source")
            path = source.get("file", "?") if source is not None else "?"
            if disk.get("snapshot") == "no":
                raise UnsupportedOperationError(
                    f"VM {self.name!r}: disk {dev} ({path}) is excluded from snapshots, but QEMU internal "
                    "snapshots (libvirt 9) must include every disk. Keep such an IO disk out of rollbacks "
                    "with overlay rollback (VMConfig(rollback='overlay') / VirtualMachine.with_overlay)"
                )
            if fmt == "qcow2":
                qcow2 += 1
            else:
                raise UnsupportedOperationError(
                    f"VM {self.name!r}: disk {dev} ({path}) is {fmt}; QEMU snapshots need qcow2 disks. "
                    "Convert it (qemu-img convert -O qcow2) or use overlay rollback "
                    "(VMConfig(rollback='overlay') / VirtualMachine.with_overlay)"
                )
        if running and qcow2 == 0:
            raise UnsupportedOperationError(
                f"VM {self.name!r}: a running QEMU VM's snapshot stores its memory in a qcow2 disk, and this "
                "VM has none; shut it off first or add a qcow2 disk"
            )

    def _snapshot_obj(self, name: str) -> lv.DomainSnapshot:
        try:
            return self._dom.snapshotLookupByName(name, 0)
        except lv.LibvirtError as exc:
            err = self._err(exc, "snapshot lookup", snapshot=name)
            if isinstance(err, SnapshotNotFoundError):
                raise SnapshotNotFoundError(self.name, name, self._snapshot_names()) from exc
            raise err from exc

    def _has_snapshot(self, name: str) -> bool:
        try:
            self._dom.snapshotLookupByName(name, 0)
        except lv.LibvirtError as exc:
            if lv.is_missing_snapshot(exc):
                return False
            raise self._err(exc, "snapshot lookup", snapshot=name) from exc
        return True

    def _snapshot_names(self) -> list[str]:
        try:
            return sorted(self._dom.snapshotListNames(0))
        except lv.LibvirtError as exc:
            raise self._err(exc, "list snapshots") from exc

    def snapshot(self, name: str, description: str = "") -> Snapshot:
        """Take a snapshot called ``name`` (running: memory and disks; shut off: disks)."""
        _check_name("snapshot name", name)
        family = self.connection.family
        # libvirt's QEMU and test drivers refuse a duplicate name themselves (checked after a failure,
        # below); VirtualBox keeps duplicates, so elsewhere look first.
        if family not in _REFUSES_DUPLICATE_SNAPSHOTS and self._has_snapshot(name):
            raise SnapshotExistsError(self.name, name)
        if family == "qemu":
            self._check_can_snapshot(self._xml(), self.state in _ACTIVE)
        desc = f"<description>{xml_escape(description)}</description>" if description else ""
        try:
            snap = self._dom.snapshotCreateXML(
                f"<domainsnapshot><name>{name}</name>{desc}</domainsnapshot>", 0
            )
            text = snap.getXMLDesc(0)
        except lv.LibvirtError as exc:
            if self._has_snapshot(name):
                raise SnapshotExistsError(self.name, name) from exc
            raise self._err(exc, "snapshot", snapshot=name) from exc
        return _parse_snapshot(_snapshot_head(text), (), True)

    def _snapshot_info(self, snap: lv.DomainSnapshot, *, current: bool | None = None) -> Snapshot:
        try:
            head = _snapshot_head(snap.getXMLDesc(0))
            children = tuple(sorted(snap.listChildrenNames(0)))
            is_current = bool(snap.isCurrent(0)) if current is None else current
        except lv.LibvirtError as exc:
            raise self._err(exc, "read snapshot") from exc
        return _parse_snapshot(head, children, is_current)

    def snapshots(self) -> list[Snapshot]:
        """All snapshots, oldest first, with parent, children and which one is current."""
        try:
            snaps = self._dom.listAllSnapshots(0)
            current = self._dom.snapshotCurrent(0).getName() if self._dom.hasCurrentSnapshot(0) else None
            roots = [_snapshot_head(s.getXMLDesc(0)) for s in snaps]
        except lv.LibvirtError as exc:
            raise self._err(exc, "list snapshots") from exc
        children: dict[str, list[str]] = {}
        for root in roots:
            parent = root.findtext("parent/name")
            if parent:
                children.setdefault(parent, []).append(root.findtext("name", ""))
        out = [
            _parse_snapshot(r, tuple(sorted(children.get(r.findtext("name", ""), []))), None) for r in roots
        ]
        return _oldest_first([attrs.evolve(s, is_current=s.name == current) for s in out])

    def snapshot_info(self, name: str) -> Snapshot:
        """One snapshot by name; :class:`SnapshotNotFoundError` names the ones that exist."""
        return self._snapshot_info(self._snapshot_obj(name))

    def current_snapshot(self) -> Snapshot | None:
        """The snapshot the VM last took or reverted to, if any."""
        try:
            if not self._dom.hasCurrentSnapshot(0):
                return None
            snap = self._dom.snapshotCurrent(0)
        except lv.LibvirtError as exc:
            raise self._err(exc, "current snapshot") from exc
        return self._snapshot_info(snap, current=True)

    def delete_snapshot(self, name: str, *, children: bool = False) -> None:
        """Delete snapshot ``name`` (and its descendants when ``children``); its children move up."""
        snap = self._snapshot_obj(name)
        try:
            snap.delete(lv.SNAPSHOT_DELETE_CHILDREN if children else 0)
        except lv.LibvirtError as exc:
            raise self._err(exc, "delete snapshot", snapshot=name) from exc

    def rollback(self, name: str | None = None) -> None:
        """Go back to snapshot ``name`` and to the run state it was taken in.

        A snapshot of a running VM leaves the VM running, one of a shut-off VM leaves it shut off.
        Without a name: on an overlay VM, discard the overlay (the disk is the base image again; a
        running VM is restarted fresh, a shut-off one stays off); otherwise revert to the current
        snapshot.
        """
        if name is None:
            if self.uses_overlay:
                was_running = self.state in _ACTIVE
                self.stop()
                self.discard_overlay()
                if was_running:
                    self.start()
                return
            current = self.current_snapshot()
            if current is None:
                raise SnapshotNotFoundError(self.name, "<current>", self._snapshot_names())
            name = current.name
        snap = self._snapshot_obj(name)
        try:
            head = _snapshot_head(snap.getXMLDesc(0))
        except lv.LibvirtError as exc:
            raise self._err(exc, "read snapshot", snapshot=name) from exc
        target = _SNAPSHOT_STATES.get(head.findtext("state", "") or "", RunState.NOSTATE)
        self._reset_console()
        if target in (RunState.RUNNING, RunState.BLOCKED, RunState.PAUSED):
            flag = lv.REVERT_PAUSED if target is RunState.PAUSED else lv.REVERT_RUNNING
            try:
                self._dom.revertToSnapshot(snap, flag)
            except lv.LibvirtError as exc:
                err = self._err(exc, "rollback", snapshot=name)
                if not isinstance(err, UnsupportedOperationError):
                    raise err from exc
                # Some drivers reject the run-state flags: revert plainly, then restore the state.
                self._revert_plain(snap, name)
            state = self.state
            if state in _STOPPED:
                self.start()
                state = self.state
            if target is RunState.PAUSED and state is not RunState.PAUSED:
                self.pause()
            elif target is not RunState.PAUSED and state is RunState.PAUSED:
                self.resume()
        else:
            self._revert_plain(snap, name)
            self.stop()

    def _revert_plain(self, snap: lv.DomainSnapshot, name: str) -> None:
        try:
            self._dom.revertToSnapshot(snap, 0)
        except lv.LibvirtError as exc:
            raise self._err(exc, "rollback", snapshot=name) from exc

    # camelCase aliases from the original PyTI API
    def createSnapshot(self, name: str, description: str = "") -> Snapshot:
        """Alias of :meth:`snapshot`."""
        return self.snapshot(name, description)

    def deleteSnapshot(self, name: str) -> None:
        """Alias of :meth:`delete_snapshot`."""
        self.delete_snapshot(name)

    def listSnapshots(self) -> list[str]:
        """Snapshot names, oldest first (see :meth:`snapshots` for the details)."""
        return [s.name for s in self.snapshots()]

    def revertToSnapshot(self, name: str) -> None:
        """Alias of :meth:`rollback`."""
        self.rollback(name)

    # -- console -------------------------------------------------------------------------------------

    @property
    def serial_log(self) -> Path | None:
        """The file the serial console is logged to, if the domain has one."""
        return _serial_log(self._xml())

    def console_output(self) -> str:
        """Everything the guest wrote to its serial console this run (from the serial log file)."""
        log = self.serial_log
        if log is None:
            raise ConfigError("serial_log", f"VM {self.name!r} has no serial log; set VMConfig.serial_log")
        try:
            return log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until the serial log matches ``pattern`` (e.g. a boot marker); returns the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_output()
            match = regex.search(text)
            if match is not None:
                return match
            if time.monotonic() >= deadline:
                raise VMTimeoutError(
                    self.name, f"wait for {regex.pattern!r} on the serial log", timeout, _tail(text)
                )
            if self.state in _STOPPED:
                raise VMStateError(self.name, "wait for console output of", self.state, (RunState.RUNNING,))
            time.sleep(_POLL)

    def _reset_console(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None
        self._console_buf = ""
        self._console_decoder = _utf8_decoder()

    def _open_console(self) -> lv.ConsoleStream:
        if self._console is None or self._console.closed:
            self._require("open the console of", RunState.RUNNING, RunState.BLOCKED, RunState.PAUSED)
            self._console = lv.ConsoleStream(self.connection, self._dom, self.name)
        return self._console

    def _drain_console(self) -> bool:
        """Move what the console has into the buffer; False at end of stream."""
        console = self._open_console()
        data = console.read_available()
        if data:
            self._console_buf += self._console_decoder.decode(data)
            if len(self._console_buf) > _CONSOLE_KEEP:  # nobody matched it for megabytes: keep the tail
                self._console_buf = self._console_buf[-_CONSOLE_KEEP:]
        return data is not None

    def console_write(self, text: str | bytes, timeout: float = 10.0) -> None:
        """Type ``text`` on the serial console (through libvirt's console stream)."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        console = self._open_console()
        deadline = time.monotonic() + timeout
        while data:
            sent = console.send(data)
            data = data[sent:]
            if data:
                if time.monotonic() >= deadline:
                    raise VMTimeoutError(self.name, "console write", timeout, f"{len(data)} bytes unsent")
                self._drain_console()
                time.sleep(_POLL / 5)

    def console_expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait for ``pattern`` in console output read since the last match; returns the match.

        Output is read through the console stream, which sees what the guest writes after the stream is
        opened (the first :meth:`console_write` or :meth:`console_expect` of a run). For boot messages use
        :meth:`wait_for_output`, which reads the serial log from the start.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            alive = self._drain_console()
            match = regex.search(self._console_buf)
            if match is not None:
                self._console_buf = self._console_buf[match.end() :]  # consumed
                return match
            if not alive:
                state = self.state
                if state not in _ACTIVE:
                    raise VMStateError(self.name, "read the console of", state, (RunState.RUNNING,))
                self._console = None  # the stream ended under a running guest: open a new one
            if time.monotonic() >= deadline:
                raise VMTimeoutError(
                    self.name, f"console expect {regex.pattern!r}", timeout, _tail(self._console_buf)
                )
            time.sleep(_POLL / 2)

    # -- display -------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        try:
            if self._undefined:
                state = "undefined"
            else:
                state = self.state.name if not self.connection.closed else "closed"
        except VManagerError:
            state = "unknown"
        return f"<VirtualMachine {self.name!r} {state} on {self.uri!r}>"

    def _repr_html_(self) -> str:
        try:
            state = self.state.name
            snaps = self.snapshots()
        except VManagerError as exc:
            return f"<b>VirtualMachine {html.escape(self.name)}</b>: {html.escape(str(exc))}"
        rows = "".join(
            f"<tr><td>{html.escape(s.name)}{' *' if s.is_current else ''}</td>"
            f"<td>{html.escape(s.description)}</td><td>{s.state.name}</td>"
            f"<td>{html.escape(s.parent or '')}</td><td>{s.created:%Y-%m-%d %H:%M:%S}</td></tr>"
            for s in snaps
        )
        table = (
            "<table><tr><th>snapshot</th><th>description</th><th>state</th><th>parent</th><th>created</th>"
            f"</tr>{rows}</table>"
            if snaps
            else "<i>no snapshots</i>"
        )
        return (
            f"<div><b>VirtualMachine {html.escape(self.name)}</b> — {state} on "
            f"<code>{html.escape(self.uri)}</code>{table}</div>"
        )


def _oldest_first(snaps: list[Snapshot]) -> list[Snapshot]:
    """Parents before children, otherwise by creation time (libvirt records whole seconds) and name."""
    by_name = {s.name: s for s in snaps}
    ready = [(s.created, s.name) for s in snaps if s.parent not in by_name]
    heapq.heapify(ready)
    out: list[Snapshot] = []
    while ready:
        _, name = heapq.heappop(ready)
        snap = by_name[name]
        out.append(snap)
        for child in snap.children:
            if child in by_name:
                heapq.heappush(ready, (by_name[child].created, child))
    return out


def _utf8_decoder() -> codecs.IncrementalDecoder:
    """Decodes console bytes that may split a character between two reads."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _tail(text: str, limit: int = 400) -> str:
    text = text[-limit:]
    return f"last output: {text!r}" if text else "no output"


_EMBEDDED_DOMAIN = re.compile(r"<domain[\s>]")


def _snapshot_head(text: str) -> ET.Element:
    """The snapshot's own elements, without the full domain definition libvirt embeds after them."""
    match = _EMBEDDED_DOMAIN.search(text, 1)
    if match is not None:
        text = text[: match.start()] + "</domainsnapshot>"
    return ET.fromstring(text)


def _parse_snapshot(root: ET.Element, children: tuple[str, ...], is_current: bool | None) -> Snapshot:
    created = int(root.findtext("creationTime", "0") or 0)
    return Snapshot(
        name=root.findtext("name", ""),
        description=root.findtext("description", "") or "",
        parent=root.findtext("parent/name") or None,
        children=children,
        created=dt.datetime.fromtimestamp(created, dt.UTC),
        state=_SNAPSHOT_STATES.get(root.findtext("state", "") or "", RunState.NOSTATE),
        is_current=bool(is_current),
    )


def _create_overlay(overlay: Path, base: Path, fmt: str) -> None:
    """A fresh qcow2 overlay over ``base`` (opened read-only by QEMU through the overlay)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise UnsupportedOperationError("overlay rollback needs qemu-img (Debian package qemu-utils)")
    if not base.exists():
        raise DiskNotFoundError("hd_location", base)
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    cmd = [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base.absolute()), "-F", fmt, str(overlay)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError("hd_location", f"cannot create an overlay over {base}: {proc.stderr.strip()}")
