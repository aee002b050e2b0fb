"""A real QEMU guest on the embedded driver (TCG): boot, snapshots, rollback, overlay, shutdown.

One booted guest is shared by the tests of the snapshot sequence; they run in file order.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmanager import (
    Connection,
    Disk,
    DiskNotFoundError,
    RunState,
    UnsupportedOperationError,
    VirtualMachine,
    VMConfig,
    detect_accelerator,
)
from vmanager._libvirt import LOG_ROUTED, embed_uri

pytestmark = pytest.mark.qemu

READY = "PYTI-GUEST-READY"
BOOT_TIMEOUT = 90.0
_counter = itertools.count(1)

for tool in ("qemu-img", "mkfs.ext4", "debugfs"):
    if shutil.which(tool) is None:
        pytestmark = [pytest.mark.qemu, pytest.mark.skip(reason=f"{tool} is not installed")]


@pytest.fixture(scope="session")
def guest() -> object:
    try:
        from pyti_core.guest.tinylinux import build_tiny_linux
    except ImportError as exc:  # pragma: no cover - the guest builder is part of this distribution
        pytest.skip(f"tiny Linux guest builder unavailable: {exc}")
    return build_tiny_linux()


@pytest.fixture(scope="session")
def qemu_conn(embed_root: Path) -> Iterator[Connection]:
    with Connection(embed_uri(embed_root)) as conn:
        yield conn


def make_ext4(path: Path, fmt: str, files: dict[str, bytes] | None = None) -> Path:
    """A 32 MiB ext4 image in ``fmt``, optionally holding ``files`` (name -> content)."""
    raw = path.with_suffix(".raw-src")
    src = path.parent / f"{path.name}-root"
    src.mkdir()
    for name, data in (files or {}).items():
        (src / name).write_bytes(data)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw), "32M"], check=True)
    if fmt == "raw":
        raw.rename(path)
    else:
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()
    return path


def read_guest_file(image: Path, name: str, tmp: Path) -> bytes | None:
    """A file from an ext4 image of any format, read on the host with debugfs (None if absent)."""
    raw = tmp / "check.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    try:
        listing = subprocess.run(
            ["debugfs", "-R", "ls -l /", str(raw)], capture_output=True, text=True, check=True
        ).stdout
        if f" {name}\n" not in listing and not listing.rstrip().endswith(f" {name}"):
            return None
        return subprocess.run(
            ["debugfs", "-R", f"cat /{name}", str(raw)], capture_output=True, check=True
        ).stdout
    finally:
        raw.unlink()


def sh(vm: VirtualMachine, command: str, timeout: float = 30.0) -> str:
    """Run a shell command on the guest's serial console; returns its output."""
    n = next(_counter)
    # The markers are computed by the guest's shell, so the echo of the typed line never matches.
    vm.console_write(f"echo BEGIN-$(({n} * 7)); {command}; echo END-$(({n} * 7))\n")
    match = vm.console_expect(re.compile(rf"BEGIN-{n * 7}\r?\n(.*?)END-{n * 7}\r?\n", re.DOTALL), timeout)
    return match.group(1).replace("\r\n", "\n")


