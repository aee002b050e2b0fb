"""A real QEMU guest on the embedded driver (TCG): boot, snapshots, rollback, overlay, shutdown.

One booted guest is shared by the tests of the snapshot sequence; they run in file order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from vmanager import (
    ConfigError,
    Connection,
    Disk,
    DiskNotFoundError,
    RunState,
    SnapshotNotFoundError,
    VirtualMachine,
    VMConfig,
    detect_accelerator,
)
from vmanager._libvirt import LOG_ROUTED, embed_uri

from ._guest import BOOT_TIMEOUT, READY, make_ext4, read_guest_file, sh

pytestmark = pytest.mark.qemu


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


def _first_block(image: Path, tmp: Path) -> bytes:
    flat = tmp / "first.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(flat)], check=True)
    try:
        return flat.read_bytes()[:4096]
    finally:
        flat.unlink()


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vpc"])
def test_external_snapshot_tree_of_any_format_shut_off(
    guest: object, qemu_conn: Connection, tmp_path: Path, fmt: str
) -> None:
    """Non-qcow2 disks get external snapshots; the IO disk is left out; files come and go with the tree."""
    disk = make_ext4(tmp_path / f"sys.{fmt}", fmt, {"keep": b"kept\n"})
    pristine = hashlib.sha256(disk.read_bytes()).hexdigest()
    io = make_ext4(tmp_path / "io.qcow2", "qcow2")
    io_digest = hashlib.sha256(io.read_bytes()).hexdigest()
    layers = tmp_path / "layers"
    config = tiny_config(guest, "ext", disk, tmp_path, disks=[Disk(io, snapshot=False)], overlay_dir=layers)
    vm = VirtualMachine("ext", qemu_conn, config)
    try:
        original = _first_block(disk, tmp_path)
        vm.snapshot("a", "first")
        top_a = vm.disks()["vda"]
        # the same config attaches again: the disk is further down the chain now, still the same disk
        assert VirtualMachine("ext", qemu_conn, config).disks() == vm.disks()
        with pytest.raises(ConfigError, match="memory"):
            VirtualMachine("ext", qemu_conn, attrs.evolve(config, memory=512))
        assert top_a.parent == layers
        assert vm.disks()["vdb"] == io  # the IO disk is never overlaid
        # a "guest" writes (the VM is off: nothing else has the file open)
        subprocess.run(["qemu-io", "-c", "write -P 0xab 0 4k", str(top_a)], check=True, capture_output=True)
        vm.snapshot("b", "second")
        subprocess.run(
            ["qemu-io", "-c", "write -P 0xcd 0 4k", str(vm.disks()["vda"])], check=True, capture_output=True
        )
        assert [(s.name, s.parent, s.state) for s in vm.snapshots()] == [
            ("a", None, RunState.SHUTOFF),
            ("b", "a", RunState.SHUTOFF),
        ]
        assert vm.snapshot_info("a").children == ("b",)

        vm.rollback("a")
        assert vm.state is RunState.SHUTOFF
        assert _first_block(vm.disks()["vda"], tmp_path) == original
        assert read_guest_file(vm.disks()["vda"], "keep", tmp_path) == b"kept\n"
        assert vm.current_snapshot().name == "a"  # type: ignore[union-attr]
        vm.rollback("b")
        assert _first_block(vm.disks()["vda"], tmp_path) == b"\xab" * 4096

        vm.delete_snapshot("a")  # b still needs a's layer: it stays
        assert [(s.name, s.parent) for s in vm.snapshots()] == [("b", None)]
        vm.rollback("b")
        assert _first_block(vm.disks()["vda"], tmp_path) == b"\xab" * 4096
        vm.delete_snapshot("b")
        # left: the current top and a's layer below it (the current state reads through it)
        assert set(layers.iterdir()) == {vm.disks()["vda"], top_a}
        with pytest.raises(SnapshotNotFoundError, match="none"):
            vm.rollback("b")
    finally:
        vm.undefine()
    assert list(layers.iterdir()) == []
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == pristine  # the user's disk was never written
    assert hashlib.sha256(io.read_bytes()).hexdigest() == io_digest


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
