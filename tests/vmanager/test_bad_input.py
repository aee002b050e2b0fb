"""Hostile strings anywhere in a config, a name, a description or a URI: always a typed error naming the
field (a :class:`ConfigError` for config fields), never ``ValueError``, ``ParseError`` or
``UnicodeEncodeError`` from deeper down, and never XML that libvirt cannot read.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmanager import (
    ConfigError,
    Connection,
    Disk,
    DiskNotFoundError,
    DomainNotFoundError,
    SnapshotNotFoundError,
    VirtualMachine,
    VManagerError,
    VMConfig,
    domain_xml,
)

PATH_FIELDS = ["disk_location", "hd_location", "kernel", "initrd", "serial_log", "overlay_dir"]
# any code point, lone surrogates included (hypothesis leaves those out unless asked)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
# U+FFFE and U+FFFF are valid in a file name but not in XML 1.0 (whose Char stops at U+FFFD)
BAD_CHARS = st.sampled_from(
    ["\x00", "\x01", "\n", "\r", "\x1b", "\x7f", "\x85", "\ud800", "\udcff", "\ufffe", "\uffff"]
)
SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _config(**fields: object) -> VMConfig:
    base: dict[str, object] = {"name": "p", "kernel": "/boot/vmlinuz", "disks": ["/images/data.img"]}
    base.update(fields)
    return VMConfig(**base)  # type: ignore[arg-type]


def _error(fn: Callable[..., object], *args: object, **kwargs: object) -> VManagerError | None:
    """The VManagerError ``fn`` raised, or None; any other exception fails the test by propagating."""
    try:
        fn(*args, **kwargs)
    except VManagerError as exc:
        return exc
    return None


def _field(err: VManagerError | None) -> str | None:
    assert err is None or isinstance(err, ConfigError), repr(err)
    return None if err is None else err.field


def _assert_renders(config: VMConfig) -> None:
    for family in ("qemu", "test", "xen"):
        ET.fromstring(domain_xml(config, family))  # well-formed, whatever went in


@pytest.mark.parametrize("field", PATH_FIELDS)
@SETTINGS
@given(value=ANY_TEXT)
def test_any_path_text_builds_or_names_the_field(field: str, value: str) -> None:
    err = _error(_config, **{field: value})
    assert _field(err) in {None, field}
    if err is None:
        _assert_renders(_config(**{field: value}))
    else:
        assert field in str(err)


@pytest.mark.parametrize("field", PATH_FIELDS)
@SETTINGS
@given(prefix=st.text(max_size=10), bad=BAD_CHARS, suffix=st.text(max_size=10))
def test_a_bad_character_in_a_path_names_the_field(field: str, prefix: str, bad: str, suffix: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(**{field: f"/images/{prefix}{bad}{suffix}.img"})
    assert info.value.field == field
    assert isinstance(info.value, VManagerError)


@SETTINGS
@given(value=ANY_TEXT, index=st.integers(0, 2))
def test_extra_disk_paths_name_the_disk(value: str, index: int) -> None:
    disks: list[object] = ["/images/a.img"] * index + [{"path": value, "snapshot": False}]
    err = _error(_config, disks=disks)
    assert _field(err) in {None, f"disks[{index}].path", f"disks[{index}]"}
    if err is None:
        config = _config(disks=disks)
        assert config.disks[index] == Disk(Path(value), snapshot=False)
        _assert_renders(config)


@SETTINGS
@given(value=st.text(st.characters(exclude_categories=()), max_size=80))
def test_any_cmdline_builds_or_names_the_field(value: str) -> None:
    err = _error(_config, cmdline=value)
    assert _field(err) in {None, "cmdline"}
    if err is None:
        assert ET.fromstring(domain_xml(_config(cmdline=value), "qemu")).findtext("os/cmdline") == value


@pytest.mark.parametrize("bad", ["\ufffe", "\uffff"])
def test_characters_xml_cannot_hold_in_the_cmdline_name_the_field(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(cmdline=f"console=ttyS0 {bad}")
    assert info.value.field == "cmdline"


@SETTINGS
@given(value=ANY_TEXT)
def test_any_name_builds_or_names_the_field(value: str) -> None:
    err = _error(VMConfig, name=value, kernel="/k")
    assert _field(err) in {None, "name"}
    if err is None:
        assert ET.fromstring(domain_xml(VMConfig(name=value, kernel="/k"), "qemu")).findtext("name") == value


@SETTINGS
@given(value=ANY_TEXT)
def test_any_memory_or_network_string_names_the_field(value: str) -> None:
    for field in ("memory", "vcpus", "network"):
        assert _field(_error(_config, **{field: value})) in {None, field}


@pytest.mark.parametrize(
    "path",
    [
        "/" + "d/" * 2100 + "disk.vdi",
        "/images/" + "n" * 256 + ".vdi",
        "/images/\udc80.vdi",
        "/images/a\x00.vdi",
    ],
)
def test_overlong_and_undecodable_paths(path: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(hd_location=path)
    assert info.value.field == "hd_location"
    assert not isinstance(info.value, UnicodeError)


# -- on a (fake) hypervisor: names, descriptions, missing files, URIs ------------------------------------


@pytest.fixture
def vm(conn: Connection) -> Iterator[VirtualMachine]:
    machine = VirtualMachine("victim", conn, {"memory": 64, "kernel": "/k"})
    machine.start()
    yield machine
    machine.close()


@SETTINGS
@given(name=ANY_TEXT, description=st.text(st.characters(exclude_categories=()), max_size=60))
def test_snapshot_names_and_descriptions(vm: VirtualMachine, name: str, description: str) -> None:
    err = _error(vm.snapshot, name, description)
    assert _field(err) in {None, "snapshot name", "description"}
    if err is None:
        assert vm.snapshot_info(name).description == description
        vm.delete_snapshot(name)


@pytest.mark.parametrize("description", ["a\x00b", "bell\x07", "\ud83d", "esc\x1b[2J", "\ufffe", "x\uffff"])
def test_bad_descriptions_are_config_errors(vm: VirtualMachine, description: str) -> None:
    with pytest.raises(ConfigError) as info:
        vm.snapshot("s", description)
    assert info.value.field == "description"
    assert vm.snapshots() == []
    vm.snapshot("s", "two lines\n\tindented")  # tabs and newlines are fine
    assert vm.snapshot_info("s").description == "two lines\n\tindented"


@SETTINGS
@given(name=ANY_TEXT)
def test_any_vm_name(conn: Connection, name: str) -> None:
    err = _error(VirtualMachine.attach, name, conn)
    assert isinstance(err, DomainNotFoundError) or _field(err) == "name"


def test_unknown_snapshot_names_those_that_exist(vm: VirtualMachine) -> None:
    vm.snapshot("one")
    vm.snapshot("two")
    for call in (vm.rollback, vm.delete_snapshot, vm.snapshot_info):
        with pytest.raises(SnapshotNotFoundError, match=r"'three'.*'one', 'two'") as info:
            call("three")
        assert info.value.available == ("one", "two")


@pytest.mark.parametrize("field", ["hd_location", "disk_location", "kernel"])
def test_missing_iso_or_disk_names_the_field(conn: Connection, tmp_path: Path, field: str) -> None:
    config = _config(validate_paths=True, **{field: tmp_path / "missing.img"})
    with pytest.raises(DiskNotFoundError) as info:
        VirtualMachine("m", conn, config)
    assert info.value.field == field
    assert str(tmp_path / "missing.img") in str(info.value)


def test_a_directory_or_fifo_as_disk_names_the_field(conn: Connection, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for path, kind in ((tmp_path, "directory"), (tmp_path / "fifo", "not a regular file")):
        with pytest.raises(ConfigError, match=kind) as info:
            VirtualMachine("m", conn, _config(validate_paths=True, disk_location=path))
        assert info.value.field == "disk_location"


@pytest.mark.parametrize(
    "uri", ["test:///default\x00", "test:///\udc80", "test:///default\n", "qemu:///émbed"]
)
def test_bad_uris_are_config_errors(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        Connection(uri)
    assert info.value.field == "uri"
