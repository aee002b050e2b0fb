"""Partition tables: read what sgdisk, parted and fdisk write; write what they read back.

Expectations come from the reference tools' own output (``sgdisk -p``/``-i``, ``parted -m unit B print``,
``fdisk -l``), never from numbers typed into the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diskhandler import DiskImage, ImageWarning, PartitionTableError, ReadOnlyImageError, open_image
from diskhandler.partitions import (
    Partition,
    PartitionSpec,
    create_partition_table,
    describe,
    list_partitions,
)
from tests.diskhandler.imagetools import REAL_IMAGES, qemu_flatten, qemu_img, run

MiB = 1 << 20

# One row per partition: (number, start byte, size in bytes).
Layout = list[tuple[int, int, int]]


def _blank(path: Path, size: int = 64 * MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _layout(parts: list[Partition]) -> Layout:
    return [(p.number, p.start, p.size) for p in parts]


def sgdisk_layout(path: Path) -> tuple[Layout, dict[int, str]]:
    """Partitions and names as ``sgdisk -p`` prints them."""
    out = run("sgdisk", "-p", path)
    sector = int(re.search(r"Sector size \(logical\): (\d+) bytes", out).group(1))  # type: ignore[union-attr]
    rows: Layout = []
    names: dict[int, str] = {}
    body = out.split("Number  Start (sector)", 1)[1].splitlines()[1:]
    for line in body:
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+\S+ \S+\s+[0-9A-F]{4}\s{2}(.*)$", line)
        if m:
            number, first, last = int(m[1]), int(m[2]), int(m[3])
            rows.append((number, first * sector, (last - first + 1) * sector))
            names[number] = m[4].rstrip()
    assert rows, out
    return rows, names


def sgdisk_info(path: Path, number: int) -> tuple[str, str]:
    """(type GUID, unique GUID) of partition ``number`` as ``sgdisk -i`` prints them."""
    out = run("sgdisk", "-i", str(number), path)
    type_guid = re.search(r"Partition GUID code: (\S+)", out)
    unique = re.search(r"Partition unique GUID: (\S+)", out)
    assert type_guid, out
    assert unique, out
    return type_guid[1].upper(), unique[1].upper()


def parted_layout(path: Path) -> tuple[Layout, dict[int, str]]:
    """Partitions and flags as ``parted -m unit B print`` prints them (the extended container too)."""
    out = run("parted", "-s", "-m", path, "unit", "B", "print")
    rows: Layout = []
    flags: dict[int, str] = {}
    for line in out.splitlines()[2:]:
        fields = line.rstrip(";").split(":")
        number = int(fields[0])
        rows.append((number, int(fields[1].rstrip("B")), int(fields[3].rstrip("B"))))
        flags[number] = fields[6]
    assert rows, out
    return rows, flags


@pytest.fixture
def gpt_image(tmp_path: Path) -> Path:
    """A 64 MiB GPT made by sgdisk: EFI, a named root, swap, and slot 5 used while slot 4 is empty."""
    path = _blank(tmp_path / "gpt.img")
    run(
        "sgdisk",
        "-n", "1:0:+8M", "-t", "1:ef00", "-c", "1:EFI system",
        "-n", "2:0:+16M", "-c", "2:root",
        "-n", "3:0:+4M", "-t", "3:8200",
        "-n", "5:0:0", "-t", "5:0700", "-c", "5:data",
        path,
    )  # fmt: skip
    return path


@pytest.fixture
def mbr_image(tmp_path: Path) -> Path:
    """A 64 MiB MBR made by parted: two primaries, an extended container holding three logicals."""
    path = _blank(tmp_path / "mbr.img")
    run(
        "parted", "-s", path, "--",
        "mklabel", "msdos",
        "mkpart", "primary", "ext4", "1MiB", "9MiB",
        "set", "1", "boot", "on",
        "mkpart", "primary", "linux-swap", "9MiB", "17MiB",
        "mkpart", "extended", "17MiB", "100%",
        "mkpart", "logical", "ext4", "18MiB", "26MiB",
        "mkpart", "logical", "fat32", "27MiB", "40MiB",
        "mkpart", "logical", "ext4", "41MiB", "100%",
    )  # fmt: skip
    return path


@pytest.fixture
def disk(request: pytest.FixtureRequest) -> Iterator[DiskImage]:
    with open_image(request.getfixturevalue(request.param)) as image:
        yield image


# -- reading what the reference tools wrote ------------------------------------------------------------


def test_reads_sgdisk_gpt(gpt_image: Path) -> None:
    expected, names = sgdisk_layout(gpt_image)
    assert len(expected) >= 4
    with open_image(gpt_image) as image:
        parts = list_partitions(image)
        assert _layout(parts) == expected
        assert [p.number for p in parts] == [1, 2, 3, 5]  # the empty slot 4 leaves a gap
        for p in parts:
            assert p.scheme == "gpt"
            assert p.name == names[p.number]
            assert (p.type, p.guid) == sgdisk_info(gpt_image, p.number)
        assert [p.type_name for p in parts] == [
            "EFI System",
            "Linux filesystem",
            "Linux swap",
            "Microsoft basic data",
        ]


def test_reads_parted_mbr_with_logicals(mbr_image: Path) -> None:
    expected, flags = parted_layout(mbr_image)
    with open_image(mbr_image) as image:
        parts = list_partitions(image)
    assert _layout(parts) == expected
    numbers = [p.number for p in parts]
    assert numbers == [1, 2, 3, 5, 6, 7]
    by_number = {p.number: p for p in parts}
    assert by_number[3].is_extended
    assert by_number[3].type_name == "extended"
    assert not any(by_number[n].is_extended for n in (1, 2, 5, 6, 7))
    assert by_number[1].bootable == ("boot" in flags[1])
    assert not by_number[2].bootable
    assert (by_number[2].type, by_number[2].type_name) == ("0x82", "Linux swap")
    assert by_number[5].type == "0x83"
    assert all(p.scheme == "mbr" and p.name == "" and p.guid is None for p in parts)
    # logical partitions lie inside the container
    container = by_number[3]
    assert all(container.start < by_number[n].start and by_number[n].end <= container.end for n in (5, 6, 7))


def test_reads_4k_sector_gpt(tmp_path: Path) -> None:
    """A GPT written with 4096-byte logical sectors (an image of a 4Kn disk) is found and read."""
    path = _blank(tmp_path / "4k.img")
    run("fdisk", "-b", "4096", path, input=b"g\nn\n\n\n+8M\nn\n\n\n+16M\nn\n\n\n\nw\n")
    out = run("fdisk", "-b", "4096", "-l", "-o", "Device,Start,Sectors", path)
    assert "4096 bytes" in out
    expected = [
        (int(m[1]), int(m[2]) * 4096, int(m[3]) * 4096)
        for m in re.finditer(r"^\S+?(\d+)\s+(\d+)\s+(\d+)$", out, re.MULTILINE)
    ]
    assert len(expected) == 3
    with open_image(path) as image:
        assert _layout(list_partitions(image)) == expected


def test_hybrid_mbr_gpt_wins(gpt_image: Path) -> None:
    expected, _ = sgdisk_layout(gpt_image)
    run("sgdisk", "-h", "2", gpt_image)  # MBR now holds partition 2 *and* a 0xEE entry
    with open_image(gpt_image) as image:
        sector0 = image.read_at(0, 512)
        types = {sector0[0x1BE + 16 * i + 4] for i in range(4)}
        assert {0xEE, 0x83} <= types
        parts = list_partitions(image)
    assert _layout(parts) == expected
    assert {p.scheme for p in parts} == {"gpt"}


@pytest.mark.parametrize("mkfs", [["mkfs.vfat"], ["mkfs.vfat", "-F", "32"], ["mkfs.ext4", "-q", "-F"]])
def test_superfloppy_has_no_partitions(tmp_path: Path, mkfs: list[str]) -> None:
    path = _blank(tmp_path / "floppy.img")
    run(*mkfs, path)
    with open_image(path) as image:
        if mkfs[0] == "mkfs.vfat":
            assert image.read_at(510, 2) == b"\x55\xaa"  # the pitfall: it *looks* like an MBR
        assert list_partitions(image) == []
        assert "no partition table" in describe(image)


def test_ntfs_superfloppy_has_no_partitions(tmp_path: Path) -> None:
    if shutil.which("mkntfs") is None:
        pytest.skip("mkntfs (ntfs-3g) is not installed")
    path = _blank(tmp_path / "ntfs.img")
    run("mkntfs", "-q", "-F", "-f", path)
    with open_image(path) as image:
        assert image.read_at(3, 8) == b"NTFS    "
        assert list_partitions(image) == []


@pytest.mark.parametrize("name", ["dfvfs/ext2.qcow2", "dfvfs/ext2.vhd", "dfvfs/ext2.vmdk", "cot/blank.vmdk"])
def test_real_partitionless_images(tmp_path: Path, name: str) -> None:
    """Images made by other products: parted sees a whole-disk filesystem ("loop") or nothing."""
    path = REAL_IMAGES / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    flat = qemu_flatten(path, None, tmp_path / "flat.raw")
    proc = subprocess.run(
        ["parted", "-s", "-m", str(flat), "unit", "B", "print"], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        assert "unrecognised disk label" in proc.stderr
    else:
        assert proc.stdout.splitlines()[1].split(":")[5] == "loop"  # a filesystem on the whole disk
    with open_image(path) as image:
        assert list_partitions(image) == []


def test_empty_and_tiny_disks(tmp_path: Path) -> None:
    with open_image(_blank(tmp_path / "empty.img")) as image:
        assert list_partitions(image) == []
    with open_image(_blank(tmp_path / "tiny.img", 100)) as image:
        assert list_partitions(image) == []


# -- GPT damage -----------------------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    ("where", "offset"),
    [("header field", 512 + 40), ("header CRC", 512 + 16), ("entry array", 1024 + 40)],
)
def test_damaged_primary_gpt_uses_backup(gpt_image: Path, where: str, offset: int) -> None:
    expected, _ = sgdisk_layout(gpt_image)
    _flip(gpt_image, offset)
    with open_image(gpt_image) as image, pytest.warns(ImageWarning, match="primary GPT is damaged") as record:
        parts = list_partitions(image)
    assert _layout(parts) == expected, where
    assert record[0].filename == __file__  # the warning points at the caller, not into diskhandler
    assert str(gpt_image) in str(record[0].message)


def test_wiped_primary_on_grown_disk_finds_backup(gpt_image: Path) -> None:
    """After the image grew, the backup is not at the last LBA; the protective MBR still leads to it."""
    expected, _ = sgdisk_layout(gpt_image)
    os.truncate(gpt_image, 65 * MiB)
    with open_image(gpt_image) as image:  # a healthy primary: no warning, its alternate LBA is trusted
        assert _layout(list_partitions(image)) == expected
    with gpt_image.open("r+b") as f:
        f.seek(512)
        f.write(bytes(512))
    with open_image(gpt_image) as image, pytest.warns(ImageWarning, match="using the backup at LBA 131071"):
        assert _layout(list_partitions(image)) == expected


def test_damaged_backup_warns_but_reads(gpt_image: Path) -> None:
    expected, _ = sgdisk_layout(gpt_image)
    _flip(gpt_image, 64 * MiB - 512 + 24)
    with open_image(gpt_image) as image, pytest.warns(ImageWarning, match="backup GPT"):
        assert _layout(list_partitions(image)) == expected


def test_both_gpt_headers_damaged(gpt_image: Path) -> None:
    _flip(gpt_image, 512 + 40)
    _flip(gpt_image, 64 * MiB - 512 + 40)
    with open_image(gpt_image) as image, pytest.raises(PartitionTableError) as info:
        list_partitions(image)
    message = str(info.value)
    assert "primary GPT header" in message
    assert "backup GPT header" in message
    assert "CRC" in message


# -- EBR chain damage --------------------------------------------------------------------------------------


def _ebrs(path: Path) -> list[int]:
    """LBAs of the EBRs of the parted-made image, following the links."""
    data = path.read_bytes()
    entries = [data[0x1BE + 16 * i : 0x1BE + 16 * (i + 1)] for i in range(4)]
    base = next(int.from_bytes(e[8:12], "little") for e in entries if e[4] in (0x05, 0x0F))
    ebrs, ebr = [], base
    while True:
        ebrs.append(ebr)
        link = data[ebr * 512 + 0x1CE : ebr * 512 + 0x1DE]
        if link[4] == 0:
            return ebrs
        ebr = base + int.from_bytes(link[8:12], "little")


@pytest.mark.parametrize("target", [0, 1])
def test_ebr_loop_is_an_error(mbr_image: Path, target: int) -> None:
    ebrs = _ebrs(mbr_image)
    assert len(ebrs) == 3
    with mbr_image.open("r+b") as f:  # the last EBR links back to the first (or to itself)
        link = bytearray(16)
        link[4] = 0x05
        link[8:12] = (ebrs[target] - ebrs[0] if target == 0 else ebrs[-1] - ebrs[0]).to_bytes(4, "little")
        link[12:16] = (1).to_bytes(4, "little")
        f.seek(ebrs[-1] * 512 + 0x1CE)
        f.write(link)
    with open_image(mbr_image) as image, pytest.raises(PartitionTableError, match="EBR chain loops"):
        list_partitions(image)


def test_ebr_without_signature_is_an_error(mbr_image: Path) -> None:
    second = _ebrs(mbr_image)[1]
    with mbr_image.open("r+b") as f:
        f.seek(second * 512 + 510)
        f.write(b"\0\0")
    with open_image(mbr_image) as image, pytest.raises(PartitionTableError, match=f"EBR at LBA {second}"):
        list_partitions(image)


def test_entry_past_the_disk_end_is_cut_with_a_warning(mbr_image: Path) -> None:
    expected, _ = parted_layout(mbr_image)
    os.truncate(mbr_image, 60 * MiB)
    with open_image(mbr_image) as image, pytest.warns(ImageWarning, match="past the"):
        parts = list_partitions(image)
    assert [p.number for p in parts] == [n for n, _, _ in expected]
    assert all(p.end <= 60 * MiB for p in parts)


# -- writing ---------------------------------------------------------------------------------------------


def test_create_gpt_verified_by_sgdisk(tmp_path: Path) -> None:
    path = _blank(tmp_path / "new.img")
    specs = [
        PartitionSpec(8 * MiB, "efi", name="EFI"),
        PartitionSpec(2 * MiB, "bios-boot"),
        PartitionSpec(16 * MiB, "linux", name="root", bootable=True),
        PartitionSpec(4 * MiB, "swap", name="swap"),
        PartitionSpec(None, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", name="héllo wörld"),
    ]
    with open_image(path, writable=True) as image:
        created = create_partition_table(image, "gpt", specs)
        created_layout = _layout(created)
        assert [p.size for p in created[:4]] == [s.size for s in specs[:4]]
        assert all(p.start % MiB == 0 for p in created)
    verify = run("sgdisk", "-v", path)
    assert "No problems found" in verify
    expected, names = sgdisk_layout(path)
    assert created_layout == expected
    with open_image(path) as image:
        parts = list_partitions(image)
    assert _layout(parts) == expected
    assert [p.name for p in parts] == [names[n] for n, _, _ in expected] == [s.name for s in specs]
    for p in parts:
        assert (p.type, p.guid) == sgdisk_info(path, p.number)
    assert [p.bootable for p in parts] == [s.bootable for s in specs]
    attrs = run("sgdisk", "-A", "3:show", path)
    assert "legacy BIOS bootable" in attrs
    # the disk GUID is random: two tables differ
    other = _blank(tmp_path / "other.img")
    with open_image(other, writable=True) as image:
        create_partition_table(image, "gpt", specs[:1])
    guid = re.compile(r"Disk identifier \(GUID\): (\S+)")
    assert guid.search(run("sgdisk", "-p", path))[1] != guid.search(run("sgdisk", "-p", other))[1]  # type: ignore[index]


def test_create_mbr_with_logicals_verified_by_parted(tmp_path: Path) -> None:
    path = _blank(tmp_path / "new.img")
    specs = [
        PartitionSpec(4 * MiB, "linux", bootable=True),
        PartitionSpec(4 * MiB, "swap"),
        PartitionSpec(4 * MiB, "fat32"),
        PartitionSpec(6 * MiB, "0x83"),
        PartitionSpec(3 * MiB + 512, "ntfs"),
        PartitionSpec(None, "linux"),
    ]
    with open_image(path, writable=True) as image:
        created = create_partition_table(image, "mbr", specs)
    assert [p.number for p in created] == [1, 2, 3, 4, 5, 6, 7]
    assert created[3].is_extended
    data_parts = [p for p in created if not p.is_extended]
    assert [p.size for p in data_parts[:5]] == [s.size for s in specs[:5]]
    expected, flags = parted_layout(path)
    assert _layout(created) == expected
    assert [n for n, f in flags.items() if "boot" in f] == [1]
    assert "No errors detected" in run("sfdisk", "-V", path)
    dump = run("sfdisk", "-d", path)
    types = re.findall(r"type=(\w+)", dump)
    assert types == ["83", "82", "c", "f", "83", "7", "83"]
    with open_image(path) as image:
        assert _layout(list_partitions(image)) == expected


def test_create_mbr_primaries_only_and_replace_gpt(gpt_image: Path) -> None:
    """Writing an MBR over a GPT clears the GPT signatures, so no tool sees the old table."""
    before = run("wipefs", "--no-act", gpt_image)
    assert before.count(" gpt ") == 2
    with open_image(gpt_image, writable=True) as image:
        created = create_partition_table(
            image, "mbr", [PartitionSpec(10 * MiB, "efi"), PartitionSpec(None, "linux")], alignment=4 * MiB
        )
    assert [(p.number, p.start % (4 * MiB), p.type) for p in created] == [(1, 0, "0xef"), (2, 0, "0x83")]
    expected, _ = parted_layout(gpt_image)
    assert _layout(created) == expected
    signatures = re.findall(r"^\S+\s+0x[0-9a-f]+\s+(\S+)", run("wipefs", "--no-act", gpt_image), re.MULTILINE)
    assert signatures == ["dos"]  # no primary or backup GPT header left behind
    with open_image(gpt_image) as image:
        assert {p.scheme for p in list_partitions(image)} == {"mbr"}


def test_create_gpt_over_mbr(mbr_image: Path) -> None:
    with open_image(mbr_image, writable=True) as image:
        created = create_partition_table(image, "gpt", [PartitionSpec(None)], alignment=512)
    assert [(p.number, p.start) for p in created] == [(1, 34 * 512)]
    assert "No problems found" in run("sgdisk", "-v", mbr_image)
    assert _layout(created) == sgdisk_layout(mbr_image)[0]


@pytest.mark.parametrize(
    ("scheme", "specs", "match"),
    [
        ("gpt", [PartitionSpec(100 * MiB)], "does not fit"),
        ("mbr", [PartitionSpec(None), PartitionSpec(MiB)], "only allowed for the last"),
        ("mbr", [PartitionSpec(MiB), PartitionSpec(MiB), PartitionSpec(MiB), PartitionSpec(None),
                 PartitionSpec(MiB)], "partition 4: size=None"),
        ("gpt", [PartitionSpec(MiB, "0x83")], "MBR type byte"),
        ("mbr", [PartitionSpec(MiB, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")], "needs scheme='gpt'"),
        ("mbr", [PartitionSpec(MiB, "bios-boot")], "does not exist on mbr"),
        ("mbr", [PartitionSpec(MiB, "0x05")], "reserved"),
        ("mbr", [PartitionSpec(MiB, name="x")], "no name"),
        ("gpt", [PartitionSpec(MiB, "ext4")], "unknown type 'ext4'"),
        ("gpt", [PartitionSpec(MiB, name="x" * 37)], "longer than 36"),
        ("gpt", [PartitionSpec(0)], "size must be positive"),
        ("apm", [PartitionSpec(MiB)], "unknown partition table scheme"),
    ],
)  # fmt: skip
def test_create_rejects_impossible_layouts(
    tmp_path: Path, scheme: str, specs: list[PartitionSpec], match: str
) -> None:
    path = _blank(tmp_path / "bad.img")
    with open_image(path, writable=True) as image, pytest.raises(PartitionTableError, match=match) as info:
        create_partition_table(image, scheme, specs)
    assert str(info.value).startswith(f"{path}: ")
    assert path.read_bytes().count(0) == 64 * MiB  # nothing was written


def test_mbr_cannot_address_beyond_2tib(tmp_path: Path) -> None:
    path = _blank(tmp_path / "huge.img", 3 << 40)  # sparse
    with open_image(path, writable=True) as image:
        with pytest.raises(PartitionTableError, match="does not fit"):
            create_partition_table(image, "mbr", [PartitionSpec(1 << 40), PartitionSpec(1 << 40)])
        parts = create_partition_table(image, "mbr", [PartitionSpec(None)])
        assert parts[0].end == 1 << 41  # the rest of what MBR can address
        parts = create_partition_table(image, "gpt", [PartitionSpec(1 << 40), PartitionSpec(1 << 40)])
        assert [p.end for p in parts] == [(1 << 40) + MiB, (2 << 40) + MiB]


def test_create_on_read_only_disk(gpt_image: Path) -> None:
    with open_image(gpt_image) as image, pytest.raises(ReadOnlyImageError, match="writable=True"):
        create_partition_table(image, "gpt", [PartitionSpec()])


# -- other image formats: partitions only use the DiskImage interface -------------------------------------

QEMU_FORMATS = ["qcow2", "vdi", "vpc", "vmdk"]


@pytest.mark.parametrize("fmt", QEMU_FORMATS)
def test_tables_made_by_tools_read_through_other_formats(gpt_image: Path, mbr_image: Path, fmt: str) -> None:
    """qemu-img converts the tool-made raw images; a VHD's CHS-rounded size leaves the backup GPT
    before the last LBA, and the alternate LBA is trusted (no warning)."""
    for raw, expected in ((gpt_image, sgdisk_layout(gpt_image)[0]), (mbr_image, parted_layout(mbr_image)[0])):
        converted = raw.with_suffix(f".{fmt}")
        qemu_img("convert", "-f", "raw", "-O", fmt, raw, converted)
        with open_image(converted) as image:
            if fmt == "vpc":
                assert image.size > raw.stat().st_size
            assert _layout(list_partitions(image)) == expected


@pytest.mark.parametrize("fmt", QEMU_FORMATS)
def test_create_through_other_formats(tmp_path: Path, fmt: str) -> None:
    image_path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, image_path, "64M")
    for scheme in ("gpt", "mbr"):
        with open_image(image_path, writable=True) as image:
            created = _layout(
                create_partition_table(image, scheme, [PartitionSpec(8 * MiB)] * 4 + [PartitionSpec()])
            )
        flat = qemu_flatten(image_path, fmt, tmp_path / f"flat-{scheme}.raw")
        if scheme == "gpt":
            assert "No problems found" in run("sgdisk", "-v", flat)
            assert created == sgdisk_layout(flat)[0]
        else:
            assert "No errors detected" in run("sfdisk", "-V", flat)
            assert created == parted_layout(flat)[0]
        flat.unlink()


# -- the partition view ------------------------------------------------------------------------------------


def test_partition_view_reads_and_writes_through_the_disk(gpt_image: Path) -> None:
    with open_image(gpt_image, writable=True) as image:
        part = list_partitions(image)[1]
        assert (part.format, part.path, part.parent) == ("partition", image.path, None)
        assert part.writable()
        part.write_at(0, b"start")
        part.seek(part.size - 3)
        part.write(b"end")
        with pytest.raises(OSError, match="past the end"):
            part.write_at(part.size - 1, b"xx")
        assert part.read_at(part.size - 3, 100) == b"end"
        part.close()  # does not close the disk
        assert not image.closed
        assert image.read_at(part.start, 5) == b"start"
        assert image.read_at(part.end - 3, 3) == b"end"
        with pytest.raises(ValueError, match="closed"):
            part.read_at(0, 1)
        assert "gpt #2" in repr(part)
        assert "name='root'" in repr(part)
        assert "&lt;Partition" in part._repr_html_()
        other = list_partitions(image)[0]
    with pytest.raises(ValueError, match="closed"):
        other.read_at(0, 1)  # the disk is closed
    with open_image(gpt_image) as image:
        part = list_partitions(image)[1]
        assert not part.writable()
        with pytest.raises(ReadOnlyImageError):
            part.write_at(0, b"x")
        assert part.read(5) == b"start"


def test_describe(mbr_image: Path) -> None:
    with open_image(mbr_image) as image:
        text = describe(image)
    assert text.splitlines()[0].endswith("MBR, 67108864 bytes")
    assert len(text.splitlines()) == 7
    assert "extended" in text
    assert "Linux swap" in text


# -- fuzzing ---------------------------------------------------------------------------------------------

FUZZ_SIZE = 8 * MiB


def _fix_gpt_crcs(data: bytearray) -> None:
    """Recompute both GPT CRCs so mutations reach past the checksums."""
    for lba in (1, FUZZ_SIZE // 512 - 1):
        off = lba * 512
        hsize = int.from_bytes(data[off + 12 : off + 16], "little")
        entries_lba = int.from_bytes(data[off + 72 : off + 80], "little")
        count = int.from_bytes(data[off + 80 : off + 84], "little")
        esize = int.from_bytes(data[off + 84 : off + 88], "little")
        if 0 < entries_lba * 512 + count * esize <= FUZZ_SIZE:
            array = data[entries_lba * 512 : entries_lba * 512 + count * esize]
            data[off + 88 : off + 92] = zlib.crc32(array).to_bytes(4, "little")
        if 92 <= hsize <= 512:
            data[off + 16 : off + 20] = bytes(4)
            data[off + 16 : off + 20] = zlib.crc32(data[off : off + hsize]).to_bytes(4, "little")


class _FuzzBase:
    """A fuzz base image and its pristine bytes (with a short repr for hypothesis' reports)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.original = path.read_bytes()

    def __repr__(self) -> str:
        return f"<fuzz base {self.path.name}>"


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, _FuzzBase]:
    """Small GPT and MBR-with-logicals images, ours and the tools'; the fuzz test mutates their tables."""
    folder = tmp_path_factory.mktemp("fuzz")
    bases: dict[str, _FuzzBase] = {}
    layouts = {
        "gpt": [PartitionSpec(MiB, "efi", name="e"), PartitionSpec(MiB), PartitionSpec(None, "swap")],
        "mbr": [PartitionSpec(512 * 1024)] * 5 + [PartitionSpec(None)],
    }
    for scheme, specs in layouts.items():
        path = _blank(folder / f"{scheme}.img", FUZZ_SIZE)
        with open_image(path, writable=True) as image:
            create_partition_table(image, scheme, specs, alignment=512 * 1024)
        bases[scheme] = _FuzzBase(path)
    path = _blank(folder / "gpt-sgdisk.img", FUZZ_SIZE)
    run("sgdisk", "-n", "1:0:+1M", "-n", "3:0:+2M", "-c", "3:x", "-n", "4:0:0", "-t", "4:8200", path)
    bases["gpt-sgdisk"] = _FuzzBase(path)
    path = _blank(folder / "mbr-parted.img", FUZZ_SIZE)
    run(
        "parted", "-s", path, "--", "mklabel", "msdos", "mkpart", "primary", "1MiB", "2MiB",
        "mkpart", "extended", "2MiB", "100%", "mkpart", "logical", "3MiB", "4MiB",
        "mkpart", "logical", "5MiB", "6MiB", "mkpart", "logical", "7MiB", "100%",
    )  # fmt: skip
    bases["mbr-parted"] = _FuzzBase(path)
    return bases


