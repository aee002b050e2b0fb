"""VMConfig, domain XML for every hypervisor family, and disk-format sniffing."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmanager import Channel, ConfigError, Disk, VMConfig, domain_xml
from vmanager._diskformat import names_other_files, sniff_bytes, sniff_format
from vmanager._domain_xml import render

FAMILIES = ["qemu", "kvm", "vbox", "xen", "test"]
ORIGINAL = {"name": "test123", "memory": "123", "disk_location": "dsl-4.4.10.iso", "hd_location": "disk.vdi"}


def test_from_dict_original_example() -> None:
    config = VMConfig.from_dict(ORIGINAL)
    assert config.name == "test123"
    assert config.memory == 123
    assert config.disk_location == Path("dsl-4.4.10.iso")
    assert config.hd_location == Path("disk.vdi")
    assert config.network is None
    assert VMConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"memory": "12x"}, "memory"),
        ({"memory": 0}, "memory"),
        ({"memory": -5}, "memory"),
        ({"memory": True}, "memory"),
        ({"memory": 2**40}, "memory"),
        ({"vcpus": 0}, "vcpus"),
        ({"name": "has space"}, "name"),
        ({"name": ""}, "name"),
        ({"network": "wifi"}, "network"),
        ({"rollback": "magic"}, "rollback"),
        ({"accel": "hvf"}, "accel"),
        ({"colour": "blue"}, "colour"),
        ({"cmdline": "console=ttyS0"}, "kernel"),
        ({"disks": [{"size": 3}]}, "disks[0]"),
        ({"disks": ["ok.img", {"path": "io.img", "format": "vhdx"}]}, "disks[1].format"),
        ({"disks": [{"path": "io.img", "snapshot": "no"}]}, "disks[0].snapshot"),
        ({"disks": ["a\0b"]}, "disks[0].path"),
        ({"hd_location": "disk\0.vdi"}, "hd_location"),
        ({"disk_location": "live\n.iso"}, "disk_location"),
        ({"kernel": "vmlinuz\udc80"}, "kernel"),
        ({"initrd": "x" * 300}, "initrd"),
        ({"serial_log": "/" + "d/" * 2100}, "serial_log"),
        ({"overlay_dir": b"/tmp"}, "overlay_dir"),
        ({"kernel": "/k", "cmdline": "console=ttyS0\x00 init=/bin/sh"}, "cmdline"),
        ({"kernel": "/k", "cmdline": "a" * 3000}, "cmdline"),
        ({"network": ["user"]}, "network"),
        ({"rollback": ["snapshot"]}, "rollback"),
        ({"validate_paths": "yes"}, "validate_paths"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        VMConfig.from_dict({**ORIGINAL, **data})
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_nothing_to_boot() -> None:
    with pytest.raises(ConfigError, match="nothing to boot"):
        VMConfig(name="empty")


def test_overlay_needs_system_disk() -> None:
    with pytest.raises(ConfigError, match="hd_location"):
        VMConfig(name="o", kernel="/k", rollback="overlay")


def test_memory_int_or_numeric_string() -> None:
    assert VMConfig(name="m", memory=" 512 ", kernel="/k").memory == 512
    assert VMConfig(name="m", memory=512, kernel="/k").memory == 512


def _validate(xml: str, tmp_path: Path) -> None:
    if shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None:
        pytest.skip("virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils) are needed")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    cmd = ["virt-xml-validate", str(path), "domain"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr + xml


@pytest.mark.parametrize("family", FAMILIES)
def test_original_example_xml_validates(family: str, tmp_path: Path) -> None:
    config = VMConfig.from_dict(
        {**ORIGINAL, "disks": [Disk(tmp_path / "io.img", snapshot=False)], "serial_log": "serial.log"}
    )
    xml = domain_xml(config, family, name="hey")
    _validate(xml, tmp_path)
    root = ET.fromstring(xml)
    assert root.get("type") == family
    assert root.findtext("name") == "hey"
    assert root.findtext("title") == "test123"
    assert root.find("memory") is not None
    assert root.findtext("memory") == "123"
    assert root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.find("devices/interface") is None  # no network unless asked for
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom is not None
    assert cdrom.find("readonly") is not None
    io = [d for d in root.iterfind("devices/disk") if d.get("snapshot") == "no"]
    assert len(io) == 1


@pytest.mark.parametrize("family", ["qemu", "kvm", "xen", "test"])
def test_kernel_boot_network_and_overlay_validate(family: str, tmp_path: Path) -> None:
    config = VMConfig(
        name="k",
        memory=256,
        vcpus=2,
        kernel="/boot/vmlinuz",
        initrd="/boot/initrd",
        cmdline="console=ttyS0 panic=-1",
        hd_location=tmp_path / "base.raw",
        serial_log=tmp_path / "serial.log",
        network="network:default",
    )
    overlays = {"vda": tmp_path / "o.qcow2"} if family in {"qemu", "kvm"} else None
    xml = render(config, family, name=None, domain_type=None, overlays=overlays or {})
    _validate(xml, tmp_path)
    root = ET.fromstring(xml)
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.findtext("os/cmdline") == "console=ttyS0 panic=-1"
    assert root.find("devices/interface[@type='network']/source").get("network") == "default"  # type: ignore[union-attr]
    assert root.find("title") is None  # name not overridden: no title
    if overlays:
        disk = root.find("devices/disk")
        assert disk is not None
        assert disk.find("source").get("file") == str(tmp_path / "o.qcow2")  # type: ignore[union-attr]
        assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
        assert disk.find("backingStore/source").get("file") == str(tmp_path / "base.raw")  # type: ignore[union-attr]


def test_vbox_rejects_kernel_and_overlay(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VirtualBox"):
        domain_xml(VMConfig(name="v", kernel="/k"), "vbox")
    with pytest.raises(ConfigError, match="overlay"):
        render(
            VMConfig(name="v", hd_location="d.vdi"),
            "vbox",
            name=None,
            domain_type=None,
            overlays={"sda": tmp_path / "o"},
        )
    with pytest.raises(ConfigError, match="hypervisor"):
        domain_xml(VMConfig(name="v", hd_location="d.vdi"), "bhyve")


def test_qemu_domain_type_override() -> None:
    config = VMConfig(name="q", kernel="/k")
    assert ET.fromstring(domain_xml(config, "qemu", domain_type="kvm")).get("type") == "kvm"
    with pytest.raises(ConfigError, match="domain_type"):
        domain_xml(config, "xen", domain_type="kvm")


# -- disk formats ---------------------------------------------------------------------------------

QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is needed")
@pytest.mark.parametrize(
    ("fmt", "options", "expected"),
    [
        ("qcow2", [], "qcow2"),
        ("vdi", [], "vdi"),
        ("vmdk", [], "vmdk"),
        ("vmdk", ["-o", "subformat=monolithicFlat"], "vmdk"),  # text descriptor
        ("vpc", [], "vpc"),  # dynamic VHD: cookie at 0 and in the footer
        ("vpc", ["-o", "subformat=fixed"], "vpc"),  # fixed VHD: footer only
        ("raw", [], "raw"),
    ],
)
def test_sniff_real_images(fmt: str, options: list[str], expected: str, tmp_path: Path) -> None:
    # The suffix lies on purpose: the format comes from the bytes.
    path = tmp_path / "image.vdi" if fmt != "vdi" else tmp_path / "image.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, *options, str(path), "4M"], check=True)  # type: ignore[list-item]
    assert sniff_format(path) == expected
    if "subformat=monolithicFlat" in options:  # it names its extent: sniffed, but never guessed
        with pytest.raises(ConfigError, match="hd_format='vmdk'"):
            domain_xml(VMConfig(name="f", hd_location=path), "qemu")
        return
    xml = domain_xml(VMConfig(name="f", hd_location=path), "qemu")
    assert ET.fromstring(xml).find("devices/disk/driver").get("type") == expected  # type: ignore[union-attr]


def test_sniff_bytes_edge_cases(tmp_path: Path) -> None:
    assert sniff_bytes(b"") == "raw"
    assert sniff_bytes(b"QFI") == "raw"
    assert sniff_bytes(b"\0" * 512, b"conectix" + bytes(504)) == "vpc"
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    assert sniff_format(empty) == "raw"
    with pytest.raises(FileNotFoundError):
        sniff_format(tmp_path / "missing")


def test_missing_image_renders_as_raw_and_explicit_format_wins(tmp_path: Path) -> None:
    config = VMConfig(name="m", hd_location=tmp_path / "nope.qcow2", disks=[Disk("io.img", format="qcow2")])
    drivers = [
        d.get("type") for d in ET.fromstring(domain_xml(config, "qemu")).iterfind("devices/disk/driver")
    ]
    assert drivers == ["raw", "qcow2"]


# -- properties -----------------------------------------------------------------------------------


@given(head=st.binary(max_size=1024), tail=st.binary(max_size=512))
def test_sniff_bytes_total(head: bytes, tail: bytes) -> None:
    assert sniff_bytes(head, tail) in {"qcow2", "vdi", "vmdk", "vpc", "raw"}


def _sane_mib(value: object) -> bool:
    if isinstance(value, str):
        text = value.strip(" \t")
        value = int(text) if text.isascii() and text.isdigit() else None
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16 * 1024 * 1024


@given(value=st.one_of(st.integers(), st.text(max_size=12), st.floats(), st.none(), st.booleans()))
def test_memory_accepts_only_sane_mib(value: object) -> None:
    if _sane_mib(value):
        config = VMConfig(name="m", memory=value, kernel="/k")  # type: ignore[arg-type]
        assert config.memory == int(str(value).strip(" \t"))
    else:
        with pytest.raises(ConfigError, match="memory"):
            VMConfig(name="m", memory=value, kernel="/k")  # type: ignore[arg-type]


def test_memory_rejects_non_ascii_digits() -> None:
    with pytest.raises(ConfigError, match="memory"):
        VMConfig(name="m", memory="²", kernel="/k")
    with pytest.raises(ConfigError, match="vcpus"):
        VMConfig(name="m", vcpus="٣", kernel="/k")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["qemu", "kvm", "test"])
def test_a_channel_is_a_virtio_serial_port_on_a_unix_socket(family: str, tmp_path: Path) -> None:
    sock = tmp_path / "rpc.sock"
    config = VMConfig(name="c", kernel="/k", channels=[{"name": "org.pyti.rpc.0", "path": sock}])
    xml = domain_xml(config, family)
    _validate(xml, tmp_path)
    channel = ET.fromstring(xml).find("devices/channel[@type='unix']")
    assert channel is not None
    assert channel.find("source").attrib == {"mode": "bind", "path": str(sock)}  # type: ignore[union-attr]
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.pyti.rpc.0"}  # type: ignore[union-attr]
    assert VMConfig.from_dict(config.to_dict()) == config
    assert ET.fromstring(domain_xml(VMConfig(name="c", kernel="/k"), family)).find("devices/channel") is None


@pytest.mark.parametrize("family", ["vbox", "xen"])
def test_a_channel_on_a_hypervisor_without_virtio_serial_is_refused(family: str, tmp_path: Path) -> None:
    config = VMConfig(name="c", hd_location="/d.vdi", channels=[Channel("org.x", tmp_path / "s")])
    with pytest.raises(ConfigError, match="need QEMU"):
        domain_xml(config, family)


def test_channel_names_and_socket_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a port name"):
        Channel("has space", tmp_path / "s")
    with pytest.raises(ConfigError, match="at most 107"):
        Channel("org.x", tmp_path / ("x" * 120))
    with pytest.raises(ConfigError, match="same name"):
        VMConfig(name="c", kernel="/k", channels=[Channel("a", tmp_path / "1"), Channel("a", tmp_path / "2")])


# -- format probing: never guess a format that names other files ----------------------------------


def _img(tmp_path: Path, name: str, *args: str) -> Path:
    path = tmp_path / name
    subprocess.run([QEMU_IMG, "create", "-q", *args, str(path)], check=True)  # type: ignore[list-item]
    return path


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is needed")
def test_qcow2_naming_a_host_file_is_not_guessed(tmp_path: Path) -> None:
    """A "raw" disk a guest rewrote as a qcow2 over a host file: without format= it is refused, by field."""
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"secret\n" * 512)
    evil = _img(tmp_path, "io.raw", "-f", "qcow2", "-u", "-b", str(host_file), "-F", "raw", "-o", "size=4M")
    for config, field in [
        (VMConfig(name="p", disks=[Disk(evil)]), "disks[0]"),
        (VMConfig(name="p", hd_location=evil), "hd_location"),
        (VMConfig(name="p", hd_location=evil, rollback="overlay", overlay_dir=tmp_path), "hd_location"),
    ]:
        with pytest.raises(ConfigError, match="backing file") as info:
            domain_xml(config, "qemu")
        assert info.value.field == field
        assert "format=" in str(info.value)
        assert str(host_file) not in str(info.value)  # the message names the image, not its target
    # stated, it is the user's call: raw (what the guest was given) or qcow2 (a trusted image)
    xml = ET.fromstring(domain_xml(VMConfig(name="p", hd_location=evil, hd_format="raw"), "qemu"))
    assert xml.find("devices/disk/driver").get("type") == "raw"  # type: ignore[union-attr]
    xml = ET.fromstring(domain_xml(VMConfig(name="p", disks=[Disk(evil, format="qcow2")]), "qemu"))
    assert xml.find("devices/disk/driver").get("type") == "qcow2"  # type: ignore[union-attr]


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is needed")
def test_formats_naming_other_files_need_format(tmp_path: Path) -> None:
    base = _img(tmp_path, "base.vmdk", "-f", "vmdk", "-o", "size=4M")
    refused = {
        "qcow2 over a qcow2": _img(tmp_path, "a", "-f", "qcow2", "-b", str(base), "-F", "vmdk"),
        "vmdk child": _img(tmp_path, "b", "-f", "vmdk", "-b", str(base), "-F", "vmdk"),
        "vmdk descriptor": _img(tmp_path, "c", "-f", "vmdk", "-o", "subformat=monolithicFlat,size=4M"),
        "vmdk split": _img(tmp_path, "d", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse,size=4M"),
    }
    for what, path in refused.items():
        with pytest.raises(ConfigError, match="format=") as info:
            domain_xml(VMConfig(name="p", hd_location=path), "qemu")
        assert info.value.field == "hd_location", what
        assert names_other_files(path, sniff_format(path)) is not None, what
    # a plain image of each format is still sniffed (test_sniff_real_images), a stated format never is
    xml = domain_xml(VMConfig(name="p", hd_location=refused["vmdk child"], hd_format="vmdk"), "qemu")
    assert ET.fromstring(xml).find("devices/disk/driver").get("type") == "vmdk"  # type: ignore[union-attr]
    for bad in ("qed", ["vmdk"], {}):
        with pytest.raises(ConfigError, match="hd_format"):
            VMConfig(name="p", hd_location=base, hd_format=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="format"):
            Disk(base, format=bad)  # type: ignore[arg-type]


def test_differencing_vdi_and_vhd_headers_are_not_guessed(tmp_path: Path) -> None:
    # qemu-img cannot make differencing VDI/VHD: the type fields are set on the headers it reads
    vdi = bytearray(1024)
    vdi[0x40:0x44] = b"\x7f\x10\xda\xbe"
    vdi[0x4C:0x50] = (4).to_bytes(4, "little")
    footer = bytearray(512)
    footer[:8] = b"conectix"
    footer[60:64] = (4).to_bytes(4, "big")
    cases = {"diff.vdi": bytes(vdi), "diff.vhd": bytes(4096) + bytes(footer)}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError, match="differencing"):
            domain_xml(VMConfig(name="p", disks=[path]), "qemu")
        vdi[0x4C:0x50] = (1).to_bytes(4, "little")
        footer[60:64] = (3).to_bytes(4, "big")
    for name, data in {"normal.vdi": bytes(vdi), "dynamic.vhd": bytes(4096) + bytes(footer)}.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert names_other_files(path, sniff_format(path)) is None


def test_sniffing_never_blocks_on_a_fifo_or_opens_a_device(tmp_path: Path) -> None:
    """domain_xml on a FIFO (or the test driver, which checks no paths) returns at once: raw, unread."""
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    config = VMConfig(name="f", hd_location=fifo, disks=[Disk("/dev/zero")])
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(domain_xml(config, "qemu")), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader before failing, so no thread stays stuck
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("sniffing the format blocked on a FIFO")
    drivers = [d.get("type") for d in ET.fromstring(done[0]).iterfind("devices/disk/driver")]
    assert drivers == ["raw", "raw"]
