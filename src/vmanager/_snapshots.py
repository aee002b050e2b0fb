"""Snapshots: one tree model (parent, children, current) over libvirt's snapshot metadata.

* **internal** — every snapshotted disk is qcow2 and none is left out: QEMU keeps disk (and memory,
  when running) inside the qcow2 images; libvirt's own revert and delete.
* **external** — any other disk format on QEMU (VDI, VMDK, VHD, raw), or a disk left out of snapshots
  (the IO disk): libvirt freezes each snapshotted disk's current file and puts a qcow2 overlay on top
  (``<vm>@<disk>@<snapshot>@<token>.vmanager-snap.qcow2``); a running VM's memory is saved beside
  (``.vmanager-mem``). From then on only overlays are written; the user's disk is a read-only backing
  file. Rollback: libvirt's own revert when libvirt >= 9.9 can do it; otherwise vmanager does it with
  libvirt's APIs — stop the domain, create a fresh overlay over the snapshot's frozen layer, redefine
  the domain on it, restore the saved memory (``restoreFlags`` with the saved XML pointed at the new
  overlay), and mark the snapshot current by redefining its metadata. Deleting a snapshot drops its
  metadata; a layer file goes once no remaining snapshot or the current state needs it (a backing
  chain through it counts), so no kept snapshot loses data.
* **overlay** — see :mod:`vmanager._overlays`: ``rollback()`` without a name discards the overlay.

Files are only created or removed while no running domain uses them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import html
import json
import re
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

import attrs

from . import _domain_info, _overlays
from ._libvirt import (
    REVERT_PAUSED,
    REVERT_RUNNING,
    SNAPSHOT_CREATE_CURRENT,
    SNAPSHOT_CREATE_DISK_ONLY,
    SNAPSHOT_CREATE_REDEFINE,
    SNAPSHOT_DELETE_CHILDREN,
    SNAPSHOT_DELETE_METADATA_ONLY,
    DomainSnapshot,
)
from .errors import (
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
    VManagerError,
    VMTimeoutError,
)
from .state import ACTIVE, RESUMABLE, STOPPED, RunState, snapshot_state

if TYPE_CHECKING:
    from .machine import VirtualMachine

__all__ = ["Snapshot"]

_REFUSES_DUPLICATES: Final = frozenset({"qemu", "test"})
LAYER_SUFFIX: Final = ".vmanager-snap.qcow2"
MEMORY_SUFFIX: Final = ".vmanager-mem"
#: the first libvirt that reverts external snapshots itself
LIBVIRT_EXTERNAL_REVERT: Final = (9, 9, 0)
Kind = Literal["internal", "external"]


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


_EMBEDDED_DOMAIN: Final = re.compile(r"<domain[\s>]")
_STATE_ELEMENT: Final = re.compile(r"<state>([a-z-]+)</state>")  # the snapshot's own comes first


def head(text: str) -> ET.Element:
    """The snapshot's own elements, without the full domain definition libvirt embeds after them."""
    match = _EMBEDDED_DOMAIN.search(text, 1)
    if match is not None:
        text = text[: match.start()] + "</domainsnapshot>"
    return ET.fromstring(text)


