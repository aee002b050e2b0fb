"""LVM2: volumes made by the real lvm2 tools on loop devices, read and written through diskhandler.

This machine kind has no device-mapper, so volumes are never activated: the lvm2 tools write real
metadata (``--driverloaded n``), ``lvs``/``pvs``/``vgs`` report where each volume's extents are, and the
tests put an ext4 filesystem (``mke2fs -d``) at those extents themselves. debugfs and e2fsck then check
what diskhandler wrote. Needs root and loop devices; skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import DiskOperations, ImageFormatError, ImageWarning, UnsupportedImageError, open_image
from diskhandler.lvm import (
    LogicalVolume,
    LvmMetadataError,
    list_logical_volumes,
    lvm_crc,
    parse_config,
)
from diskhandler.partitions import Partition, describe, list_partitions
from tests.diskhandler.imagetools import qemu_img

MiB = 1 << 20


def _why_no_lvm() -> str | None:
    if os.geteuid() != 0:
        return "the lvm2 tools need root to use loop devices"
    for tool in ("lvm", "losetup", "sgdisk", "mke2fs", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices on this machine"
    return None


needs_lvm = pytest.mark.skipif(_why_no_lvm() is not None, reason=_why_no_lvm() or "")


@contextmanager
def _loops(image: Path, ranges: list[tuple[int, int]]) -> Iterator[list[str]]:
    """Loop devices over byte ``ranges`` of ``image`` (a partition each), detached afterwards."""
    devices: list[str] = []
    try:
        for start, size in ranges:
            out = subprocess.run(
                ["losetup", "-f", "--show", "-o", str(start), "--sizelimit", str(size), str(image)],
                check=True,
                capture_output=True,
                text=True,
            )
            devices.append(out.stdout.strip())
        yield devices
    finally:
        for dev in devices:
            subprocess.run(["losetup", "-d", dev], check=False)


def _lvm(devices: list[str], *args: str) -> str:
    """One lvm2 command that sees only ``devices``, never activates and keeps no backups in /etc."""
    accept = ",".join(f'"a|^{d}$|"' for d in devices)
    config = f'devices {{ use_devicesfile=0 filter=[{accept},"r|.*|"] }} backup {{ backup=0 archive=0 }}'
    proc = subprocess.run(
        ["lvm", args[0], "--driverloaded", "n", "--config", config, *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"},
    )
    if proc.returncode != 0:
        pytest.fail(f"lvm {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def _extents(devices: list[str], starts: dict[str, int], vg: str, lv: str) -> list[tuple[int, int, int]]:
    """``(LV byte offset, image byte offset, length)`` of each segment, as lvs/pvs/vgs report them."""
    extent = int(
        _lvm(devices, "vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg)
    )
    pe_start = {
        dev: int(value)
        for dev, value in (
            line.split()
            for line in _lvm(
                devices, "pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pv_name,pe_start"
            ).splitlines()
            if line.strip()
        )
    }
    out = []
    for line in _lvm(
        devices, "lvs", "--noheadings", "-o", "seg_start_pe,seg_pe_ranges", f"{vg}/{lv}"
    ).splitlines():
        if not line.strip():
            continue
        seg_start, ranges = line.split(None, 1)
        dev, span = ranges.split()[0].rsplit(":", 1)
        first, last = (int(x) for x in span.split("-"))
        out.append(
            (
                int(seg_start) * extent,
                starts[dev] + pe_start[dev] + first * extent,
                (last - first + 1) * extent,
            )
        )
    return out


def _put_ext4(raw: Path, extents: list[tuple[int, int, int]], tree: Path, tmp_path: Path) -> None:
    """Make an ext4 filesystem of ``tree`` the size of the volume and write it at its extents."""
    size = sum(length for _, _, length in extents)
    fs = tmp_path / "fs.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(fs), f"{size // 1024}k"], check=True
    )
    data = fs.read_bytes()
    with raw.open("r+b") as f:
        for lv_off, disk_off, length in extents:
            f.seek(disk_off)
            f.write(data[lv_off : lv_off + length])
    fs.unlink()


def _get_lv(raw: Path, extents: list[tuple[int, int, int]], dest: Path) -> Path:
    """The bytes of a volume, gathered from its extents in ``raw``."""
    with raw.open("rb") as f, dest.open("wb") as out:
        for _lv_off, disk_off, length in extents:
            f.seek(disk_off)
            out.write(f.read(length))
    return dest


@pytest.fixture(scope="module")
def lvm_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[int, int, int]]]]:
    """A 96 MiB GPT disk: partition 1 a small ext2 filesystem, partitions 2 and 3 PVs of volume group
    ``vg0``, with ``root`` (linear, two segments, ext4 holding /etc/hostname), ``data`` (linear)
    and ``fast`` (striped over both PVs). Returns the raw image and each volume's extents."""
    reason = _why_no_lvm()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("lvm")
    raw = tmp / "disk.img"
    with raw.open("wb") as f:
        f.truncate(96 * MiB)
    subprocess.run(
        ["sgdisk", "-n1:2048:+8M", "-n2:0:+40M", "-t2:8e00", "-n3:0:+40M", "-t3:8e00", str(raw)],
        check=True,
        capture_output=True,
    )
    parts: dict[int, tuple[int, int]] = {}
    with open_image(raw) as disk:
        for p in list_partitions(disk, lvm=False):
            assert isinstance(p, Partition)
            parts[p.number] = (p.start, p.size)
            p.close()
    with _loops(raw, [parts[2], parts[3]]) as devs:
        starts = {devs[0]: parts[2][0], devs[1]: parts[3][0]}
        _lvm(devs, "pvcreate", "-q", *devs)
        _lvm(devs, "vgcreate", "-q", "-s", "1M", "vg0", *devs)
        _lvm(devs, "lvcreate", "-q", "-an", "-Zn", "-L", "12M", "-n", "root", "vg0", devs[0])
        _lvm(devs, "lvcreate", "-q", "-an", "-Zn", "-L", "6M", "-n", "data", "vg0", devs[0])
        _lvm(devs, "lvextend", "-q", "-L", "+8M", "vg0/root", devs[1])  # a second segment elsewhere
        _lvm(devs, "lvcreate", "-q", "-an", "-Zn", "-i2", "-I64k", "-L", "8M", "-n", "fast", "vg0")
        _lvm(devs, "lvcreate", "-q", "-an", "--type", "zero", "-L", "4M", "-n", "nothing", "vg0")
        extents = {lv: _extents(devs, starts, "vg0", lv) for lv in ("root", "data")}
        # the striped volume: where its stripes are, as lvs reports them
        line = _lvm(
            devs,
            "lvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "seg_pe_ranges,stripe_size",
            "vg0/fast",
        )
        *ranges, stripe_size = line.split()
        extent = int(
            _lvm(devs, "vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", "vg0")
        )
        pe_start = int(
            _lvm(devs, "pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", devs[0])
        )
        stripe_starts = []
        for r in ranges:
            dev, span = r.rsplit(":", 1)
            stripe_starts.append(starts[dev] + pe_start + int(span.split("-")[0]) * extent)
        extents["fast"] = [(int(stripe_size), len(stripe_starts), s) for s in stripe_starts]
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("lvm-guest\n")
    _put_ext4(raw, extents["root"], tree, tmp)
    return raw, extents


