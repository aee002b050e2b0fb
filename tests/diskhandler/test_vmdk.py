"""VMDK: every subformat qemu makes, delta links, real images from other products, corrupt input.

What diskhandler writes is checked against qemu (``qemu-img check``, ``qemu-img convert``, ``qemu-io read
-P``); what qemu (and VMware / VirtualBox exports) wrote is checked against ``qemu-img convert -O raw``.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import (
    ChainError,
    ImageFormatError,
    ImageWarning,
    UnsupportedImageError,
    create_image,
    open_image,
)
from diskhandler.formats._detect import detect_format
from diskhandler.formats._vmdk_descriptor import looks_like_descriptor, parse_descriptor
from diskhandler.formats.vmdk import VMDKImage
from tests.diskhandler.imagetools import (
    REAL_IMAGES,
    assert_reads_like_qemu,
    compare_with_raw,
    fill_with_pattern,
    qemu_check,
    qemu_flatten,
    qemu_img,
    qemu_io,
)
from tests.diskhandler.imagetools import PowerCut as _PowerCut
from tests.diskhandler.imagetools import patch_file as _patch
from tests.diskhandler.imagetools import sha256_of_file as _sha

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB
QEMU_SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]
WRITABLE_SUBFORMATS = QEMU_SUBFORMATS


def _qemu_create(path: Path, size: int = SIZE, *options: str) -> Path:
    argv = ["create", "-q", "-f", "vmdk"]
    for option in options:
        argv += ["-o", option]
    qemu_img(*argv, path, str(size))
    return path


def _descriptor_text(path: Path) -> str:
    data = path.read_bytes()
    if data[:4] == b"KDMV":
        start = struct.unpack_from("<Q", data, 28)[0] * 512
        data = data[start : start + 20 * 512]
    return data.split(b"\0", 1)[0].decode()


def _edit_descriptor(path: Path, old: str, new: str) -> None:
    """Replace text in an image's descriptor, embedded (keeping its NUL-padded area) or not."""
    data = bytearray(path.read_bytes())
    text = _descriptor_text(path)
    assert old in text
    edited = text.replace(old, new, 1).encode()
    if data[:4] == b"KDMV":
        start = struct.unpack_from("<Q", data, 28)[0] * 512
        data[start : start + 20 * 512] = edited.ljust(20 * 512, b"\0")
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(edited)


def _cid(path: Path, key: str = "CID") -> str:
    match = re.search(rf"(?m)^{key}=([0-9a-f]+)", _descriptor_text(path))
    assert match is not None
    return match.group(1)


# -- images qemu made --------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", QEMU_SUBFORMATS)
def test_qemu_subformat_reads_like_qemu(tmp_path: Path, subformat: str) -> None:
    path = _qemu_create(tmp_path / "disk.vmdk", SIZE, f"subformat={subformat}")
    fill_with_pattern(path, "vmdk")
    assert detect_format(path) == "vmdk"
    assert_reads_like_qemu(path, "vmdk", tmp_path)
    with open_image(path) as image:
        assert isinstance(image, VMDKImage)
        assert image.create_type == subformat
        assert image.read_at(3145216, 3000) == b"\x33" * 3000


def test_qemu_zeroed_grains_read_as_zeros(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "zg.vmdk", SIZE, "zeroed_grain=on")
    fill_with_pattern(path, "vmdk")
    assert_reads_like_qemu(path, "vmdk", tmp_path)


def test_qemu_stream_optimized_compressed_reads_like_qemu(tmp_path: Path) -> None:
    source = _qemu_create(tmp_path / "source.vmdk")
    fill_with_pattern(source, "vmdk")
    stream = tmp_path / "stream.vmdk"
    qemu_img("convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", source, stream)
    assert stream.stat().st_size < 8 * MiB  # really compressed
    assert_reads_like_qemu(stream, "vmdk", tmp_path)
    with open_image(stream) as image:
        assert isinstance(image, VMDKImage)
        assert image.create_type == "streamOptimized"
    with pytest.raises(UnsupportedImageError, match="read-only"):
        open_image(stream, writable=True)


def test_stream_optimized_created_empty_by_qemu(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "empty-stream.vmdk", SIZE, "subformat=streamOptimized")
    assert_reads_like_qemu(path, "vmdk", tmp_path)


def test_qemu_delta_chain_reads_like_qemu(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.vmdk", SIZE, "zeroed_grain=on")
    fill_with_pattern(base, "vmdk")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", child)
    # partial grains over parent data, zeros over parent data (zeroed GTEs), a whole new grain
    qemu_io(child, "vmdk", ["write -P 0xa1 1100000 70000", "write -z 8M 128k", "write -P 0xa2 40M 64k"])
    grandchild = tmp_path / "grandchild.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", child.name, "-F", "vmdk", grandchild)
    qemu_io(grandchild, "vmdk", ["write -P 0xa3 8200000 5000"])
    for leaf in (child, grandchild):
        assert_reads_like_qemu(leaf, "vmdk", tmp_path)
    with open_image(grandchild) as image:
        assert image.chain == (grandchild, child, base)
        assert image.read_at(8 * MiB, 4096) == bytes(4096)  # the child's zeroed grain hides the base