def _parse(root: ET.Element, children: tuple[str, ...], is_current: bool) -> Snapshot:
    created = int(root.findtext("creationTime", "0") or 0)
    return Snapshot(
        name=root.findtext("name", ""),
        description=root.findtext("description", "") or "",
        parent=root.findtext("parent/name") or None,
        children=children,
        created=dt.datetime.fromtimestamp(created, dt.UTC),
        state=snapshot_state(root.findtext("state")),
        is_current=is_current,
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


# -- reading the tree --------------------------------------------------------------------------------


def lookup(vm: VirtualMachine, name: str) -> DomainSnapshot:
    snap = vm._dom.snapshot(name)
    if snap is None:
        raise SnapshotNotFoundError(vm.name, name, sorted(vm._dom.snapshot_names()))
    return snap


def info(snap: DomainSnapshot, *, current: bool | None = None) -> Snapshot:
    children = tuple(sorted(snap.children_names()))
    return _parse(head(snap.xml_desc()), children, snap.is_current() if current is None else current)


def listing(vm: VirtualMachine) -> list[Snapshot]:
    dom = vm._dom
    snaps = dom.snapshots()
    current = dom.current_snapshot()
    roots = [head(s.xml_desc()) for s in snaps]
    children: dict[str, list[str]] = {}
    for root in roots:
        parent = root.findtext("parent/name")
        if parent:
            children.setdefault(parent, []).append(root.findtext("name", ""))
    current_name = current.name if current is not None else None
    out = [
        _parse(r, tuple(sorted(children.get(n, []))), n == current_name)
        for r in roots
        for n in (r.findtext("name", ""),)
    ]
    return _oldest_first(out)


def current(vm: VirtualMachine) -> Snapshot | None:
    snap = vm._dom.current_snapshot()
    return None if snap is None else info(snap, current=True)


# -- taking ------------------------------------------------------------------------------------------


def _check_internal(vm: VirtualMachine, xml: str, running: bool) -> None:
    """Refuse up front what QEMU internal snapshots would refuse halfway (or get wrong)."""
    qcow2 = 0
    for disk in _domain_info.disks(xml):
        if disk.device != "disk" or disk.readonly:
            continue
        if disk.snapshot == "no":
            raise UnsupportedOperationError(
                f"VM {vm.name!r}: disk {disk.target} ({disk.path}) is excluded from snapshots, but QEMU "
                "internal snapshots (libvirt 9) must include every disk. Keep such an IO disk out of "
                "rollbacks with overlay rollback (VMConfig(rollback='overlay') / VirtualMachine.with_overlay)"
            )
        if disk.format == "qcow2":
            qcow2 += 1
        else:
            raise UnsupportedOperationError(
                f"VM {vm.name!r}: disk {disk.target} ({disk.path}) is {disk.format}; QEMU snapshots need "
                "qcow2 disks. Convert it (qemu-img convert -O qcow2) or use overlay rollback "
                "(VMConfig(rollback='overlay') / VirtualMachine.with_overlay)"
            )
    if running and qcow2 == 0:
        raise UnsupportedOperationError(
            f"VM {vm.name!r}: a running QEMU VM's snapshot stores its memory in a qcow2 disk, and this "
            "VM has none; shut it off first or add a qcow2 disk"
        )


def is_external(text: str | ET.Element) -> bool:
    """Whether a snapshot's XML describes an external snapshot (overlays and/or saved memory)."""
    root = head(text) if isinstance(text, str) else text
    return root.find("memory[@snapshot='external']") is not None or (
        root.find("disks/disk[@snapshot='external']") is not None
    )


def kind(vm: VirtualMachine, xml: str) -> Kind:
    """Which kind a new snapshot of ``vm`` gets (see the module docstring)."""
    if vm.connection.family != "qemu":
        return "internal"  # the driver's own snapshots
    external = any(is_external(s.xml_desc()) for s in vm._dom.snapshots())
    for disk in _domain_info.disks(xml):
        if disk.device != "disk" or disk.readonly:
            continue
        if disk.snapshot == "no" or disk.format != "qcow2":
            external = True
    if external and _overlays.overlay_bases(xml):
        raise UnsupportedOperationError(
            f"VM {vm.name!r} uses overlay rollback, and this snapshot would have to be external (its "
            "disks are not all qcow2, or one is left out of snapshots); roll back with rollback() "
            "without a name, or define the VM without rollback='overlay'"
        )
    return "external" if external else "internal"


def take(vm: VirtualMachine, name: str, description: str) -> Snapshot:
    dom = vm._dom
    family = vm.connection.family
    # libvirt's QEMU and test drivers refuse a duplicate name themselves (checked after a failure,
    # below); VirtualBox keeps duplicates, so elsewhere look first.
    if family not in _REFUSES_DUPLICATES and dom.snapshot(name) is not None:
        raise SnapshotExistsError(vm.name, name)
    if family != "qemu":
        return _take_plain(vm, name, description)
    desc = f"<description>{xml_escape(description)}</description>" if description else ""
    extra = ""
    flags = 0
    if family == "qemu":
        xml = vm.xml_desc()
        running = vm.state in ACTIVE
        if kind(vm, xml) == "external":
            if dom.snapshot(name) is not None:  # before any file is made
                raise SnapshotExistsError(vm.name, name)
            if running:
                xml = _unblock_memory_save(vm, xml)
            extra, record = _external_spec(vm, xml, name, running)
            # libvirt takes an external snapshot of a shut-off VM only as "disk-only"
            flags = 0 if running else SNAPSHOT_CREATE_DISK_ONLY
        else:
            _check_internal(vm, xml, running)
    try:
        spec = f"<domainsnapshot><name>{name}</name>{desc}{extra}</domainsnapshot>"
        snap = dom.snapshot_create(spec, name, flags)
    except VManagerError as exc:
        if dom.snapshot(name) is not None:
            raise SnapshotExistsError(vm.name, name) from exc
        raise
    if extra:
        records = _records(vm)
        records[name] = record
        _save_records(vm, records)
    return _parse(head(snap.xml_desc()), (), True)


def _take_plain(vm: VirtualMachine, name: str, description: str) -> Snapshot:
    """A snapshot on a driver that does everything itself, described without reading its XML back.

    libvirt stamps a new snapshot with the second it parsed the request in and makes it a child of
    the current one; when the call does not straddle a second, both are known without another
    round trip (the test driver's calls take microseconds, so this is the common case).
    """
    dom = vm._dom
    state = vm.state
    desc = f"<description>{xml_escape(description)}</description>" if description else ""
    spec = f"<domainsnapshot><name>{name}</name>{desc}</domainsnapshot>"
    before = time.time()
    try:
        snap = dom.snapshot_create(spec, name)
    except VManagerError as exc:
        if dom.snapshot(name) is not None:
            raise SnapshotExistsError(vm.name, name) from exc
        raise
    second = int(before)
    if second != int(time.time()):
        return _parse(head(snap.xml_desc()), (), True)
    created = dt.datetime.fromtimestamp(second, dt.UTC)
    return Snapshot(name, description, snap.parent_name(), (), created, state, True)


def _token() -> str:
    return uuid.uuid4().hex[:8]


def _layer_path(vm: VirtualMachine, target: str, snapshot: str) -> Path:
    return vm._overlay_dir() / f"{vm.name}@{target}@{snapshot}@{_token()}{LAYER_SUFFIX}"


#: disk formats whose QEMU drivers allow saving a running guest's memory (the others block migration)
_MIGRATABLE: Final = frozenset({"raw", "qcow2"})
_COPY_TIMEOUT: Final = 3600.0


def _unblock_memory_save(vm: VirtualMachine, xml: str) -> str:
    """Move a running guest off VDI, VMDK and VHD files, so that QEMU can save its memory.

    QEMU's drivers for those formats block migration, and saving memory is a migration. Each snapshotted
    disk whose chain holds one is copied whole, while the guest runs, into a standalone qcow2 file
    (libvirt's block copy) and the guest is switched to the copy; the next boot uses it too. The user's
    image is only read. Returns the domain XML afterwards.
    """
    dom = vm._dom
    copied: dict[str, Path] = {}
    for disk in _domain_info.disks(xml):
        formats = {disk.format, *(fmt for _, fmt in disk.chain)}
        if disk.device != "disk" or disk.path is None or formats <= _MIGRATABLE:
            continue
        if not disk.snapshotted:
            raise UnsupportedOperationError(
                f"VM {vm.name!r}: disk {disk.target} ({disk.path}) is {disk.format} and left out of "
                "snapshots; QEMU cannot save a running guest's memory while it has such a disk open "
                "(its driver blocks migration). Use a raw or qcow2 image for that disk, or take the "
                "snapshot shut off"
            )
        dest = _layer_path(vm, disk.target, "copy")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dom.block_copy(
            disk.target,
            f"<disk type='file'><source file={quoteattr(str(dest))}/><driver type='qcow2'/></disk>",
        )
        try:
            _wait_for_copy(vm, disk.target)
            dom.block_job_finish(disk.target, pivot=True)
        except BaseException:
            with contextlib.suppress(VManagerError):
                dom.block_job_finish(disk.target, pivot=False)
            dest.unlink(missing_ok=True)
            raise
        copied[disk.target] = dest
    if not copied:
        return xml
    # the next boot starts from the copies too
    vm.connection.define(vm.name, _point_disks(dom.xml_desc(inactive=True), copied))
    return vm.xml_desc()


def _wait_for_copy(vm: VirtualMachine, target: str) -> None:
    deadline = time.monotonic() + _COPY_TIMEOUT
    while True:
        progress = vm._dom.block_job_progress(target)
        if progress is not None and progress[1] > 0 and progress[0] == progress[1]:
            return
        if time.monotonic() >= deadline:
            raise VMTimeoutError(vm.name, f"copy of disk {target}", _COPY_TIMEOUT, f"progress {progress}")
        time.sleep(0.05)


def _external_spec(vm: VirtualMachine, xml: str, name: str, running: bool) -> tuple[str, Record]:
    """The ``<memory>`` and ``<disks>`` of an external snapshot (every disk named, IO disks left out),
    and vmanager's record of it: each covered disk's file at this moment (its frozen layer from now
    on) and the memory file.
    """
    folder = vm._overlay_dir()
    folder.mkdir(parents=True, exist_ok=True)
    disks = []
    record = Record({}, None)
    for disk in _domain_info.disks(xml):
        if not disk.target:
            continue
        if disk.snapshotted and disk.path is not None:
            record.layers[disk.target] = (disk.path, disk.format)
            layer = _layer_path(vm, disk.target, name)
            disks.append(
                f"<disk name={quoteattr(disk.target)} snapshot='external'><driver type='qcow2'/>"
                f"<source file={quoteattr(str(layer))}/></disk>"
            )
        else:
            disks.append(f"<disk name={quoteattr(disk.target)} snapshot='no'/>")
    memory = ""
    if running:
        record = Record(record.layers, folder / f"{vm.name}@{name}@{_token()}{MEMORY_SUFFIX}")
        memory = f"<memory snapshot='external' file={quoteattr(str(record.memory))}/>"
    return f"{memory}<disks>{''.join(disks)}</disks>", record


# -- vmanager's record of external snapshots, in the domain's <metadata> ----------------------------------
#
# libvirt's snapshot metadata does not say reliably which file each external snapshot froze (libvirt 9
# rewrites a child's embedded domain when its parent's metadata is deleted), so vmanager keeps its own
# record where libvirt keeps application data: the persistent definition's <metadata>.

_NS: Final = "https://pyti.invalid/vmanager/snapshots/1"
_PREFIX: Final = "vmanager"


@attrs.frozen
class Record:
    """What one external snapshot needs: each covered disk's frozen layer, and the saved memory."""

    layers: dict[str, tuple[Path, str]]  # target -> (file, format)
    memory: Path | None


def _records(vm: VirtualMachine) -> dict[str, Record]:
    text = vm._dom.metadata(_NS)
    if not text:
        return {}
    out: dict[str, Record] = {}
    for snap in ET.fromstring(text).iterfind("snapshot"):
        layers = {
            el.get("disk", ""): (Path(el.get("file", "")), el.get("format", "raw"))
            for el in snap.iterfind("layer")
        }
        memory = snap.get("memory")
        out[snap.get("name", "")] = Record(layers, Path(memory) if memory else None)
    return out


def _save_records(vm: VirtualMachine, records: dict[str, Record]) -> None:
    root = ET.Element("snapshots")
    for name, record in records.items():
        el = ET.SubElement(root, "snapshot", name=name)
        if record.memory is not None:
            el.set("memory", str(record.memory))
        for disk, (path, fmt) in record.layers.items():
            ET.SubElement(el, "layer", disk=disk, file=str(path), format=fmt)
    vm._dom.set_metadata(_NS, _PREFIX, ET.tostring(root, encoding="unicode") if records else None)


# -- rollback and delete -----------------------------------------------------------------------------


def rollback(vm: VirtualMachine, name: str | None) -> None:
    if name is None:
        if vm.uses_overlay:
            was_running = vm.state in ACTIVE
            vm.stop()
            vm.discard_overlay()
            if was_running:
                vm.start()
            return
        cur = vm._dom.current_snapshot()
        if cur is None:
            raise SnapshotNotFoundError(vm.name, "<current>", sorted(vm._dom.snapshot_names()))
        name = cur.name
    snap = lookup(vm, name)
    text = snap.xml_desc()
    state = _STATE_ELEMENT.search(text)
    target = snapshot_state(state.group(1) if state is not None else None)
    vm._console.reset()
    if vm.connection.family != "qemu" or not is_external(text):
        _revert(vm, snap, target)
        return
    if vm.connection.lib_version() >= LIBVIRT_EXTERNAL_REVERT:
        # libvirt reverts external snapshots itself and owns the overlays it makes for that; vmanager
        # removes none of them behind its back (undefine() still removes the files vmanager made)
        _revert(vm, snap, target)
        return
    record = _records(vm).get(snap.name)
    if record is None:
        raise UnsupportedOperationError(
            f"VM {vm.name!r}: snapshot {snap.name!r} is external but was not taken by vmanager, and "
            f"libvirt {'.'.join(map(str, vm.connection.lib_version()))} cannot revert it (9.9 can)"
        )
    before = _vmanager_files(vm)
    _revert_external(vm, snap, text, target, record)
    _remove_unneeded(vm, before)


def _point_disks(xml: str, tops: dict[str, Path]) -> str:
    """``xml`` with each disk in ``tops`` on its new qcow2 file (the chain below is read from it)."""
    root = ET.fromstring(xml)
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev not in tops:
            continue
        for child in disk.findall("backingStore"):
            disk.remove(child)
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", str(tops[dev]))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", "qcow2")
    return ET.tostring(root, encoding="unicode")


