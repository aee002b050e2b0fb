"""vmanager and diskhandler together: the disk a VM uses *now*, handed from one to the other.

The packages never import each other; a user's script joins them. With overlay rollback the VM's
current state lives in an overlay over the read-only base, and DiskOperations.for_vm must see it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from diskhandler import DiskOperations, create_image, create_io_disk, open_image
from vmanager import Disk, VirtualMachine, VMConfig, domain_xml

MiB = 1 << 20


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    node = tmp_path / "node.xml"
    node.write_text("<node/>\n")
    return f"test://{node}"


@pytest.mark.fuse
def test_for_vm_opens_the_disk_the_vm_uses(tmp_path: Path, test_uri: str) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "hello.txt").write_text("from the host\n")
    disk = create_io_disk(tmp_path / "system.vdi", 32 * MiB, "vdi", files=seed)
    vm = VirtualMachine("xpkg", test_uri, config=VMConfig(name="xpkg", memory=64, hd_location=disk))
    try:
        assert list(vm.disks().values()) == [disk]
        with DiskOperations.for_vm(vm, readonly=True) as ops:
            ops.mount()
            assert "hello.txt" in ops.listdir("/")
    finally:
        vm.undefine()


@pytest.mark.fuse
def test_for_vm_follows_the_leaf_of_a_snapshot_chain(tmp_path: Path, test_uri: str) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "state.txt").write_text("base\n")
    base = create_io_disk(tmp_path / "base.qcow2", 32 * MiB, "qcow2", files=seed)
    leaf = tmp_path / "leaf.qcow2"
    create_image(leaf, parent=base).close()
    with DiskOperations(leaf) as ops:  # the VM's current state differs from its base
        ops.mount()
        (tmp_path / "new.txt").write_text("leaf\n")
        ops.upload(tmp_path / "new.txt", "/state.txt")
    vm = VirtualMachine(
        "xleaf", test_uri, config=VMConfig(name="xleaf", memory=64, hd_location=leaf, hd_format="qcow2")
    )
    try:
        with DiskOperations.for_vm(vm, readonly=True) as ops:
            ops.mount()
            ops.download("/state.txt", tmp_path / "got.txt")
        assert (tmp_path / "got.txt").read_text() == "leaf\n"
    finally:
        vm.undefine()


@pytest.mark.fuse
@pytest.mark.qemu
def test_for_vm_sees_the_current_state_through_external_snapshots(tmp_path: Path, libvirt_root: Path) -> None:
    """A VDI under vmanager's external snapshots: DiskOperations reads and writes the VM's state *now*
    (the top qcow2 overlay, the VDI below it), and the VDI itself is never written."""
    import hashlib
    import shutil

    from vmanager import default_uri

    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.skip("QEMU is not installed")
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "state.txt").write_text("base\n")
    disk = create_io_disk(tmp_path / "system.vdi", 32 * MiB, "vdi", files=seed)
    pristine = hashlib.sha256(disk.read_bytes()).hexdigest()
    config = VMConfig(name="xext", memory=64, hd_location=disk, overlay_dir=tmp_path / "layers", accel="tcg")
    vm = VirtualMachine("xext", default_uri(), config=config)
    try:
        vm.snapshot("clean")  # shut off: external, the VDI is now a read-only backing file
        (tmp_path / "new.txt").write_text("after the snapshot\n")
        with DiskOperations.for_vm(vm) as ops:
            ops.mount()
            ops.upload(tmp_path / "new.txt", "/state.txt")
        with DiskOperations.for_vm(vm, readonly=True) as ops:
            ops.mount()
            ops.download("/state.txt", tmp_path / "got.txt")
        assert (tmp_path / "got.txt").read_text() == "after the snapshot\n"
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == pristine
        vm.rollback("clean")
        with DiskOperations.for_vm(vm, readonly=True) as ops:
            ops.mount()
            ops.download("/state.txt", tmp_path / "got.txt")
        assert (tmp_path / "got.txt").read_text() == "base\n"
    finally:
        vm.undefine()
    assert list((tmp_path / "layers").iterdir()) == []
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == pristine


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is needed")
def test_for_vm_opens_a_disk_in_the_format_the_vm_declares(tmp_path: Path) -> None:
    """A raw IO disk a guest rewrote as a qcow2 over a host file: for_vm opens it as the VM has it, raw."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host data\n" * 1000)
    io = tmp_path / "io.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw", str(io), "64M"],
        check=True,
    )
    system = create_io_disk(tmp_path / "system.qcow2", 32 * MiB, "qcow2", files=None)
    config = VMConfig(name="decl", hd_location=system, disks=[Disk(io, snapshot=False, format="raw")])
    xml = domain_xml(config, "qemu")
    ops = DiskOperations.for_vm(xml, target="vdb")
    assert (ops.image, ops.format) == (io, "raw")
    with open_image(ops.image, format=ops.format) as disk:
        assert disk.size == io.stat().st_size  # the qcow2 header's 64 MiB and its backing file unused
    assert DiskOperations.for_vm(xml, target="vda").format == "qcow2"
    assert DiskOperations.for_vm(xml, target="vdb", format="qcow2").format == "qcow2"  # the caller's wins
