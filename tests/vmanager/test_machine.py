"""VirtualMachine lifecycle and snapshot logic on libvirt's test driver (fast, no guest)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

import vmanager
from vmanager import (
    ConfigError,
    Connection,
    DiskInUseError,
    DiskNotFoundError,
    DomainNotFoundError,
    HypervisorConnectionError,
    HypervisorError,
    RunState,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
    VirtualMachine,
    VManagerError,
    VMConfig,
    VMStateError,
    VMTimeoutError,
)
from vmanager._libvirt import translate


def make_vm(conn: Connection, name: str = "vm1", **config: object) -> VirtualMachine:
    data: dict[str, object] = {"name": name, "memory": 128, "hd_location": f"/images/{name}.qcow2"}
    data.update(config)
    return VirtualMachine(name, conn, config=data)


@pytest.fixture
def vm(conn: Connection) -> Iterator[VirtualMachine]:
    machine = make_vm(conn)
    yield machine
    machine.close()


def test_first_argument_is_domain_name_config_name_is_title(conn: Connection) -> None:
    vm = VirtualMachine("hey", conn, config={"name": "test123", "memory": "123", "hd_location": "disk.vdi"})
    root = ET.fromstring(conn.raw.lookupByName("hey").XMLDesc(0))
    assert root.findtext("name") == "hey"
    assert root.findtext("title") == "test123"
    assert conn.find("test123") is None
    assert root.findtext("memory") == str(123 * 1024)  # KiB in libvirt's own XML
    # a config without a name takes the first argument
    vm2 = VirtualMachine("noname", conn, config={"memory": 64, "kernel": "/k"})
    assert ET.fromstring(conn.raw.lookupByName("noname").XMLDesc(0)).find("title") is None
    assert vm.name == "hey"
    assert vm2.config is not None
    assert vm2.config.name == "noname"


def test_attach_to_existing_domain(conn: Connection) -> None:
    make_vm(conn, "vm1").start()
    again = VirtualMachine("vm1", conn)
    assert again.state is RunState.RUNNING
    # with the same config, an existing domain is attached to
    same = make_vm(conn, "vm1")
    assert same.state is RunState.RUNNING
    assert VirtualMachine.attach("vm1", conn).state is RunState.RUNNING
    assert VirtualMachine.define(
        VMConfig(name="vm1", memory=128, hd_location="/images/vm1.qcow2"), conn
    ).is_running
    # with other hardware, it says what differs instead of silently ignoring the config
    with pytest.raises(ConfigError, match=r"already exists.*memory 128 MiB \(config: 999 MiB\)") as info:
        VirtualMachine("vm1", conn, config={"memory": 999, "kernel": "/k"})
    assert info.value.field == "config"
    assert "kernel None (config: '/k')" in str(info.value)
    assert "disk vda /images/vm1.qcow2 (config: none)" in str(info.value)
    assert ET.fromstring(conn.raw.lookupByName("vm1").XMLDesc(0)).findtext("memory") == str(128 * 1024)


def test_define_and_attach(conn: Connection) -> None:
    vm = VirtualMachine.define({"name": "d1", "memory": 64, "kernel": "/k"}, conn)
    assert vm.name == "d1"
    assert vm.state is RunState.SHUTOFF
    with pytest.raises(DomainNotFoundError, match="'d2'"):
        VirtualMachine.attach("d2", conn)
    with pytest.raises(ConfigError, match="name"):
        VirtualMachine.define({"memory": 64, "kernel": "/k"}, conn)
    with pytest.raises(ConfigError, match="VMConfig or a dict"):
        VirtualMachine.define(42, conn)  # type: ignore[arg-type]


def test_lifecycle_state_sequence(vm: VirtualMachine) -> None:
    seen = [vm.state]
    for step in (vm.start, vm.pause, vm.resume, vm.reboot, vm.stop, vm.start, vm.shutdown):
        step()
        seen.append(vm.state)
    assert seen == [
        RunState.SHUTOFF,
        RunState.RUNNING,
        RunState.PAUSED,
        RunState.RUNNING,
        RunState.RUNNING,
        RunState.SHUTOFF,
        RunState.RUNNING,
        RunState.SHUTOFF,
    ]


def test_stop_and_shutdown_are_noops_when_off(vm: VirtualMachine) -> None:
    vm.stop()
    assert vm.shutdown(timeout=0.1) is True
    assert vm.state is RunState.SHUTOFF


def test_shutdown_of_paused_vm(vm: VirtualMachine) -> None:
    vm.start()
    vm.pause()
    assert vm.shutdown(timeout=5) is True
    assert vm.state is RunState.SHUTOFF


@pytest.mark.parametrize(
    ("operation", "state_setup"),
    [("start", "running"), ("pause", "off"), ("resume", "running"), ("reboot", "off"), ("resume", "off")],
)
def test_wrong_state_is_typed(vm: VirtualMachine, operation: str, state_setup: str) -> None:
    if state_setup == "running":
        vm.start()
    before = vm.state
    with pytest.raises(VMStateError) as info:
        getattr(vm, operation)()
    assert info.value.state is before
    assert before not in info.value.required
    assert operation in str(info.value)
    assert vm.state is before


def test_wait_for_times_out(vm: VirtualMachine) -> None:
    vm.start()
    vm.wait_for(RunState.RUNNING, timeout=1)
    with pytest.raises(VMTimeoutError) as info:
        vm.wait_for(RunState.PAUSED, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert "still RUNNING" in str(info.value)


def test_context_manager_leaves_nothing_running(conn: Connection) -> None:
    with make_vm(conn, "ctx") as vm:
        vm.start()
        assert vm.state is RunState.RUNNING
    assert conn.lookup("ctx").state() == libvirt.VIR_DOMAIN_SHUTOFF
    assert not conn.closed  # an injected connection stays open

    # even when the block raises
    def crash() -> None:
        with make_vm(conn, "ctx2") as vm2:
            vm2.start()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        crash()
    assert conn.lookup("ctx2").state() == libvirt.VIR_DOMAIN_SHUTOFF


def test_owned_connection_closed_by_context_manager(test_uri: str) -> None:
    with VirtualMachine("own", test_uri, config={"kernel": "/k"}) as vm:
        vm.start()
        assert not vm.connection.closed
    assert vm.connection.closed
    assert "closed" in repr(vm)


def test_injected_raw_libvirt_connection(test_uri: str) -> None:
    raw = libvirt.open(test_uri)
    try:
        with VirtualMachine("raw", raw, config={"kernel": "/k"}) as vm:
            vm.start()
        assert raw.isAlive()
        assert raw.lookupByName("raw").state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    finally:
        raw.close()


def test_snapshot_tree_current_and_rollback_run_state(vm: VirtualMachine) -> None:
    taken = [vm.snapshot("off-1", description="shut off & <quoted>")]
    vm.start()
    first = vm.snapshot("run-1", description="running")
    assert first.is_current
    assert first.parent == "off-1"
    taken.append(first)
    vm.pause()
    taken.append(vm.snapshot("paused-1"))
    vm.resume()
    taken.append(vm.snapshot("run-2"))
    # what snapshot() returns is what libvirt recorded (children and current aside, which move on)
    for snap in taken:
        info = vm.snapshot_info(snap.name)
        assert (snap.name, snap.description, snap.parent, snap.created, snap.state) == (
            info.name, info.description, info.parent, info.created, info.state
        )  # fmt: skip

    snaps = {s.name: s for s in vm.snapshots()}
    assert [s.name for s in vm.snapshots()] == ["off-1", "run-1", "paused-1", "run-2"]
    assert snaps["off-1"].children == ("run-1",)
    assert snaps["run-1"].children == ("paused-1",)
    assert snaps["paused-1"].parent == "run-1"
    assert snaps["off-1"].state is RunState.SHUTOFF
    assert snaps["run-1"].state is RunState.RUNNING
    assert snaps["paused-1"].state is RunState.PAUSED
    assert [s.name for s in vm.snapshots() if s.is_current] == ["run-2"]
    assert snaps["off-1"].description == "shut off & <quoted>"

    vm.rollback("off-1")  # from running to a shut-off snapshot
    assert vm.state is RunState.SHUTOFF
    assert vm.current_snapshot() is not None
    assert vm.current_snapshot().name == "off-1"  # type: ignore[union-attr]
    vm.rollback("run-1")  # from shut off to a running snapshot
    assert vm.state is RunState.RUNNING
    vm.rollback("paused-1")
    assert vm.state is RunState.PAUSED
    vm.rollback("run-2")  # paused -> running
    assert vm.state is RunState.RUNNING
    vm.stop()
    vm.rollback()  # no name: the current snapshot (run-2)
    assert vm.state is RunState.RUNNING


def test_delete_snapshot_reparents_children(vm: VirtualMachine) -> None:
    vm.snapshot("a")
    vm.snapshot("b")
    vm.snapshot("c")
    vm.delete_snapshot("b")
    snaps = {s.name: s for s in vm.snapshots()}
    assert set(snaps) == {"a", "c"}
    assert snaps["c"].parent == "a"
    vm.deleteSnapshot("a")
    assert vm.listSnapshots() == ["c"]
    vm.delete_snapshot("c")
    assert vm.snapshots() == []
    assert vm.current_snapshot() is None


def test_delete_snapshot_with_children(vm: VirtualMachine) -> None:
    vm.snapshot("a")
    vm.snapshot("b")
    vm.snapshot("other")
    vm.delete_snapshot("a", children=True)
    assert vm.listSnapshots() == []


def test_snapshot_errors(vm: VirtualMachine) -> None:
    vm.snapshot("one")
    vm.snapshot("two")
    with pytest.raises(SnapshotNotFoundError) as info:
        vm.rollback("three")
    assert isinstance(info.value, LookupError)
    assert info.value.available == ("one", "two")
    assert "'one', 'two'" in str(info.value)
    with pytest.raises(SnapshotNotFoundError):
        vm.delete_snapshot("three")
    with pytest.raises(SnapshotExistsError, match="one"):
        vm.snapshot("one")
    with pytest.raises(ConfigError):
        vm.snapshot("bad name")


def test_rollback_without_snapshots(vm: VirtualMachine) -> None:
    with pytest.raises(SnapshotNotFoundError, match="none"):
        vm.rollback()


def test_camelcase_aliases(vm: VirtualMachine) -> None:
    vm.createSnapshot("x", "desc")
    assert vm.listSnapshots() == ["x"]
    vm.start()
    vm.revertToSnapshot("x")
    assert vm.state is RunState.SHUTOFF
    vm.deleteSnapshot("x")
    assert vm.listSnapshots() == []


def test_undefine_removes_domain_and_snapshots(conn: Connection) -> None:
    vm = make_vm(conn, "gone")
    vm.start()
    vm.snapshot("s1")
    vm.snapshot("s2")
    vm.undefine()
    assert conn.find("gone") is None
    with pytest.raises(DomainNotFoundError):
        VirtualMachine("gone", conn)


def test_unknown_domain_without_config(conn: Connection) -> None:
    with pytest.raises(DomainNotFoundError) as info:
        VirtualMachine("nobody", conn)
    assert isinstance(info.value, LookupError)
    assert "nobody" in str(info.value)
    assert conn.uri in str(info.value)


def test_disk_in_use_by_another_vm(conn: Connection, tmp_path: Path) -> None:
    disk = tmp_path / "shared.qcow2"
    first = make_vm(conn, "first", hd_location=disk)
    with pytest.raises(DiskInUseError) as info:
        make_vm(conn, "second", hd_location=disk)
    assert info.value.other_vm == "first"
    assert info.value.path == disk
    assert "'first'" in str(info.value)
    assert conn.find("second") is None
    # read-only use on both sides is fine (two overlays over one base)
    make_vm(conn, "ro1", hd_location=None, kernel="/k", disks=[{"path": tmp_path / "b", "readonly": True}])
    make_vm(conn, "ro2", hd_location=None, kernel="/k", disks=[{"path": tmp_path / "b", "readonly": True}])
    # start() checks running domains: define a clash behind vmanager's back, start both
    xml = vmanager.domain_xml(first.config, "test", name="rogue")  # type: ignore[arg-type]
    conn.raw.defineXML(xml).create()
    with pytest.raises(DiskInUseError, match="rogue"):
        first.start()
    assert first.state is RunState.SHUTOFF


def test_missing_files_are_typed_when_validated(conn: Connection, tmp_path: Path) -> None:
    iso = tmp_path / "dsl-4.4.10.iso"
    with pytest.raises(DiskNotFoundError) as info:
        make_vm(conn, "v", disk_location=iso, hd_location=None, validate_paths=True)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.field == "disk_location"
    assert info.value.path == iso
    assert str(iso) in str(info.value)
    with pytest.raises(DiskNotFoundError, match="hd_location"):
        make_vm(conn, "v", hd_location=tmp_path / "disk.vdi", validate_paths=True)
    # the test driver opens no files: by default nothing is checked there
    make_vm(conn, "v", disk_location=iso)


def test_bad_memory_is_typed(conn: Connection) -> None:
    with pytest.raises(ConfigError, match="memory"):
        VirtualMachine("m", conn, config={"memory": "lots", "kernel": "/k"})
    with pytest.raises(ConfigError, match="config"):
        VirtualMachine("m", conn, config=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name"):
        VirtualMachine("bad/name", conn)


@pytest.mark.parametrize(
    "uri",
    ["qemu+tcp://127.0.0.1:1/system", "test:///nonexistent/node.xml"],
)
def test_unreachable_uri(uri: str) -> None:
    with pytest.raises(HypervisorConnectionError) as info:
        VirtualMachine("x", uri)
    assert isinstance(info.value, ConnectionError)
    assert info.value.uri == uri
    assert uri in str(info.value)
    assert isinstance(info.value.__cause__, libvirt.libvirtError)


def test_unsupported_uri_scheme() -> None:
    with pytest.raises(ConfigError, match="uri"):
        Connection("lxc:///")


def test_console_on_driver_without_console(vm: VirtualMachine) -> None:
    vm.start()
    with pytest.raises(UnsupportedOperationError, match="console"):
        vm.console_write("echo hi\n")


def test_console_output_needs_serial_log(vm: VirtualMachine, conn: Connection, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serial_log"):
        vm.console_output()
    log = tmp_path / "serial.log"
    logged = make_vm(conn, "logged", serial_log=log)
    assert logged.serial_log == log
    assert logged.console_output() == ""
    log.write_bytes(b"hello \xff world\n")
    assert logged.console_output() == "hello \ufffd world\n"
    assert logged.wait_for_output(r"w.rld", timeout=1).group(0) == "world"
    logged.start()
    with pytest.raises(VMTimeoutError, match="never"):
        logged.wait_for_output("never", timeout=0.2)


def test_other_libvirt_failures_are_hypervisor_errors(conn: Connection) -> None:
    try:
        conn.raw.lookupByUUIDString("not-a-uuid")
    except libvirt.libvirtError as exc:
        err = translate(exc, uri=conn.uri)
    assert type(err) is HypervisorError
    assert err.code == libvirt.VIR_ERR_INVALID_ARG


def test_translate_maps_missing_qemu_user() -> None:
    exc = libvirt.libvirtError("Failed to parse user 'libvirt-qemu'")
    err = translate(exc, uri="qemu:///embed?root=/x")
    assert isinstance(err, HypervisorConnectionError)
    assert "useradd -r libvirt-qemu" in str(err)


def test_repr_and_html(vm: VirtualMachine) -> None:
    assert repr(vm) == f"<VirtualMachine 'vm1' SHUTOFF on {vm.uri!r}>"
    assert "no snapshots" in vm._repr_html_()
    vm.snapshot("s1", description="a & b")
    html = vm._repr_html_()
    assert "s1 *" in html
    assert "a &amp; b" in html
    snap = vm.snapshots()[0]
    assert "(current)" in snap._repr_html_()
    assert "a &amp; b" in snap._repr_html_()


def test_every_error_is_a_vmanager_error() -> None:
    for name in vmanager.errors.__all__:
        cls = getattr(vmanager.errors, name)
        assert issubclass(cls, VManagerError)


def test_overlay_needs_qemu(conn: Connection, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedOperationError, match="QEMU"):
        VirtualMachine.with_overlay("o", conn, {"hd_location": tmp_path / "base.raw"})
    with pytest.raises(ConfigError):
        VirtualMachine.with_overlay("o", conn, None)
    vm = make_vm(conn, "plain")
    assert not vm.uses_overlay
    with pytest.raises(UnsupportedOperationError, match="no overlay"):
        vm.discard_overlay()


def test_vmconfig_accepted_directly(conn: Connection) -> None:
    config = VMConfig(name="direct", memory=64, kernel="/k")
    vm = VirtualMachine("direct", conn, config)
    assert vm.config is config
    assert vm.state is RunState.SHUTOFF