def _revert_external(
    vm: VirtualMachine, snap: DomainSnapshot, text: str, target: RunState, record: Record
) -> None:
    """Revert to an external snapshot with libvirt's APIs (for libvirt < 9.9, which cannot)."""
    tops: dict[str, Path] = {}
    try:
        for dev, (layer, fmt) in record.layers.items():
            tops[dev] = _layer_path(vm, dev, snap.name)
            _overlays.create_overlay(tops[dev], layer, fmt, field=f"snapshot {snap.name!r} disk {dev}")
        memory_file = record.memory
        if target in RESUMABLE and (memory_file is None or not memory_file.exists()):
            raise UnsupportedOperationError(
                f"VM {vm.name!r}: the memory of snapshot {snap.name!r} ({memory_file}) is gone; it can no "
                "longer be resumed"
            )
        saved = (
            vm.connection.saved_domain_xml(memory_file, vm.name)
            if memory_file and target in RESUMABLE
            else None
        )
    except BaseException:
        for top in tops.values():
            top.unlink(missing_ok=True)
        raise
    vm.stop()  # from here on no domain uses the old files
    vm.connection.define(vm.name, _point_disks(vm._dom.xml_desc(inactive=True), tops))
    if saved is not None and memory_file is not None:
        vm.connection.restore(
            memory_file, _point_disks(saved, tops), vm.name, paused=target is RunState.PAUSED
        )
    # libvirt did not revert, so tell it which snapshot the VM now stands on
    vm._dom.snapshot_create(text, snap.name, SNAPSHOT_CREATE_REDEFINE | SNAPSHOT_CREATE_CURRENT)