def qemu_processes(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"qemu-system" in cmdline[0] and f"guest={name},".encode() in b" ".join(cmdline):
            pids.append(int(entry.name))
    return pids


def tiny_config(guest: object, name: str, disk: Path, tmp: Path, **extra: object) -> VMConfig:
    return VMConfig(
        name=name,
        memory=256,
        hd_location=disk,
        kernel=guest.kernel,  # type: ignore[attr-defined]
        initrd=guest.initrd,  # type: ignore[attr-defined]
        cmdline=guest.cmdline,  # type: ignore[attr-defined]
        serial_log=tmp / f"{name}.log",
        **extra,  # type: ignore[arg-type]
    )


# -- the shared guest: boot, running snapshot, offline snapshot, shutdown -----------------------------


@pytest.fixture(scope="module")
def tiny(
    guest: object, qemu_conn: Connection, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VirtualMachine]:
    tmp = tmp_path_factory.mktemp("tiny")
    disk = make_ext4(tmp / "system.qcow2", "qcow2")
    vm = VirtualMachine("tiny", qemu_conn, tiny_config(guest, "tiny", disk, tmp))
    try:
        yield vm
    finally:
        vm.stop()
        vm.undefine()


def test_boots_to_marker(
    tiny: VirtualMachine, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert tiny.state is RunState.SHUTOFF
    with caplog.at_level(logging.INFO, logger="vmanager"):
        tiny.start()
        assert tiny.state is RunState.RUNNING
        tiny.wait_for_output(READY, BOOT_TIMEOUT)
    if LOG_ROUTED:  # vmanager loaded libvirt in this process (nothing imported it before)
        assert "libvirt" not in capfd.readouterr().err  # nothing on file descriptor 2
        if os.geteuid() == 0:  # libvirt taints a guest it runs as root, and logs it
            tainted = [r for r in caplog.records if "tainted" in r.getMessage()]
            assert tainted, caplog.records
            assert tainted[0].name == "vmanager.libvirt"
            assert tainted[0].levelno == logging.WARNING
    assert READY in tiny.console_output()
    assert len(qemu_processes("tiny")) == 1
    assert sh(tiny, "echo hi $((6 * 7))").strip().endswith("hi 42")


def test_running_snapshot_rollback_keeps_running(tiny: VirtualMachine) -> None:
    snap = tiny.snapshot("booted", description="just booted")
    assert snap.state is RunState.RUNNING
    sh(tiny, "echo changed > /mnt/disk/after; sync")
    assert "changed" in sh(tiny, "cat /mnt/disk/after")
    tiny.rollback("booted")
    assert tiny.state is RunState.RUNNING
    out = sh(tiny, "cat /mnt/disk/after 2>&1; echo rc=$?")
    assert "No such file" in out
    assert "rc=1" in out


def test_offline_snapshot_rollback_restores_disk(tiny: VirtualMachine, tmp_path: Path) -> None:
    assert tiny.shutdown(timeout=60) is True  # graceful: the guest powered itself off
    assert tiny.state is RunState.SHUTOFF
    disk = tiny.config.hd_location  # type: ignore[union-attr]
    assert disk is not None
    tiny.snapshot("clean-off", description="before the change")

    tiny.start()
    tiny.wait_for_output(READY, BOOT_TIMEOUT)
    sh(tiny, "echo precious > /mnt/disk/f; sync")
    assert tiny.shutdown(timeout=60) is True
    assert read_guest_file(disk, "f", tmp_path) == b"precious\n"

    tiny.rollback("clean-off")
    assert tiny.state is RunState.SHUTOFF  # a snapshot of a shut-off VM leaves it shut off
    assert read_guest_file(disk, "f", tmp_path) is None

    tiny.start()
    tiny.wait_for_output(READY, BOOT_TIMEOUT)
    out = sh(tiny, "ls /mnt/disk; cat /mnt/disk/f 2>&1")
    assert "lost+found" in out
    assert "No such file" in out
    names = [s.name for s in tiny.snapshots()]
    assert names == ["booted", "clean-off"]
    assert tiny.current_snapshot().name == "clean-off"  # type: ignore[union-attr]


def test_graceful_shutdown_leaves_nothing(tiny: VirtualMachine) -> None:
    assert tiny.state is RunState.RUNNING
    assert tiny.shutdown(timeout=60) is True
    assert tiny.state is RunState.SHUTOFF
    assert qemu_processes("tiny") == []
    tiny.undefine()
    assert tiny.connection.find("tiny") is None
    assert "undefined" in repr(tiny)
    tiny.undefine()  # idempotent
    tiny.stop()


# -- overlay rollback ---------------------------------------------------------------------------------


def test_overlay_rollback(guest: object, qemu_conn: Connection, tmp_path: Path) -> None:
    base = make_ext4(tmp_path / "base.img", "raw", {"keep": b"base\n"})
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    config = tiny_config(guest, "ovl", base, tmp_path, overlay_dir=tmp_path / "overlays")
    with VirtualMachine.with_overlay("ovl", qemu_conn, config) as vm:
        try:
            assert vm.uses_overlay
            overlay = tmp_path / "overlays" / "ovl-vda.vmanager-overlay.qcow2"
            assert overlay.exists()
            vm.start()
            vm.wait_for_output(READY, BOOT_TIMEOUT)
            sh(vm, "echo scratch > /mnt/disk/new; rm /mnt/disk/keep; sync")
            assert sh(vm, "ls /mnt/disk").split() == ["lost+found", "new"]
            vm.rollback()  # discard the overlay: running -> restarted on the base
            assert vm.state is RunState.RUNNING
            vm.wait_for_output(READY, BOOT_TIMEOUT)
            assert sh(vm, "ls /mnt/disk").split() == ["keep", "lost+found"]
            assert vm.shutdown(timeout=0) is False  # no time for ACPI: forced off
            assert vm.state is RunState.SHUTOFF
        finally:
            vm.stop()
            overlay = tmp_path / "overlays" / "ovl-vda.vmanager-overlay.qcow2"
            vm.undefine()
    assert not overlay.exists()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest  # the base was never written
    assert qemu_processes("ovl") == []


# -- up-front checks (no boot) ------------------------------------------------------------------------


def test_raw_disk_snapshot_is_refused_up_front(guest: object, qemu_conn: Connection, tmp_path: Path) -> None:
    disk = make_ext4(tmp_path / "raw.img", "raw")
    vm = VirtualMachine("rawsnap", qemu_conn, tiny_config(guest, "rawsnap", disk, tmp_path))
    try:
        with pytest.raises(UnsupportedOperationError, match="qcow2") as info:
            vm.snapshot("nope")
        assert "overlay" in str(info.value)
        assert vm.snapshots() == []
    finally:
        vm.undefine()


def test_excluded_io_disk_snapshot_is_refused(guest: object, qemu_conn: Connection, tmp_path: Path) -> None:
    disk = make_ext4(tmp_path / "sys.qcow2", "qcow2")
    io = make_ext4(tmp_path / "io.qcow2", "qcow2")
    config = tiny_config(guest, "iodisk", disk, tmp_path, disks=[Disk(io, snapshot=False)])
    vm = VirtualMachine("iodisk", qemu_conn, config)
    try:
        with pytest.raises(UnsupportedOperationError, match=r"IO disk|excluded"):
            vm.snapshot("nope")
    finally:
        vm.undefine()


def test_missing_files_checked_on_real_hypervisor(
    guest: object, qemu_conn: Connection, tmp_path: Path
) -> None:
    config = tiny_config(guest, "missing", tmp_path / "disk.vdi", tmp_path)
    with pytest.raises(DiskNotFoundError, match="hd_location"):
        VirtualMachine("missing", qemu_conn, config)
    assert qemu_conn.find("missing") is None


def test_accelerator_detection_is_consistent(guest: object, qemu_conn: Connection, tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    accel = detect_accelerator()
    assert accel in {"kvm", "tcg"}
    if not os.path.exists("/dev/kvm"):
        assert accel == "tcg"
    disk = make_ext4(tmp_path / "a.qcow2", "qcow2")
    vm = VirtualMachine("accel", qemu_conn, tiny_config(guest, "accel", disk, tmp_path))
    try:
        domain_type = ET.fromstring(qemu_conn.lookup("accel").xml_desc()).get("type")
        assert domain_type == ("kvm" if accel == "kvm" else "qemu")
    finally:
        vm.undefine()
