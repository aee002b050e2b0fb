"""Snapshots: one tree model (parent, children, current) over libvirt's snapshot metadata.

* **internal** — QEMU keeps disk (and memory, when running) inside the qcow2 images; libvirt's
  own revert.
* **overlay** — see :mod:`vmanager._overlays`: ``rollback()`` without a name discards the overlay.
"""

from __future__ import annotations

import datetime as dt
import heapq
import html
import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Final
from xml.sax.saxutils import escape as xml_escape

import attrs

from . import _domain_info
from ._libvirt import (
    REVERT_PAUSED,
    REVERT_RUNNING,
    SNAPSHOT_DELETE_CHILDREN,
    DomainSnapshot,
)
from .errors import (
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
    VManagerError,
)
from .state import ACTIVE, RESUMABLE, STOPPED, RunState, snapshot_state

if TYPE_CHECKING:
    from .machine import VirtualMachine

__all__ = ["Snapshot"]

_REFUSES_DUPLICATES: Final = frozenset({"qemu", "test"})


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


def take(vm: VirtualMachine, name: str, description: str) -> Snapshot:
    dom = vm._dom
    family = vm.connection.family
    # libvirt's QEMU and test drivers refuse a duplicate name themselves (checked after a failure,
    # below); VirtualBox keeps duplicates, so elsewhere look first.
    if family not in _REFUSES_DUPLICATES and dom.snapshot(name) is not None:
        raise SnapshotExistsError(vm.name, name)
    if family == "qemu":
        _check_internal(vm, vm.xml_desc(), vm.state in ACTIVE)
    desc = f"<description>{xml_escape(description)}</description>" if description else ""
    try:
        snap = dom.snapshot_create(f"<domainsnapshot><name>{name}</name>{desc}</domainsnapshot>", name)
    except VManagerError as exc:
        if dom.snapshot(name) is not None:
            raise SnapshotExistsError(vm.name, name) from exc
        raise
    return _parse(head(snap.xml_desc()), (), True)


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
    target = snapshot_state(head(snap.xml_desc()).findtext("state"))
    vm._console.reset()
    _revert(vm, snap, target)


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
    lookup(vm, name).delete(SNAPSHOT_DELETE_CHILDREN if children else 0)


def delete_all(vm: VirtualMachine) -> None:
    """Delete every snapshot for real (QEMU keeps internal ones inside the qcow2 otherwise).

    Newest first, so that no revert-able state is reparented needlessly.
    """
    for snap in reversed(vm._dom.snapshots()):
        snap.delete(0)