def _revert(vm: VirtualMachine, snap: DomainSnapshot, target: RunState) -> None:
    dom = vm._dom
    if target in RESUMABLE:
        try:
            dom.revert(snap, REVERT_PAUSED if target is RunState.PAUSED else REVERT_RUNNING)
        except UnsupportedOperationError:
            # Some drivers reject the run-state flags: revert plainly, then restore the state.
            dom.revert(snap, 0)
        _restore_run_state(vm, target)
    else:
        dom.revert(snap, 0)
        vm.stop()


def _restore_run_state(vm: VirtualMachine, target: RunState) -> None:
    state = vm.state
    if state in STOPPED:
        vm.start()
        state = vm.state
    if target is RunState.PAUSED and state is not RunState.PAUSED:
        vm.pause()
    elif target is not RunState.PAUSED and state is RunState.PAUSED:
        vm.resume()


def delete(vm: VirtualMachine, name: str, *, children: bool) -> None:
    snap = lookup(vm, name)
    flags = SNAPSHOT_DELETE_CHILDREN if children else 0
    if vm.connection.family != "qemu" or not is_external(snap.xml_desc()):
        snap.delete(flags)
        return
    before = _vmanager_files(vm)
    # libvirt < 10 cannot delete external snapshots' files; it drops the metadata (reparenting the
    # children), and the files no remaining snapshot needs go below
    snap.delete(flags | SNAPSHOT_DELETE_METADATA_ONLY)
    remaining = set(vm._dom.snapshot_names())
    _save_records(vm, {k: v for k, v in _records(vm).items() if k in remaining})
    _remove_unneeded(vm, before)


