"""VMConfig -> libvirt domain XML, one small function per hypervisor family.

Every family's output is checked against libvirt's schema with ``virt-xml-validate`` in the tests.
Disks are laid out by :func:`plan_disks` (shared with ``machine.py``, which needs to know which target
is the system disk for overlays and snapshot checks).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ._diskformat import DiskFormat, names_other_files, sniff_format
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import VMConfig

__all__ = ["DiskPlan", "domain_xml", "plan_disks", "render"]

FAMILIES = ("qemu", "kvm", "vbox", "xen", "test")


@attrs.frozen
class DiskPlan:
    """Where one disk lands in the domain: its config field, target device and bus."""

    field: str
    path: Path
    device: str  # "disk" or "cdrom"
    target: str
    bus: str
    format: DiskFormat
    readonly: bool
    snapshot: bool


def _format_of(field: str, path: Path, given: DiskFormat | None) -> DiskFormat:
    """The format given, else the sniffed one when that cannot make QEMU open other host files."""
    if given is not None:
        return given
    try:
        fmt = sniff_format(path)
        why = names_other_files(path, fmt)
    except OSError:
        return "raw"  # a missing file is reported by VirtualMachine (validate_paths), not here
    if why is not None:
        how = f"hd_format={fmt!r}" if field == "hd_location" else f"Disk(..., format={fmt!r})"
        raise ConfigError(
            field,
            f"{path} looks like {fmt}, but {why}; vmanager does not guess such a format, since a guest "
            f"that wrote this disk could make QEMU open host files. If you trust the image, state its "
            f"format: {how}",
        )
    return fmt


def _disk_bus(family: str) -> tuple[str, str]:
    """(target prefix, bus) for writable disks of a family."""
    if family in {"qemu", "kvm", "test"}:
        return "vd", "virtio"
    if family == "vbox":
        return "sd", "sata"
    return "xvd", "xen"


def plan_disks(config: VMConfig, family: str) -> list[DiskPlan]:
    """The disks of ``config`` in device order: system disk, extra disks, CD-ROM."""
    prefix, bus = _disk_bus(family)
    letters = "abcdefghijklmnopqrstuvwxyz"
    plans: list[DiskPlan] = []
    sources: list[tuple[str, Path, bool, bool, DiskFormat | None]] = []
    if config.hd_location is not None:
        sources.append(("hd_location", config.hd_location, True, False, config.hd_format))
    for i, disk in enumerate(config.disks):
        sources.append((f"disks[{i}]", disk.path, disk.snapshot, disk.readonly, disk.format))
    if len(sources) > len(letters):
        raise ConfigError("disks", f"{len(sources)} disks: at most {len(letters)} are supported")
    for (field, path, snapshot, readonly, fmt), letter in zip(sources, letters, strict=False):
        plans.append(
            DiskPlan(
                field=field,
                path=path.absolute(),
                device="disk",
                target=prefix + letter,
                bus=bus,
                format=_format_of(field, path, fmt),
                readonly=readonly,
                snapshot=snapshot,
            )
        )
    if config.disk_location is not None:
        plans.append(
            DiskPlan(
                field="disk_location",
                path=config.disk_location.absolute(),
                device="cdrom",
                target="hdc",
                bus="ide",
                format="raw",
                readonly=True,
                snapshot=False,
            )
        )
    return plans


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def _disk(devices: ET.Element, plan: DiskPlan, family: str, overlay: Path | None) -> None:
    disk = _sub(devices, "disk", type="file", device=plan.device)
    if plan.device == "disk" and not plan.snapshot:
        disk.set("snapshot", "no")
    if family in {"qemu", "kvm", "xen"}:
        fmt = "qcow2" if overlay is not None else plan.format
        _sub(disk, "driver", name="qemu", type=fmt)
    _sub(disk, "source", file=str(overlay if overlay is not None else plan.path))
    if overlay is not None:
        backing = _sub(disk, "backingStore", type="file")
        _sub(backing, "format", type=plan.format)
        _sub(backing, "source", file=str(plan.path))
    _sub(disk, "target", dev=plan.target, bus=plan.bus)
    if plan.readonly:
        _sub(disk, "readonly")


def _serial(devices: ET.Element, config: VMConfig, family: str) -> None:
    if family == "vbox":
        if config.serial_log is not None:
            serial = _sub(devices, "serial", type="file")
            _sub(serial, "source", path=str(config.serial_log.absolute()))
            _sub(serial, "target", port="0")
        return
    serial = _sub(devices, "serial", type="pty")
    if config.serial_log is not None:
        _sub(serial, "log", file=str(config.serial_log.absolute()), append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")


def _channels(devices: ET.Element, config: VMConfig, family: str) -> None:
    if not config.channels:
        return
    if family not in {"qemu", "kvm", "test"}:
        raise ConfigError("channels", f"virtio-serial channels need QEMU, not {family!r}")
    for channel in config.channels:
        element = _sub(devices, "channel", type="unix")
        _sub(element, "source", mode="bind", path=str(channel.path.absolute()))
        _sub(element, "target", type="virtio", name=channel.name)


def _interface(devices: ET.Element, network: str | None, family: str) -> None:
    if network is None:
        return
    if network == "user":
        iface = _sub(devices, "interface", type="user")
    else:
        kind, source = network.split(":", 1)
        iface = _sub(devices, "interface", type=kind)
        _sub(iface, "source", **{kind: source})
    if family in {"qemu", "kvm"}:
        _sub(iface, "model", type="virtio")


def render(
    config: VMConfig,
    hypervisor: str,
    *,
    name: str | None,
    domain_type: str | None,
    overlays: Mapping[str, Path],
) -> str:
    """The domain XML of ``config`` for one hypervisor family (see :func:`domain_xml`)."""
    family = hypervisor.lower()
    if family not in FAMILIES:
        raise ConfigError("hypervisor", f"unknown hypervisor {hypervisor!r}; use one of {list(FAMILIES)}")
    if family == "vbox" and config.kernel is not None:
        raise ConfigError("kernel", "VirtualBox cannot boot a kernel directly; boot from a disk or ISO")
    if overlays and family not in {"qemu", "kvm"}:
        raise ConfigError("rollback", f"overlay rollback needs QEMU, not {family!r}; use snapshots")
    if domain_type is None:
        domain_type = family
    elif family not in {"qemu", "kvm"} or domain_type not in {"qemu", "kvm"}:
        raise ConfigError("domain_type", f"{domain_type!r} only applies to QEMU ('qemu' or 'kvm')")

    dom_name = name if name is not None else config.name
    root = ET.Element("domain", type=domain_type)
    _sub(root, "name", dom_name)
    if dom_name != config.name:
        _sub(root, "title", config.name)
    _sub(root, "memory", str(config.memory), unit="MiB")
    _sub(root, "vcpu", str(config.vcpus))

    os_el = _sub(root, "os")
    if family == "xen":
        _sub(os_el, "type", "hvm", arch="x86_64", machine="xenfv")
        _sub(os_el, "loader", "/usr/lib/xen/boot/hvmloader")
    else:
        _sub(os_el, "type", "hvm", arch="x86_64")
    if config.kernel is not None:
        _sub(os_el, "kernel", str(config.kernel.absolute()))
        if config.initrd is not None:
            _sub(os_el, "initrd", str(config.initrd.absolute()))
        if config.cmdline is not None:
            _sub(os_el, "cmdline", config.cmdline)
    else:
        plans_for_boot = plan_disks(config, family)
        if any(p.device == "cdrom" for p in plans_for_boot):
            _sub(os_el, "boot", dev="cdrom")
        if any(p.device == "disk" for p in plans_for_boot):
            _sub(os_el, "boot", dev="hd")

    features = _sub(root, "features")
    _sub(features, "acpi")
    if family in {"qemu", "kvm", "xen"}:
        _sub(features, "apic")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    for plan in plan_disks(config, family):
        _disk(devices, plan, family, overlays.get(plan.target))
    if family in {"qemu", "kvm"}:
        _sub(devices, "controller", type="usb", model="none")
    _interface(devices, config.network, family)
    _serial(devices, config, family)
    _channels(devices, config, family)
    if family in {"qemu", "kvm"}:
        _sub(devices, "memballoon", model="none")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def domain_xml(
    config: VMConfig, hypervisor: str, *, name: str | None = None, domain_type: str | None = None
) -> str:
    """libvirt domain XML for ``config`` on ``hypervisor`` (``"qemu"``, ``"kvm"``, ``"vbox"``, ``"xen"``,
    ``"test"``).

    ``name`` overrides the domain name (``config.name`` then becomes the ``<title>``); ``domain_type``
    overrides the ``<domain type>`` for QEMU (``"kvm"`` or ``"qemu"``). Disk formats are read from the
    images' magic numbers; a missing image counts as raw unless ``Disk(format=...)`` says otherwise.
    This is the XML :class:`~vmanager.VirtualMachine` defines.
    """
    return render(config, hypervisor, name=name, domain_type=domain_type, overlays={})