def _table_offsets(scheme: str, original: bytes) -> list[int]:
    if scheme == "gpt":
        return [*range(0x1BE, 512), *range(512, 512 + 92), *range(1024, 1024 + 3 * 128),
                *range(FUZZ_SIZE - 512, FUZZ_SIZE - 512 + 92)]  # fmt: skip
    offsets = list(range(0x1BE, 512))
    for lba in range(1, FUZZ_SIZE // 512):
        if original[lba * 512 + 510 : lba * 512 + 512] == b"\x55\xaa":
            offsets.extend(range(lba * 512 + 0x1BE, lba * 512 + 0x1DE))
    return offsets


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.sampled_from(["gpt", "mbr", "gpt-sgdisk", "mbr-parted"]),
    mutations=st.lists(
        st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6
    ),
    fix_crc=st.booleans(),
)
def test_fuzz_parsers(
    fuzz_bases: dict[str, _FuzzBase], base: str, mutations: list[tuple[int, bytes]], fix_crc: bool
) -> None:
    path, original = fuzz_bases[base].path, fuzz_bases[base].original
    scheme = base.split("-", maxsplit=1)[0]
    offsets = _table_offsets(scheme, original)
    data = bytearray(original)
    sectors = {1, FUZZ_SIZE // 512 - 1}
    for where, value in mutations:
        off = offsets[where % len(offsets)]
        data[off : off + len(value)] = value
        sectors.update(range(off // 512, (off + len(value) - 1) // 512 + 1))
    del data[FUZZ_SIZE:]
    if scheme == "gpt" and fix_crc:
        _fix_gpt_crcs(data)
    sectors = {s for s in sectors if s < FUZZ_SIZE // 512}
    with path.open("r+b") as f:
        for sector in sectors:
            f.seek(sector * 512)
            f.write(data[sector * 512 : (sector + 1) * 512])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageWarning)
            with open_image(path) as image:
                try:
                    parts = list_partitions(image)
                except PartitionTableError as exc:  # a clean, typed refusal that names the image
                    assert str(image.path) in str(exc)  # noqa: PT017 - hypothesis needs no raises() here
                    return
                for p in parts:
                    assert p.start >= 0
                    assert p.size > 0
                    assert p.end <= image.size
                    assert p.scheme in ("gpt", "mbr")
                    p.read_at(p.size - 1, 1)
                assert describe(image).count("\n") == len(parts)
    finally:
        with path.open("r+b") as f:
            for sector in sectors:
                f.seek(sector * 512)
                f.write(original[sector * 512 : (sector + 1) * 512])


def test_stale_gpt_behind_a_real_mbr_is_ignored(gpt_image: Path) -> None:
    """fdisk --wipe never writes a DOS label and leaves the old GPT headers; the MBR counts (as in Linux)."""
    run("fdisk", "--wipe", "never", gpt_image, input=b"o\nn\np\n\n\n+20M\nw\n")
    assert run("wipefs", "--no-act", gpt_image).count(" gpt ") == 2
    expected, _ = parted_layout(gpt_image)
    with open_image(gpt_image) as image, pytest.warns(ImageWarning, match="old GPT header"):
        parts = list_partitions(image)
    assert _layout(parts) == expected
    assert [p.scheme for p in parts] == ["mbr"]


def test_gpt_without_protective_mbr_is_read_with_a_warning(gpt_image: Path) -> None:
    expected, _ = sgdisk_layout(gpt_image)
    with gpt_image.open("r+b") as f:
        f.write(bytes(512))
    with open_image(gpt_image) as image, pytest.warns(ImageWarning, match="no protective MBR"):
        assert _layout(list_partitions(image)) == expected


@pytest.fixture(scope="module")
def roundtrip_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _blank(tmp_path_factory.mktemp("roundtrip") / "disk.img", 32 * MiB)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scheme=st.sampled_from(["gpt", "mbr"]),
    sizes=st.lists(
        st.one_of(st.integers(1, 5 * MiB), st.sampled_from([MiB, 2 * MiB])), min_size=1, max_size=9
    ),
    rest=st.booleans(),
    alignment=st.sampled_from([512, 4096, 512 * 1024, MiB]),
)
def test_created_tables_round_trip(
    roundtrip_disk: Path, scheme: str, sizes: list[int], rest: bool, alignment: int
) -> None:
    """Whatever fits is written so that the reference tool accepts it and list_partitions agrees."""
    specs = [PartitionSpec(size) for size in sizes] + ([PartitionSpec(None)] if rest else [])
    with open_image(roundtrip_disk, writable=True) as image:
        try:
            created = create_partition_table(image, scheme, specs, alignment=alignment)
        except PartitionTableError as exc:
            assert "does not fit" in str(exc)  # noqa: PT017 - hypothesis needs no raises() here
            event("does not fit")
            return
        data = [p for p in created if not p.is_extended]
        assert len(data) == len(specs)
        for part, spec in zip(data, specs, strict=True):
            assert part.start % alignment == 0
            if spec.size is not None:
                assert part.size == -(-spec.size // 512) * 512
        ends = sorted((p.start, p.end) for p in data)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in pairwise(ends))
        assert _layout(list_partitions(image)) == _layout(created)
    if scheme == "gpt":
        assert "No problems found" in run("sgdisk", "-v", roundtrip_disk)
        assert _layout(created) == sgdisk_layout(roundtrip_disk)[0]
    else:
        assert "No errors detected" in run("sfdisk", "-V", roundtrip_disk)
        assert _layout(created) == parted_layout(roundtrip_disk)[0]
