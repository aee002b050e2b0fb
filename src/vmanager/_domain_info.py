"""Facts read back from a domain's libvirt XML: disks, overlays, serial log, hardware.

Domain XML is parsed once per distinct text: libvirt hands out a fresh string on every call, and a
``start()`` looks at every running domain's disks, so parsing would otherwise dominate its cost.
Callers never modify the cached trees.
"""

from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs

__all__ = ["DiskInfo", "Hardware", "disk_uses", "disks", "hardware", "parse", "serial_log"]


@functools.lru_cache(maxsize=256)
def parse(text: str) -> ET.Element:
    """Parsed domain XML (cached by text; callers never modify the tree)."""
    return ET.fromstring(text)


@attrs.frozen
class DiskInfo:
    """One ``<disk>`` of a domain: its target, file, format, chain below it and snapshot setting."""

    target: str
    device: str
    path: Path | None
    format: str
    chain: tuple[tuple[Path, str], ...]  # backing files below ``path``: (file, format), nearest first
    snapshot: str | None  # the disk's snapshot= attribute ("no" for an IO disk), None if unset
    readonly: bool

    @property
    def snapshotted(self) -> bool:
        """Whether a snapshot covers this disk (a writable hard disk not marked snapshot='no')."""
        return self.device == "disk" and not self.readonly and self.snapshot != "no" and self.path is not None


def _chain(disk: ET.Element) -> tuple[tuple[Path, str], ...]:
    out: list[tuple[Path, str]] = []
    backing = disk.find("backingStore")
    while backing is not None:
        source = backing.find("source")
        if source is None or not source.get("file"):
            break
        fmt = backing.find("format")
        out.append((Path(source.get("file", "")), fmt.get("type", "raw") if fmt is not None else "raw"))
        backing = backing.find("backingStore")
    return tuple(out)


@functools.lru_cache(maxsize=256)
def disks(text: str) -> tuple[DiskInfo, ...]:
    """The ``<disk>`` elements of a domain XML, in order."""
    out = []
    for disk in parse(text).iterfind("devices/disk"):
        source = disk.find("source")
        target = disk.find("target")
        driver = disk.find("driver")
        file = source.get("file") if source is not None else None
        out.append(
            DiskInfo(
                target=target.get("dev", "") if target is not None else "",
                device=disk.get("device", "disk"),
                path=Path(file) if file else None,
                format=driver.get("type", "raw") if driver is not None else "raw",
                chain=_chain(disk),
                snapshot=disk.get("snapshot"),
                readonly=disk.find("readonly") is not None,
            )
        )
    return tuple(out)


@functools.lru_cache(maxsize=256)
def disk_uses(text: str) -> dict[str, bool]:
    """Absolute paths of the files a domain's disks use (CD-ROMs excluded) -> written by it?"""
    uses: dict[str, bool] = {}
    for disk in parse(text).iterfind("devices/disk"):
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


def serial_log(root: ET.Element) -> Path | None:
    """The file a domain logs its serial console to, if any."""
    for serial in root.iterfind("devices/serial"):
        log = serial.find("log")
        if log is not None and log.get("file"):
            return Path(log.get("file", ""))
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None and source.get("path"):
            return Path(source.get("path", ""))
    return None


@attrs.frozen
class Hardware:
    """What a config decides about a domain, comparable between a config's XML and libvirt's."""

    memory_kib: int
    vcpus: int
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    disks: tuple[tuple[str, str, str], ...]  # (target, device, absolute path)

    def differences(self, live: Hardware, live_chains: dict[str, set[str]]) -> list[str]:
        """What ``live`` (an existing domain) has that this (a config) does not, in words."""
        out = []
        if self.memory_kib != live.memory_kib:
            out.append(f"memory {live.memory_kib // 1024} MiB (config: {self.memory_kib // 1024} MiB)")
        if self.vcpus != live.vcpus:
            out.append(f"vcpus {live.vcpus} (config: {self.vcpus})")
        for field in ("kernel", "initrd", "cmdline"):
            mine, theirs = getattr(self, field), getattr(live, field)
            if mine != theirs:
                out.append(f"{field} {theirs!r} (config: {mine!r})")
        mine_disks = {t: (d, p) for t, d, p in self.disks}
        live_disks = {t: (d, p) for t, d, p in live.disks}
        for target in sorted(set(mine_disks) | set(live_disks)):
            if target not in live_disks:
                out.append(f"no disk {target} (config: {mine_disks[target][1]})")
            elif target not in mine_disks:
                out.append(f"disk {target} {live_disks[target][1]} (config: none)")
            elif mine_disks[target][1] not in live_chains.get(target, {live_disks[target][1]}):
                # a disk under vmanager's overlays still counts as the same disk
                out.append(f"disk {target} {live_disks[target][1]} (config: {mine_disks[target][1]})")
        return out


def _memory_kib(root: ET.Element) -> int:
    mem = root.find("memory")
    if mem is None or not (mem.text or "").strip().isdigit():
        return 0
    factor = {"kib": 1, "k": 1, "mib": 1024, "m": 1024, "gib": 1 << 20, "g": 1 << 20, "b": 0}
    unit = mem.get("unit", "KiB").lower()
    value = int((mem.text or "0").strip())
    return value // 1024 if unit in {"b", "bytes"} else value * factor.get(unit, 1)


def hardware(text: str) -> tuple[Hardware, dict[str, set[str]]]:
    """The hardware of a domain XML, and each disk target's files (source and backing chain)."""
    root = parse(text)
    chains: dict[str, set[str]] = {}
    listed = []
    for info in disks(text):
        path = os.path.abspath(info.path) if info.path is not None else ""
        listed.append((info.target, info.device, path))
        chains[info.target] = {path, *(os.path.abspath(p) for p, _ in info.chain)}
    vcpu = (root.findtext("vcpu") or "1").strip()
    return (
        Hardware(
            memory_kib=_memory_kib(root),
            vcpus=int(vcpu) if vcpu.isdigit() else 1,
            kernel=root.findtext("os/kernel"),
            initrd=root.findtext("os/initrd"),
            cmdline=root.findtext("os/cmdline"),
            disks=tuple(sorted(listed)),
        ),
        chains,
    )