# -- images diskhandler made, read by qemu -----------------------------------------------------------


@pytest.mark.parametrize("subformat", WRITABLE_SUBFORMATS)
def test_qemu_io_reads_diskhandler_writes(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "ours.vmdk"
    with create_image(path, SIZE, subformat=subformat, adapter_type="lsilogic") as image:
        image.write_at(0, b"\x5a" * 1000)
        image.write_at(65536 - 100, b"\x5b" * 200)  # across a grain boundary
        image.write_at(SIZE - MiB - 7, b"\x5c" * (MiB + 7))
    qemu_check(path, "vmdk")
    qemu_io(
        path,
        "vmdk",
        [
            "read -P 0x5a 0 1000",
            "read -P 0 1000 64436",
            "read -P 0x5b 65436 200",
            "read -P 0 65636 1M",
            f"read -P 0x5c {SIZE - MiB - 7} {MiB + 7}",
        ],
    )
    assert 'ddb.adapterType = "lsilogic"' in _descriptor_text(path)
    info = qemu_img("info", "--output=json", path)
    assert f'"create-type": "{subformat}"' in info


def test_two_gb_extents_written_across_the_boundary(tmp_path: Path) -> None:
    size = 5 * GiB + 512
    across = 2 * GiB - 3000
    for subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        path = tmp_path / f"{subformat}.vmdk"
        with create_image(path, size, subformat=subformat) as image:
            assert image.size == size
            image.write_at(across, b"\xab" * 70000)
            image.write_at(4 * GiB - 1, b"\xee\xee")
            image.write_at(size - 10, b"\xcd" * 10)
        letter = "s" if subformat.endswith("Sparse") else "f"
        assert sorted(p.name for p in tmp_path.glob(f"{subformat}-{letter}*.vmdk")) == [
            f"{subformat}-{letter}00{n}.vmdk" for n in (1, 2, 3)
        ]
        qemu_check(path, "vmdk")
        with open_image(path) as image:
            assert image.read_at(across - 1, 70002) == b"\0" + b"\xab" * 70000 + b"\0"
            assert image.read_at(4 * GiB - 2, 4) == b"\0\xee\xee\0"
            assert image.read_at(size - 11, 100) == b"\0" + b"\xcd" * 10
        qemu_io(
            path,
            "vmdk",
            [
                f"read -P 0 {across - 4096} 4096",
                f"read -P 0xab {across} 70000",
                f"read -P 0 {across + 70000} 4096",
                f"read -P 0xee {4 * GiB - 1} 2",
                f"read -P 0xcd {size - 10} 10",
            ],
        )


def test_diskhandler_child_of_qemu_parent(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.vmdk")
    fill_with_pattern(base, "vmdk")
    base_digest = _sha(base)
    base_cid = _cid(base)
    os.mkdir(tmp_path / "snapshots")
    child = tmp_path / "snapshots" / "child.vmdk"
    rng = random.Random("child-of-qemu")
    flat = qemu_flatten(base, "vmdk", tmp_path / "model.raw")
    model = bytearray(flat.read_bytes())
    with create_image(child, parent=base) as image:
        assert image.size == SIZE
        assert isinstance(image, VMDKImage)
        assert image.parent_cid == int(base_cid, 16)
        for _ in range(30):
            length = rng.choice([1, 700, 65536, 100000, rng.randrange(1, 2 * MiB)])
            offset = rng.randrange(0, SIZE - length)
            data = rng.randbytes(length)
            image.write_at(offset, data)
            model[offset : offset + length] = data
    assert 'parentFileNameHint="../base.vmdk"' in _descriptor_text(child)
    assert int(_cid(child, "parentCID"), 16) == int(base_cid, 16)  # qemu writes CIDs without zero padding
    assert _sha(base) == base_digest  # the parent is never written
    qemu_check(child, "vmdk")
    assert qemu_flatten(child, "vmdk", tmp_path / "child.raw").read_bytes() == model
    compare_with_raw(child, tmp_path / "child.raw")


def _tables(path: Path) -> tuple[bytes, bytes]:
    """The primary and the redundant grain tables of a one-table sparse image."""
    data = path.read_bytes()
    rgd, gd = struct.unpack_from("<QQ", data, 48)
    (rgt,) = struct.unpack_from("<I", data, rgd * 512)
    (gt,) = struct.unpack_from("<I", data, gd * 512)
    return data[gt * 512 : gt * 512 + 2048], data[rgt * 512 : rgt * 512 + 2048]


def test_redundant_grain_tables_kept_in_step(tmp_path: Path) -> None:
    path = tmp_path / "disk.vmdk"
    with create_image(path, 8 * MiB) as image:
        image.write_at(100, b"a" * 300000)
        image.write_at(7 * MiB, b"b" * 5)
    primary, redundant = _tables(path)
    assert primary == redundant
    assert primary.count(b"\0\0\0\0") < 512  # entries were set


def test_missing_grain_table_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "disk.vmdk"
    create_image(path, 8 * MiB).close()
    data = path.read_bytes()
    rgd, gd = struct.unpack_from("<QQ", data, 48)
    _patch(path, rgd * 512, bytes(4))  # as if the tables had never been preallocated
    _patch(path, gd * 512, bytes(4))
    size_before = path.stat().st_size
    with open_image(path, writable=True) as image:
        assert image.read() == bytes(8 * MiB)
        image.write_at(3 * MiB + 5, b"\x42" * 70000)
    assert path.stat().st_size == size_before + 2 * 65536 + 2 * 2048  # two grains, two tables
    primary, redundant = _tables(path)
    assert primary == redundant
    qemu_check(path, "vmdk")
    qemu_io(path, "vmdk", [f"read -P 0 0 {3 * MiB + 5}", f"read -P 0x42 {3 * MiB + 5} 70000"])


def test_writes_into_qemu_zeroed_grains(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.vmdk", 4 * MiB)
    qemu_io(base, "vmdk", ["write -P 0x11 0 4M"])
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", child)
    qemu_io(child, "vmdk", ["write -z 64k 128k"])
    with open_image(child, writable=True) as image:
        image.write_at(65536 + 1000, b"\x22" * 10)  # inside a zeroed grain: zeros around, not the base
        image.write_at(3 * MiB + 1000, b"\x33" * 10)  # an unallocated grain: the base around
    qemu_check(child, "vmdk")
    qemu_io(
        child,
        "vmdk",
        [
            "read -P 0x11 0 64k",
            "read -P 0 64k 1000",
            "read -P 0x22 66536 10",
            "read -P 0 66546 130062",
            f"read -P 0x11 {3 * MiB} 1000",
            f"read -P 0x33 {3 * MiB + 1000} 10",
            f"read -P 0x11 {3 * MiB + 1010} 1000",
        ],
    )


def test_write_over_allocated_new_allocated_grains(tmp_path: Path) -> None:
    # Grains 0 and 2 land next to each other in the file; grain 1, between them on the disk, is
    # new. One write over all three must not run grain 0's file write on into grain 2's.
    path = tmp_path / "g.vmdk"
    grain = 64 * 1024
    with create_image(path, 4 * MiB) as image:
        image.write_at(0, b"\x01" * grain)
        image.write_at(2 * grain, b"\x03" * grain)
    with open_image(path, writable=True) as image:
        image.write_at(100, b"\x11" * (grain - 100) + b"\x22" * grain + b"\x33" * 100)
    with open_image(path) as image:
        assert image.read_at(2 * grain, 200) == b"\x33" * 100 + b"\x03" * 100
    qemu_io(
        path,
        "vmdk",
        [
            "read -P 0x01 0 100",
            f"read -P 0x11 100 {grain - 100}",
            f"read -P 0x22 {grain} {grain}",
            f"read -P 0x33 {2 * grain} 100",
            f"read -P 0x03 {2 * grain + 100} {grain - 100}",
        ],
    )


def test_size_rounded_up_to_sectors(tmp_path: Path) -> None:
    with create_image(tmp_path / "odd.vmdk", 1_000_000) as image:
        assert image.size == 1_000_448
    assert '"virtual-size": 1000448' in qemu_img("info", "--output=json", tmp_path / "odd.vmdk")


# -- content ids -------------------------------------------------------------------------------------


def test_first_write_changes_the_cid_of_the_leaf_only(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    create_image(base, 4 * MiB).close()
    child = tmp_path / "child.vmdk"
    create_image(child, parent=base).close()
    base_cid, child_cid = _cid(base), _cid(child)
    with open_image(child, writable=True) as image:
        assert image.read_at(0, 10) == bytes(10)
        assert _cid(child) == child_cid  # reading changes nothing
        image.write_at(0, b"first")
        changed = _cid(child)
        assert changed != child_cid
        image.write_at(100, b"second")
        assert _cid(child) == changed  # once per session
    assert _cid(base) == base_cid
    assert _cid(child, "parentCID") == base_cid
    info = qemu_img("info", "--output=json", child)
    assert f'"cid": {int(changed, 16)}' in info


@pytest.mark.parametrize("subformat", ["monolithicFlat", "monolithicSparse"])
def test_cid_update_keeps_a_byte_order_mark(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "bom.vmdk"
    create_image(path, MiB, subformat=subformat).close()
    data = path.read_bytes()
    start = 512 if subformat == "monolithicSparse" else 0  # the embedded descriptor's sector
    text = data[start:].split(b"\0", 1)[0]
    data = data[:start] + b"\xef\xbb\xbf" + text + data[start + len(text) + 3 :]
    path.write_bytes(data)
    with open_image(path, writable=True) as image:
        image.write_at(0, b"x")
    after = path.read_bytes()[start:].split(b"\0", 1)[0]
    assert after.startswith(b"\xef\xbb\xbf# Disk DescriptorFile")
    assert after.endswith(b'ddb.adapterType = "ide"\n')  # nothing of the old text left behind
    assert len(after) == len(text) + 3
    qemu_io(path, "vmdk", ["read -P 0x78 0 1"])


def test_cid_update_changes_nothing_but_the_cid(tmp_path: Path) -> None:
    # A declared encoding that does not give the stored bytes back (an escape codec) is not used:
    # rewriting the descriptor in it would turn every newline into a backslash and an "n".
    path = tmp_path / "flat.vmdk"
    create_image(path, MiB, subformat="monolithicFlat").close()
    text = path.read_text().replace('encoding="UTF-8"', 'encoding="unicode_escape"')
    text = text.replace("ddb.adapterType", 'ddb.comment = "C:\\\\new"\nddb.adapterType')
    path.write_text(text)
    with open_image(path, writable=True) as image:
        image.write_at(0, b"x")
    before, after = text.splitlines(), path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [a.split("=")[0] for a, _ in changed] == ["CID"]
    qemu_io(path, "vmdk", ["read -P 0x78 0 1"])


def test_parent_cid_mismatch_warns_on_read_and_refuses_write(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    create_image(base, 4 * MiB).close()
    child = tmp_path / "child.vmdk"
    create_image(child, parent=base).close()
    with open_image(base, writable=True) as image:  # the parent changes after the snapshot
        image.write_at(0, b"changed")
    with pytest.warns(ImageWarning, match="parentCID"), open_image(child) as image:
        assert image.read_at(0, 7) == b"changed"
    with pytest.raises(ChainError, match="parentCID") as excinfo:
        open_image(child, writable=True)
    assert excinfo.value.path == child


def test_split_sparse_child_of_split_flat_parent(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    boundary = 2 * GiB
    with create_image(base, 3 * GiB, subformat="twoGbMaxExtentFlat") as image:
        image.write_at(boundary - 5, b"x" * 10)
    child = tmp_path / "child.vmdk"
    create_image(child, parent=base, subformat="twoGbMaxExtentSparse").close()
    before = child.read_text()
    with open_image(child, writable=True) as image:
        image.write_at(boundary - 2, b"yy")  # the two bytes straddle the extents of both images
    after = child.read_text()
    assert before != after
    assert re.sub(r"(?m)^CID=.*$", "", before) == re.sub(r"(?m)^CID=.*$", "", after)  # only the CID moved
    with open_image(child) as image:
        assert image.chain == (child, base)
        assert image.read_at(boundary - 6, 12) == b"\0xxxyyxxxxx\0"
    qemu_check(child, "vmdk")
    qemu_io(child, "vmdk", [f"read -P 0x78 {boundary - 5} 3", f"read -P 0x79 {boundary - 2} 2"])


def test_writing_a_real_qemu_made_image(tmp_path: Path) -> None:
    real = REAL_IMAGES / "dfvfs/ext2.vmdk"
    if not real.exists():
        pytest.skip(f"{real} is not here")
    path = tmp_path / "ext2.vmdk"
    shutil.copyfile(real, path)
    path.chmod(0o644)
    old_cid = _cid(path)
    with open_image(path, writable=True) as image:
        original = image.read()
        image.write_at(3 * MiB + 17, b"\xfe" * 100000)
    assert _cid(path) != old_cid
    qemu_check(path, "vmdk")
    flat = qemu_flatten(path, "vmdk", tmp_path / "flat.raw").read_bytes()
    expected = bytearray(original)
    expected[3 * MiB + 17 : 3 * MiB + 100017] = b"\xfe" * 100000
    assert flat == expected


# -- descriptors and parents found the ways other products write them ----------------------------------


def test_descriptor_in_windows_1252_with_zero_extent_and_odd_case(tmp_path: Path) -> None:
    name = "disque-\u00e9t\u00e9 1.vmdk"  # a space and windows-1252 letters
    flat = tmp_path / name
    flat.write_bytes(b"\x42" * 8192)
    descriptor = (
        "# Disk DescriptorFile\r\n"
        "# written by hand\r\n"
        "VERSION=1\r\n"
        'Encoding="windows-1252"\r\n'
        "cid=0000abcd\r\n"
        "PARENTCID=ffffffff\r\n"
        'createtype = "monolithicFlat"\r\n'
        "\r\n"
        f'RW 16 FLAT "{name}" 0\r\n'
        "RDONLY 8 ZERO\r\n"
        f'RW 4 FLAT "{name}" 2  \r\n'
        "# The Disk Data Base\r\n"
        'ddb.adapterType = "ide"\r\n'
    ).encode("cp1252")
    path = tmp_path / "desc.vmdk"
    path.write_bytes(descriptor)
    with open_image(path) as image:
        assert isinstance(image, VMDKImage)
        assert image.cid == 0xABCD
        assert image.size == 28 * 512
        assert image.read() == b"\x42" * 8192 + bytes(4096) + b"\x42" * 2048
        assert image.extent_files == (flat,)
    with pytest.raises(UnsupportedImageError, match="ZERO extent cannot be written"):
        open_image(path, writable=True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('RW 16 VMFS "x-flat.vmdk"', "VMFS extents"),
        ('RW 16 VMFSRDM "x-rdm.vmdk"', "VMFSRDM extents"),
        ('RW 16 SESPARSE "x-sesparse.vmdk"', "SESPARSE extents"),
        ('NOACCESS 16 FLAT "x.bin" 0', "NOACCESS"),
        ('RW 16 FLAT "missing.bin" 0', "does not exist"),
        ("RW sixteen FLAT", "bad extent line"),
        ("RW " + "9" * 5000 + ' FLAT "x.bin" 0', r"extent of 9+\.\.\. sectors is absurd"),
        ("RW 99999999999999999999 ZERO", "extent of 99999999999999999999 sectors is absurd"),
        ('RW 16 FLAT "x.bin" ' + "9" * 30, r"starting at sector 9+\.\.\. is absurd"),
    ],
)
def test_descriptor_extents_refused(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "x.bin").write_bytes(bytes(8192))
    path = tmp_path / "d.vmdk"
    path.write_text(
        f'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="vmfs"\n{line}\n'
    )
    with pytest.raises(ImageFormatError, match=message) as excinfo:
        open_image(path)
    assert excinfo.value.path == path


def test_raw_device_create_types_refused(tmp_path: Path) -> None:
    path = tmp_path / "rdm.vmdk"
    path.write_text('# Disk DescriptorFile\nCID=1\ncreateType="fullDevice"\nRW 16 FLAT "/dev/sda" 0\n')
    with pytest.raises(UnsupportedImageError, match="createType"):
        open_image(path)


def test_cowd_is_recognised_but_refused(tmp_path: Path) -> None:
    path = tmp_path / "delta.vmdk"
    path.write_bytes(b"COWD" + struct.pack("<I", 1) + bytes(2040))
    assert detect_format(path) == "vmdk"
    with pytest.raises(UnsupportedImageError, match="COWD") as excinfo:
        open_image(path)
    assert excinfo.value.field == "magic"


def test_probe_is_strict_about_text() -> None:
    good = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n' + bytes(100)
    assert VMDKImage.probe(good, b"")
    assert not VMDKImage.probe(b"# a shell script\ncreateType=1\n", b"")  # no descriptor marker
    assert not VMDKImage.probe(b"# Disk DescriptorFile\nversion=1\n", b"")  # no createType
    assert not VMDKImage.probe(good + b"\x01\x02", b"")  # data after the NUL padding
    assert not VMDKImage.probe(b"\x7fELF" + bytes(4092), b"")
    assert not VMDKImage.probe(random.Random(1).randbytes(4096), b"")
    assert not looks_like_descriptor(b'version=1\n# Disk DescriptorFile\ncreateType="x"\n')


def test_parent_found_by_windows_hint_basename(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    with create_image(base, 4 * MiB) as image:
        image.write_at(0, b"from the base")
    child = tmp_path / "child.vmdk"
    create_image(child, parent=base).close()
    _edit_descriptor(child, 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="C:\\VMs\\base.vmdk"')
    with open_image(child) as image:
        assert image.chain == (child, base)
        assert image.read_at(0, 13) == b"from the base"
    base.rename(tmp_path / "elsewhere.vmdk")
    with pytest.raises(ChainError, match="does not exist") as excinfo:
        open_image(child)
    assert excinfo.value.field == "parent"


def test_cyclic_parents_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    create_image(a, 4 * MiB).close()
    create_image(b, parent=a).close()
    _edit_descriptor(
        a, 'createType="monolithicSparse"', 'createType="monolithicSparse"\nparentFileNameHint="b.vmdk"'
    )
    with pytest.raises(ChainError, match="loops"):
        open_image(b)


# -- real images made by other products ----------------------------------------------------------------


REAL = [
    "cot/ubuntu.2.0-disk1.vmdk",  # VirtualBox export: GD_AT_END, footer
    "cot/input.vmdk",  # VMware tooling; names itself generated-stream.vmdk
    "cot/blank.vmdk",
    "dfvfs/ext2.vmdk",  # old qemu monolithicSparse holding ext2
]


@pytest.mark.parametrize("name", REAL)
def test_real_image_reads_like_qemu(tmp_path: Path, name: str) -> None:
    path = REAL_IMAGES / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    assert detect_format(path) == "vmdk"
    flat = qemu_flatten(path, "vmdk", tmp_path / "flat.raw")
    _compare_with_sparse_raw(path, flat)


def _compare_with_sparse_raw(image_path: Path, flat: Path, chunk: int = 4 * MiB) -> None:
    """compare_with_raw for big, mostly empty disks: the flat file's holes are compared as zeros."""
    zeros = bytes(chunk)
    buf = mmap.mmap(-1, chunk)
    view = memoryview(buf)
    with open_image(image_path) as image, flat.open("rb") as ref:
        size = flat.stat().st_size
        assert image.size == size
        fd = ref.fileno()
        offset = 0
        while offset < size:
            try:
                data_at = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # nothing but a hole up to the end
                data_at = size
            while offset < data_at:  # a hole: diskhandler must read zeros
                n = min(chunk, data_at - offset)
                assert image.readinto_at(offset, view[:n]) == n
                assert buf[:n] == zeros[:n], f"{image_path}: bytes at {offset} should be zeros"
                offset += n
            if offset >= size:
                break
            hole_at = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < hole_at:
                n = min(chunk, hole_at - offset)
                assert image.read_at(offset, n) == os.pread(fd, n, offset), (
                    f"{image_path}: differs near {offset}"
                )
                offset += n


def test_real_ext2_image_holds_its_filesystem() -> None:
    path = REAL_IMAGES / "dfvfs/ext2.vmdk"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    with open_image(path) as image:
        superblock = image.read_at(1024, 1024)
    assert superblock[56:58] == b"\x53\xef"  # the ext2 magic


# -- corrupt input ----------------------------------------------------------------------------------------


@pytest.fixture
def small_sparse(tmp_path: Path) -> Path:
    path = tmp_path / "small.vmdk"
    with create_image(path, 2 * MiB) as image:
        image.write_at(0, b"\x99" * 200000)
    return path


@pytest.mark.parametrize(
    ("offset", "data", "field"),
    [
        (0, b"KDMX", None),  # no magic: not detected as VMDK at all
        (4, struct.pack("<I", 7), "version"),
        (20, struct.pack("<Q", 3), "grainSize"),
        (20, struct.pack("<Q", 1 << 40), "grainSize"),
        (12, struct.pack("<Q", 0), "capacity"),
        (12, struct.pack("<Q", 1 << 62), "capacity"),
        (44, struct.pack("<I", 100000), "numGTEsPerGT"),
        (56, struct.pack("<Q", 1 << 40), "gdOffset"),
        (64, struct.pack("<Q", 1 << 40), "overHead"),
        (77, struct.pack("<H", 9), "compressAlgorithm"),
        (36, struct.pack("<Q", 1 << 30), "descriptorSize"),
        (28, struct.pack("<Q", 1 << 30), "descriptorOffset"),
    ],
)
def test_corrupt_header_fields(small_sparse: Path, offset: int, data: bytes, field: str | None) -> None:
    _patch(small_sparse, offset, data)
    with (
        pytest.raises(ImageFormatError) as excinfo,
        open_image(small_sparse, format="vmdk" if field is None else None) as image,
    ):
        image.read()
    assert excinfo.value.path == small_sparse
    assert excinfo.value.field == field
    assert str(small_sparse) in str(excinfo.value)


def test_truncated_sparse_image(small_sparse: Path) -> None:
    with small_sparse.open("r+b") as f:
        f.truncate(30 * 512)
    with pytest.raises(ImageFormatError, match="truncated") as excinfo:
        open_image(small_sparse)
    assert excinfo.value.path == small_sparse


def test_grain_past_end_of_file(small_sparse: Path) -> None:
    size = small_sparse.stat().st_size
    with small_sparse.open("r+b") as f:
        f.truncate(size - 65536)  # the last grain is gone; the metadata is intact
    with open_image(small_sparse) as image:
        assert image.read_at(0, 100) == b"\x99" * 100
        with pytest.raises(ImageFormatError, match="truncated"):
            image.read()


def test_grain_table_past_end_of_file(small_sparse: Path) -> None:
    gd = struct.unpack_from("<Q", small_sparse.read_bytes(), 56)[0]
    _patch(small_sparse, gd * 512, struct.pack("<I", 0x7FFFFFFF))
    with open_image(small_sparse) as image, pytest.raises(ImageFormatError) as excinfo:
        image.read_at(0, 10)
    assert excinfo.value.field == "grain directory entry 0"


def test_damaged_stream_footer(tmp_path: Path) -> None:
    real = REAL_IMAGES / "cot/ubuntu.2.0-disk1.vmdk"
    if not real.exists():
        pytest.skip(f"{real} is not here")
    path = tmp_path / "stream.vmdk"
    shutil.copyfile(real, path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 512)  # the end-of-stream marker is gone
    with pytest.raises(ImageFormatError, match="footer") as excinfo:
        open_image(path)
    assert excinfo.value.field == "footer"


def test_damaged_compressed_grain(tmp_path: Path) -> None:
    source = tmp_path / "source.vmdk"
    with create_image(source, 4 * MiB) as image:
        image.write_at(0, random.Random(3).randbytes(65536))
    stream = tmp_path / "stream.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source, stream)
    data = bytearray(stream.read_bytes())
    first_grain = struct.unpack_from("<Q", data, 64)[0] * 512  # overHead: the first grain's marker
    assert struct.unpack_from("<Q", data, first_grain)[0] == 0  # its LBA
    data[first_grain + 12 : first_grain + 76] = bytes(64)  # the zlib stream after lba and size
    stream.write_bytes(bytes(data))
    with open_image(stream) as image, pytest.raises(ImageFormatError, match="damaged"):
        image.read_at(0, 10)


def test_missing_extent_file(tmp_path: Path) -> None:
    path = tmp_path / "split.vmdk"
    create_image(path, 3 * GiB, subformat="twoGbMaxExtentSparse").close()
    (tmp_path / "split-s002.vmdk").unlink()
    with pytest.raises(ImageFormatError, match=r"split-s002\.vmdk does not exist") as excinfo:
        open_image(path)
    assert excinfo.value.field == "extent 2"


# -- create_image options --------------------------------------------------------------------------------


def test_create_options_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="streamOptimized is read-only"):
        create_image(tmp_path / "a.vmdk", MiB, subformat="streamOptimized")
    with pytest.raises(ValueError, match="adapter_type"):
        create_image(tmp_path / "a.vmdk", MiB, adapter_type="scsi")
    with pytest.raises(TypeError, match="unknown VMDK options"):
        create_image(tmp_path / "a.vmdk", MiB, cluster_size=4096)
    base = tmp_path / "base.vmdk"
    create_image(base, MiB).close()
    with pytest.raises(ValueError, match="cannot have a parent"):
        create_image(tmp_path / "b.vmdk", parent=base, subformat="monolithicFlat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.vmdk"]


def test_create_refuses_to_overwrite_an_extent_file(tmp_path: Path) -> None:
    (tmp_path / "disk-flat.vmdk").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        create_image(tmp_path / "disk.vmdk", MiB, subformat="monolithicFlat")
    assert (tmp_path / "disk-flat.vmdk").read_bytes() == b"precious"
    assert not (tmp_path / "disk.vmdk").exists()


# -- fuzzing ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "seed.vmdk"
    with create_image(path, 1 * MiB) as image:
        image.write_at(70000, b"\x77" * 70000)
    return path.read_bytes()


def _open_and_read(path: Path) -> None:
    try:
        with open_image(path, format="vmdk") as image:
            image.read_at(0, 65536)
            image.read_at(max(0, image.size - 65536), 65536)
            image.read_at(image.size // 2, 200000)
    except ImageFormatError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_sparse_header_and_descriptor(tmp_path: Path, fuzz_seed: bytes, data: st.DataObject) -> None:
    image = bytearray(fuzz_seed)
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, 32 * 512 - 1), st.integers(0, 255)), min_size=1, max_size=8)
    )
    for offset, value in edits:
        image[offset] = value
    path = tmp_path / "fuzz.vmdk"
    path.write_bytes(bytes(image))
    _open_and_read(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=2048))
def test_fuzz_random_data(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "random.vmdk"
    path.write_bytes(b"KDMV" + blob)
    _open_and_read(path)


def _stream_with_footer(folder: Path) -> bytes:
    """A qemu streamOptimized image rewritten the way VMware exports it: GD_AT_END plus a footer."""
    source = folder / "source.vmdk"
    with create_image(source, 2 * MiB) as image:
        image.write_at(70000, random.Random(5).randbytes(200000))
    stream = folder / "stream.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source, stream)
    data = bytearray(stream.read_bytes())
    header = bytes(data[:512])
    data[56:64] = b"\xff" * 8  # gdOffset = GD_AT_END
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    eos = bytes(512)
    return bytes(data) + footer_marker + header + eos


def test_footer_is_honoured(tmp_path: Path) -> None:
    data = _stream_with_footer(tmp_path)
    path = tmp_path / "footer.vmdk"
    path.write_bytes(data)
    assert_reads_like_qemu(path, "vmdk", tmp_path)
    with open_image(path) as image:
        assert image.read_at(70000, 200000) == random.Random(5).randbytes(200000)


@pytest.fixture(scope="module")
def footer_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _stream_with_footer(tmp_path_factory.mktemp("footer"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_stream_header_and_footer(tmp_path: Path, footer_seed: bytes, data: st.DataObject) -> None:
    image = bytearray(footer_seed)
    size = len(image)
    where = st.one_of(st.integers(0, 511), st.integers(size - 1536, size - 1))
    edits = data.draw(st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=8))
    for offset, value in edits:
        image[offset] = value
    path = tmp_path / "fuzz-stream.vmdk"
    path.write_bytes(bytes(image))
    _open_and_read(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_descriptor_file(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "flat.vmdk"
    if not path.exists():
        create_image(path, MiB, subformat="monolithicFlat").close()
    text = bytearray(
        b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\nRW 2048 FLAT "flat-flat.vmdk" 0\nRDONLY 16 ZERO\n'
    )
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255)), min_size=1, max_size=6)
    )
    for offset, value in edits:
        text[offset] = value
    path.write_bytes(bytes(text))
    _open_and_read(path)


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(max_size=400),
    lines=st.lists(
        st.sampled_from(
            [
                'RW 8 FLAT "f.bin" 0',
                "RDONLY 4 ZERO",
                'RW 99999999999999999999 SPARSE "s.vmdk"',
                "CID=zz",
                "parentCID=1",
                'createType="monolithicFlat"',
                "RW 1 FLAT",
                "NOACCESS 1 ZERO",
                'x="',
                "=",
            ]
        ),
        max_size=6,
    ),
)
def test_fuzz_descriptor_parser(text: str, lines: list[str]) -> None:
    blob = ("# Disk DescriptorFile\n" + "\n".join(lines) + "\n" + text).encode("utf-8", "replace")
    try:
        descriptor = parse_descriptor(blob, Path("fuzz.vmdk"))
        descriptor.cid(Path("fuzz.vmdk"), "parentCID")
    except ImageFormatError:
        pass


def _allocating_workload(path: Path) -> None:
    with open_image(path, writable=True) as image:
        image.write_at(MiB + 5, b"\x22" * 100)  # a new grain, in a grain table that exists
        image.write_at(0, b"\x12" * 10)  # in place
        image.write_at(33 * MiB - 100, b"\x33" * 200_000)  # new grains in both tables, one table new


def test_power_cut_at_any_write_leaves_old_or_new_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = tmp_path / "seed.vmdk"
    with create_image(seed, 40 * MiB) as image:  # two grain tables
        image.write_at(0, b"\x11" * 65536)
    data = seed.read_bytes()
    rgd, gd = struct.unpack_from("<QQ", data, 48)
    _patch(seed, rgd * 512 + 4, bytes(4))  # the second table was never preallocated
    _patch(seed, gd * 512 + 4, bytes(4))
    calls = 0
    stop_at = -1
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def counted(real: Any) -> Any:
        def write(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == stop_at:
                raise _PowerCut(5, "simulated power cut")
            return real(*args)

        return write

    monkeypatch.setattr(os, "pwrite", counted(real_pwrite))
    monkeypatch.setattr(os, "pwritev", counted(real_pwritev))
    work = tmp_path / "work.vmdk"
    shutil.copyfile(seed, work)
    _allocating_workload(work)
    total = calls
    assert total >= 8
    writes = [(0, b"\x12" * 10), (MiB + 5, b"\x22" * 100), (33 * MiB - 100, b"\x33" * 200_000)]
    for stop in range(1, total + 1):
        calls, stop_at = 0, stop
        shutil.copyfile(seed, work)
        with pytest.raises(_PowerCut):
            _allocating_workload(work)
        calls, stop_at = 0, -1
        when = f"power cut at write {stop} of {total}"
        qemu_check(work, "vmdk")
        expect = bytearray(40 * MiB)
        expect[:65536] = b"\x11" * 65536
        with open_image(work) as image:
            got = image.read_at(0, 40 * MiB)
        for start, new in writes:  # each write shows entirely old or entirely new bytes per grain
            for grain in range(start // 65536, (start + len(new) - 1) // 65536 + 1):
                lo, hi = max(start, grain * 65536), min(start + len(new), (grain + 1) * 65536)
                if got[lo:hi] == new[lo - start : hi - start]:
                    expect[lo:hi] = got[lo:hi]
        assert got == expect, when
