"""The original PyTI example for real: a live CD and a VirtualBox hard disk on QEMU (TCG).

The CD is a BIOS-bootable ISO of the tiny test guest (isolinux from Debian, written by genisoimage); the
hard disk is a VDI. VDI is not qcow2, so snapshots are external: a qcow2 overlay per snapshot over the
frozen VDI, with the running guest's memory saved beside. On libvirt < 9.9, which cannot revert those,
vmanager reverts through libvirt's APIs.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmanager import *  # noqa: F403 - the example's own import
from vmanager import Disk, RunState, VirtualMachine

from ._guest import BOOT_TIMEOUT, READY, build_live_iso, live_iso_tools, make_ext4, read_guest_file, sh

pytestmark = pytest.mark.qemu

if (missing := live_iso_tools()) is not None or shutil.which("qemu-img") is None:
    pytestmark = [pytest.mark.qemu, pytest.mark.skip(reason=missing or "qemu-img is not installed")]

COUNT = re.compile(r"COUNT-(\d+)\r?\n")


@pytest.fixture(scope="module")
def live_iso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pyti_core.guest.tinylinux import build_tiny_linux

    guest = build_tiny_linux()
    return build_live_iso(
        guest.kernel, guest.initrd, guest.cmdline, tmp_path_factory.mktemp("iso") / "live.iso"
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def our_files(name: str) -> set[Path]:
    """The files vmanager made for VM ``name`` in the default overlay folder."""
    from vmanager._libvirt import user_cache_dir

    return set((user_cache_dir() / "pyti" / "overlays").glob(f"{name}@*"))


def last_count(vm: VirtualMachine, timeout: float = 30.0) -> int:
    """The newest counter value the guest printed (waits for at least one)."""
    value = int(vm.console_expect(COUNT, timeout).group(1))
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # drain what is already there
        try:
            value = int(vm.console_expect(COUNT, 0.4).group(1))
        except TimeoutError:
            break
    return value


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    before = our_files("hey")  # left by an interrupted run, if any: not this test's business
    yield tmp_path
    leftovers = our_files("hey") - before
    assert not leftovers, f"files left behind: {leftovers}"


def test_original_example_live_cd_and_vdi(live_iso: Path, in_tmp: Path) -> None:
    shutil.copy(live_iso, in_tmp / "live.iso")
    make_ext4(in_tmp / "disk.vdi", "vdi", {"keep": b"from the VDI\n"})
    pristine = sha256(in_tmp / "disk.vdi")
    earlier = our_files("hey")  # an interrupted run's, if any

    # -- the example, as written (only the URI left out: libvirt's QEMU driver in this process) --
    config = {"name": "test123", "memory": "256", "disk_location": "live.iso", "hd_location": "disk.vdi"}
    a = VirtualMachine("hey", config=config)
    try:
        assert a.state is RunState.SHUTOFF
        a.snapshot("off", "before the first boot")  # an offline snapshot, to roll the disk back to later
        assert sha256(in_tmp / "disk.vdi") == pristine

        a.start()  # boots the ISO through the BIOS: CD-ROM first, then the hard disk
        a.console_expect(READY, BOOT_TIMEOUT)
        assert "from the VDI" in sh(a, "cat /mnt/disk/keep")  # the VDI is the guest's /dev/vda
        a.console_write("(i=0; while :; do i=$((i+1)); echo COUNT-$i; sleep 0.2; done) &\n")
        before = last_count(a)

        a.createSnapshot("hello", "blah")  # while running
        snap = a.snapshot_info("hello")
        assert (snap.state, snap.description, snap.parent) == (RunState.RUNNING, "blah", "off")
        at_snapshot = last_count(a)
        assert at_snapshot >= before
        sh(a, "echo changed > /mnt/disk/new; sync")
        later = at_snapshot
        while later < at_snapshot + 15:
            later = last_count(a)

        a.rollback("hello")  # running again, memory as it was
        assert a.state is RunState.RUNNING
        resumed = int(a.console_expect(COUNT, 30).group(1))
        # the guest continues from the snapshot (the counter goes back), it did not reboot
        assert resumed <= at_snapshot + 3 < later, (before, at_snapshot, later, resumed)
        assert "No such file" in sh(a, "ls /mnt/disk/new 2>&1")
        sh(a, "echo precious > /mnt/disk/lost; sync")
        assert [s.name for s in a.snapshots()] == ["off", "hello"]
        assert a.current_snapshot().name == "hello"  # type: ignore[union-attr]

        a.stop()
        top = a.disks()["vda"]
        assert read_guest_file(top, "lost", in_tmp) == b"precious\n"
        a.rollback("off")  # an offline snapshot: the disk as it was, the VM shut off
        assert a.state is RunState.SHUTOFF
        top = a.disks()["vda"]
        assert top.suffix == ".qcow2"  # the VDI is only ever read now
        assert read_guest_file(top, "lost", in_tmp) is None
        assert read_guest_file(top, "keep", in_tmp) == b"from the VDI\n"
        assert a.current_snapshot().name == "off"  # type: ignore[union-attr]

        memory = {p for p in our_files("hey") - earlier if p.name.endswith(".vmanager-mem")}
        assert len(memory) == 1
        a.delete_snapshot("hello")  # its saved memory and the layers only it needed go
        assert not any(p.exists() for p in memory)
        assert [s.name for s in a.snapshots()] == ["off"]
        a.rollback("off")
        assert sha256(in_tmp / "disk.vdi") == pristine
    finally:
        a.stop()
        a.undefine()  # every overlay and memory file vmanager made goes; the VDI stays
        a.close()
    check = subprocess.run(
        ["qemu-img", "check", "-f", "vdi", str(in_tmp / "disk.vdi")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert sha256(in_tmp / "disk.vdi") == pristine  # byte-identical to before the first snapshot


def test_io_disk_keeps_its_data_across_a_running_rollback(live_iso: Path, in_tmp: Path) -> None:
    """The two-disk rule: the IO disk (snapshot=False) is left out of external snapshots."""
    make_ext4(in_tmp / "disk.vdi", "vdi")
    io = in_tmp / "io.img"
    io.write_bytes(bytes(1 << 20))
    layers = in_tmp / "layers"  # not there yet: vmanager makes it
    config = {
        "disk_location": "live.iso",
        "hd_location": "disk.vdi",
        "disks": [Disk(io, snapshot=False)],
        "overlay_dir": layers,
    }
    shutil.copy(live_iso, in_tmp / "live.iso")
    vm = VirtualMachine("hey", config=config)
    try:
        vm.start()
        vm.console_expect(READY, BOOT_TIMEOUT)
        sh(vm, "echo state-before > /tmp/m")
        vm.snapshot("s")
        sh(vm, "echo state-after > /tmp/m; echo IO-RESULT | dd of=/dev/vdb conv=fsync 2>/dev/null; sync")
        assert io.read_bytes()[:9] == b"IO-RESULT"
        vm.rollback("s")
        assert "state-before" in sh(vm, "cat /tmp/m")  # memory as it was
        assert io.read_bytes()[:9] == b"IO-RESULT"  # the IO disk kept what the guest wrote
        assert vm.disks()["vdb"] == io  # never overlaid
        # a snapshot of a paused guest comes back paused, memory as it was
        vm.pause()
        assert vm.snapshot("p").state is RunState.PAUSED
        vm.resume()
        sh(vm, "echo state-later > /tmp/m")
        vm.rollback("p")
        assert vm.state is RunState.PAUSED
        vm.resume()
        assert "state-before" in sh(vm, "cat /tmp/m")
    finally:
        vm.stop()
        vm.undefine()
        vm.close()
    assert io.read_bytes()[:9] == b"IO-RESULT"
    assert list(layers.iterdir()) == []