def delete_all(vm: VirtualMachine) -> set[Path]:
    """Delete every snapshot (QEMU keeps internal ones inside the qcow2 otherwise).

    Newest first, so that no revert-able state is reparented needlessly. Returns the files vmanager
    made for external snapshots, for the caller to remove once the domain is gone.
    """
    files = _vmanager_files(vm)
    qemu = vm.connection.family == "qemu"
    for snap in reversed(vm._dom.snapshots()):
        snap.delete(SNAPSHOT_DELETE_METADATA_ONLY if qemu and is_external(snap.xml_desc()) else 0)
    return files


# -- the files of external snapshots -------------------------------------------------------------------


def _is_ours(vm: VirtualMachine, path: Path) -> bool:
    return path.name.startswith(f"{vm.name}@") and path.name.endswith((LAYER_SUFFIX, MEMORY_SUFFIX))


def backing_chain(path: Path) -> list[Path]:
    """``path`` and every backing file below it (``qemu-img info --backing-chain``)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None or not path.exists():
        return [path]
    proc = subprocess.run(
        [qemu_img, "info", "-U", "--backing-chain", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return [path]
    return [Path(entry["filename"]) for entry in json.loads(proc.stdout) if "filename" in entry]


def _needed(vm: VirtualMachine) -> tuple[set[Path], set[Path]]:
    """Files the current state or a snapshot needs (backing chains included), and every file named."""
    tops: set[Path] = set()
    named: set[Path] = set()
    needed: set[Path] = set()
    for text in (vm._dom.xml_desc(), vm._dom.xml_desc(inactive=True)):
        for disk in _domain_info.disks(text):
            if disk.path is not None and disk.device == "disk":
                tops.add(disk.path)
                tops.update(p for p, _ in disk.chain)
    existing = set(vm._dom.snapshot_names())
    for name, record in _records(vm).items():
        files = {p for p, _ in record.layers.values()}
        named.update(files)
        if record.memory is not None:
            named.add(record.memory)
        if name in existing:
            tops.update(files)
            if record.memory is not None:
                needed.add(record.memory)
    for snap in vm._dom.snapshots():  # the overlays libvirt made for each snapshot
        for source in ET.fromstring(snap.xml_desc()).iterfind("disks/disk/source"):
            named.add(Path(source.get("file", "")))
    for top in tops:
        needed.update(backing_chain(top))
    return needed, named | needed


def _vmanager_files(vm: VirtualMachine) -> set[Path]:
    """Every file vmanager made for this VM's external snapshots that the VM still names."""
    if vm.connection.family != "qemu" or not vm.connection.is_local:
        return set()
    _, named = _needed(vm)
    return {p for p in named if _is_ours(vm, p)}


def _remove_unneeded(vm: VirtualMachine, candidates: set[Path]) -> None:
    """Remove those of ``candidates`` that neither the current state nor any snapshot needs any more."""
    needed, _ = _needed(vm)
    for path in candidates - needed:
        if _is_ours(vm, path):
            path.unlink(missing_ok=True)


def remove_files(vm: VirtualMachine, files: set[Path]) -> None:
    """Remove external-snapshot files of an undefined VM (never a file vmanager did not make)."""
    for path in files:
        if _is_ours(vm, path):
            path.unlink(missing_ok=True)