@needs_lvm
def test_volumes_are_listed_beside_the_partitions(
    lvm_disk: tuple[Path, dict[str, list[tuple[int, int, int]]]],
) -> None:
    raw, extents = lvm_disk
    with open_image(raw) as disk:
        found = list_partitions(disk)
        keys = [p.key for p in found]
        assert keys == ["1", "2", "3", "vg0/data", "vg0/fast", "vg0/nothing", "vg0/root"]
        volumes = {p.name: p for p in found if isinstance(p, LogicalVolume)}
        assert [(lv, d, n) for lv, d, n in volumes["vg0/root"].extent_map] == extents["root"]
        assert volumes["vg0/root"].size == 20 * MiB
        assert volumes["vg0/root"].view_name == "vg0-root"
        assert volumes["vg0/fast"].layout == "striped"
        assert not volumes["vg0/fast"].writable()
        assert volumes["vg0/nothing"].layout == "zero"
        assert not volumes["vg0/nothing"].supported
        with pytest.raises(UnsupportedImageError, match="'zero' segments"):
            volumes["vg0/nothing"].read_at(0, 512)
        view = disk._repr_html_()  # Jupyter: the partitions and the volumes, with their layouts
        assert "<td>vg0/root</td><td>LVM linear</td>" in view
        assert "<td>2</td><td>GPT Linux LVM</td>" in view
        assert "LVM zero — its &#x27;zero&#x27; segments are not supported" in view
        text = describe(disk)
        assert "vg0/root" in text
        assert "LVM zero" in text
        for p in found:
            p.close()


@needs_lvm
def test_striped_volume_reads_in_stripe_order(
    lvm_disk: tuple[Path, dict[str, list[tuple[int, int, int]]]], tmp_path: Path
) -> None:
    """dm-stripe's layout: chunk i of the volume is chunk i // n of stripe i % n."""
    raw, extents = lvm_disk
    work = tmp_path / "disk.img"
    shutil.copyfile(raw, work)
    stripe_size, count, _ = extents["fast"][0]
    starts = [start for _, _, start in extents["fast"]]
    size = 8 * MiB
    expect = random.Random(9).randbytes(size)
    with work.open("r+b") as f:
        for chunk in range(size // stripe_size):
            f.seek(starts[chunk % count] + (chunk // count) * stripe_size)
            f.write(expect[chunk * stripe_size : (chunk + 1) * stripe_size])
    with open_image(work) as disk:
        (fast,) = [p for p in list_partitions(disk) if p.key == "vg0/fast"]
        assert fast.read_at(0, size) == expect
        assert fast.read_at(stripe_size - 10, 30) == expect[stripe_size - 10 : stripe_size + 20]


@needs_lvm
def test_linear_volume_reads_and_writes_the_extents_lvm_reports(
    lvm_disk: tuple[Path, dict[str, list[tuple[int, int, int]]]], tmp_path: Path
) -> None:
    raw, extents = lvm_disk
    work = tmp_path / "disk.img"
    shutil.copyfile(raw, work)
    payload = random.Random(5).randbytes(6 * MiB)
    with open_image(work, writable=True) as disk:
        (data,) = [p for p in list_partitions(disk) if p.key == "vg0/data"]
        assert data.writable()
        data.write_at(0, payload)
        assert data.read_at(0, len(payload)) == payload
        with pytest.raises(OSError, match="past the end"):
            data.write_at(6 * MiB - 1, b"xx")
    got = _get_lv(work, extents["data"], tmp_path / "data.bin").read_bytes()
    assert got == payload


@needs_lvm
@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_diskoperations_on_a_volume_group_volume(
    lvm_disk: tuple[Path, dict[str, list[tuple[int, int, int]]]], tmp_path: Path, fmt: str
) -> None:
    raw, extents = lvm_disk
    image = tmp_path / f"disk.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, raw, image)
    with DiskOperations(image, partition="vg0/root") as ops:
        assert ops.partition == "vg0/root"
        assert ops.filesystem == "ext"
        host = tmp_path / "hostname"
        ops.get_file("/etc/hostname", host)
        assert host.read_text() == "lvm-guest\n"
        new = tmp_path / "result.txt"
        new.write_bytes(b"written through LVM\n" * 1000)
        ops.put_file(new, "/result.txt")
    flat = tmp_path / "flat.img"
    qemu_img("convert", "-f", fmt, "-O", "raw", image, flat)
    lv = _get_lv(flat, extents["root"], tmp_path / "root.ext4")
    subprocess.run(["e2fsck", "-fn", str(lv)], check=True, capture_output=True)
    cat = subprocess.run(["debugfs", "-R", "cat /result.txt", str(lv)], check=True, capture_output=True)
    assert cat.stdout == b"written through LVM\n" * 1000
    with DiskOperations(image, readonly=True) as ops:  # by default: the largest volume with a filesystem
        assert ops.partition == "vg0/root"


@needs_lvm
def test_asking_for_an_unsupported_layout_names_it(
    lvm_disk: tuple[Path, dict[str, list[tuple[int, int, int]]]],
) -> None:
    raw, _ = lvm_disk
    with pytest.raises(UnsupportedImageError, match=r"vg0/nothing.*'zero' segments"):
        DiskOperations(raw, readonly=True, partition="vg0/nothing").mount()


@needs_lvm
def test_pv_on_the_whole_disk(tmp_path: Path) -> None:
    raw = tmp_path / "whole.img"
    with raw.open("wb") as f:
        f.truncate(32 * MiB)
    with _loops(raw, [(0, 32 * MiB)]) as devs:
        _lvm(devs, "pvcreate", "-q", devs[0])
        _lvm(devs, "vgcreate", "-q", "vgw", devs[0])
        _lvm(devs, "lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "lv", "vgw")
        extents = _extents(devs, {devs[0]: 0}, "vgw", "lv")
    with open_image(raw) as disk:
        (lv,) = list_partitions(disk)
        assert isinstance(lv, LogicalVolume)
        assert lv.name == "vgw/lv"
        assert list(lv.extent_map) == extents


# -- the parser, without the tools -------------------------------------------------------------------


def test_config_syntax() -> None:
    text = b"""
# a comment
vg {
  id = "abc"   # trailing comment
  seqno = 3
  status = ["READ", "WRITE"]
  nested { x = -1 list = [ "a", 2, ] name.with-dots_and+plus = "q\\"uote" }
}
contents = "Text Format Volume Group"
"""
    config = parse_config(text)
    vg = config["vg"]
    assert isinstance(vg, dict)
    assert vg["seqno"] == 3
    assert vg["status"] == ["READ", "WRITE"]
    assert vg["nested"] == {"x": -1, "list": ["a", 2], "name.with-dots_and+plus": 'q"uote'}
    for bad in (b"vg {", b"a = ", b"a = [1, 2", b"}", b"a ! 3", b"a = {", b"x" * 10 + b" = \x01"):
        with pytest.raises(LvmMetadataError):
            parse_config(bad)
    with pytest.raises(LvmMetadataError, match="too deep"):
        parse_config(b"a { " * 40 + b"}" * 40)


@needs_lvm
def test_lvm_crc_matches_what_the_tools_wrote(lvm_whole_disk: bytes) -> None:
    label = lvm_whole_disk[512:1024]
    assert label[:8] == b"LABELONE"
    assert lvm_crc(label[20:]) == int.from_bytes(label[16:20], "little")
    mda = lvm_whole_disk[4096 : 4096 + 512]
    assert mda[4:20] == b" LVM2 x[5A%r0N*>"
    assert lvm_crc(mda[4:]) == int.from_bytes(mda[:4], "little")


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fuzz_config_text(blob: bytes) -> None:
    with suppress(LvmMetadataError):
        parse_config(blob)


@needs_lvm
@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from([512, 4096, 4608, 5000]), st.integers(0, 300), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_label_header_and_text(
    lvm_whole_disk: bytes, tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int, int]]
) -> None:
    """Damaged label, metadata area header and text: a typed error (or volumes), nothing else; and
    list_partitions only warns, so a disk with damaged LVM still shows its partitions."""
    data = bytearray(lvm_whole_disk)
    for base, at, byte in edits:
        data[base + at] = byte
    path = tmp_path_factory.mktemp("fuzz") / "d.img"
    path.write_bytes(bytes(data))
    with open_image(path) as disk:
        try:
            for lv in list_logical_volumes(disk):
                lv.read_at(0, 4096)
                lv.close()
        except ImageFormatError:
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageWarning)
            for part in list_partitions(disk):  # damage is a warning here, never an exception
                part.close()
    path.unlink()


@pytest.fixture(scope="module")
def lvm_whole_disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    reason = _why_no_lvm()
    if reason:
        pytest.skip(reason)
    raw = tmp_path_factory.mktemp("lvm-fuzz") / "d.img"
    with raw.open("wb") as f:
        f.truncate(4 * MiB)
    with _loops(raw, [(0, 4 * MiB)]) as devs:
        _lvm(devs, "pvcreate", "-q", "--metadatasize", "64k", devs[0])
        _lvm(devs, "vgcreate", "-q", "-s", "1M", "vgf", devs[0])
        _lvm(devs, "lvcreate", "-q", "-an", "-Zn", "-L", "1M", "-n", "lv", "vgf")
    return raw.read_bytes()


@needs_lvm
def test_metadata_text_wrapping_round_the_circular_buffer(lvm_whole_disk: bytes, tmp_path: Path) -> None:
    """The committed text may run past the end of the metadata area and continue after its header."""
    data = bytearray(lvm_whole_disk)
    mda = 4096
    area = int.from_bytes(data[mda + 32 : mda + 40], "little")
    raw_off = int.from_bytes(data[mda + 40 : mda + 48], "little")
    raw_size = int.from_bytes(data[mda + 48 : mda + 56], "little")
    text = bytes(data[mda + raw_off : mda + raw_off + raw_size])
    # move the text so that its first 100 bytes end the area and the rest starts after the header
    new_off = area - 100
    data[mda + new_off : mda + area] = text[:100]
    data[mda + 512 : mda + 512 + raw_size - 100] = text[100:]
    data[mda + 40 : mda + 48] = new_off.to_bytes(8, "little")
    data[mda : mda + 4] = lvm_crc(bytes(data[mda + 4 : mda + 512])).to_bytes(4, "little")
    path = tmp_path / "wrapped.img"
    path.write_bytes(bytes(data))
    with open_image(path) as disk:
        (lv,) = list_logical_volumes(disk)
        assert lv.name == "vgf/lv"
        lv.close()
    data[mda + 600] ^= 0xFF  # one byte of the wrapped part: the text checksum catches it
    path.write_bytes(bytes(data))
    with open_image(path) as disk, pytest.raises(LvmMetadataError, match="text checksum"):
        list_logical_volumes(disk)


@needs_lvm
def test_vdfuse_view_shows_volumes_as_vg_lv_files(
    lvm_disk: tuple[Path, dict[str, list[tuple[int, int, int]]]], tmp_path: Path
) -> None:
    from diskhandler.vdfuse import VDFuseOperations, _partitions_of

    raw, extents = lvm_disk
    work = tmp_path / "disk.img"
    shutil.copyfile(raw, work)
    disk = open_image(work, writable=True)
    ops = VDFuseOperations(disk, _partitions_of(disk))
    try:
        names = ops.readdir("/", 0)
        assert {"Partition1", "Partition2", "Partition3", "vg0-root", "vg0-data", "vg0-fast"} <= set(names)
        assert "vg0-nothing" not in names  # a layout diskhandler cannot read is not shown
        fh = ops.open("/vg0-data", os.O_RDWR)
        assert ops.write("/vg0-data", b"through the view", 5 * MiB, fh) == 16
        assert ops.read("/vg0-data", 16, 5 * MiB, fh) == b"through the view"
        ops.release("/vg0-data", fh)
    finally:
        disk.close()
    lv = _get_lv(work, extents["data"], tmp_path / "data.bin").read_bytes()
    assert lv[5 * MiB : 5 * MiB + 16] == b"through the view"


@pytest.mark.parametrize(
    "text",
    [
        b"a = " + b"9" * 5000,  # past Python's int/str digit limit: a bare ValueError
        b"a = -" + b"7" * 4300,
        b"a = " + b"9" * 400 + b".5",  # a float of infinity: int() of it is an OverflowError
        b"a = [" + b"1" * 30 + b"]",
    ],
    ids=["5000-digits", "negative-4300-digits", "infinite-float", "30-digits-in-a-list"],
)
def test_absurd_numbers_in_metadata_are_metadata_errors(text: bytes) -> None:
    """A guest owns its disk: its LVM metadata may hold any number text."""
    with pytest.raises(LvmMetadataError, match="number"):
        parse_config(text)
