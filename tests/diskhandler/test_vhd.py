"""VHD: qemu-made images read like qemu, diskhandler-made ones read back through qemu, differencing
chains against an independent model, the size rules, damaged input, and the real third-party images.

qemu opens differencing VHDs without their parent, so chains are checked against a model (and, for the
real images, against a small independent parser of the BAT and bitmaps written out below).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import (
    ChainError,
    DiskImage,
    ImageFormatError,
    ImageInUseError,
    ImageWarning,
    ReadOnlyImageError,
    UnsupportedImageError,
    create_image,
    detect_format,
    open_image,
)
from diskhandler.formats.vhd import VHDImage, _bitmap_runs, vhd_checksum
from tests.diskhandler.imagetools import (
    REAL_IMAGES,
    assert_reads_like_qemu,
    compare_with_raw,
    fill_with_pattern,
    power_cut_at_every_write,
    qemu_flatten,
    qemu_img,
    qemu_io,
)
from tests.diskhandler.imagetools import sha256_of_file as _sha

MiB = 1 << 20
DFVFS = REAL_IMAGES / "dfvfs"
needs_real_images = pytest.mark.skipif(
    not (DFVFS / "ext2.vhd").exists(), reason="the real third-party test images are not available"
)


# -- a small independent VHD parser: the reference for chains qemu cannot read -----------------------


def _footer(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:512] if data[:8] == b"conectix" else data[-512:]


def _flatten_chain(files: list[Path], size: int) -> bytes:
    """Flatten a chain (leaf first) by the book: BAT sector numbers, MSB-first bitmaps, base = zeros."""
    layers: list[tuple[int, bytes, tuple[int, ...] | None, int]] = []
    for path in files:
        data = path.read_bytes()
        foot = _footer(path)
        disk_type = struct.unpack_from(">I", foot, 60)[0]
        if disk_type == 2:
            layers.append((disk_type, data, None, 0))
            continue
        hdr_at = struct.unpack_from(">Q", foot, 16)[0]
        (table,) = struct.unpack_from(">Q", data, hdr_at + 16)
        entries, block = struct.unpack_from(">II", data, hdr_at + 28)
        layers.append((disk_type, data, struct.unpack_from(f">{entries}I", data, table), block))
    out = bytearray(size)
    for s in range(size // 512):
        for disk_type, data, table_entries, block in layers:
            if table_entries is None:
                out[s * 512 : s * 512 + 512] = data[s * 512 : s * 512 + 512]
                break
            per = block // 512
            entry = table_entries[s // per]
            if entry == 0xFFFFFFFF:
                if disk_type == 4:
                    continue
                break  # dynamic: zeros
            bitmap_at = entry * 512
            i = s % per
            bit = data[bitmap_at + i // 8] & (0x80 >> (i % 8))
            if disk_type == 4 and not bit:
                continue
            data_at = bitmap_at + max(512, -(-per // 8 // 512) * 512) + i * 512
            out[s * 512 : s * 512 + 512] = data[data_at : data_at + 512]
            break
    return bytes(out)


def _patch(path: Path, offset: int, value: bytes, *, fix: bool = True) -> None:
    """Overwrite bytes and, unless told otherwise, re-seal the checksums of every footer and header."""
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    if fix:
        for start in {0, len(data) - 512}:
            if data[start : start + 8] == b"conectix":
                data[start + 64 : start + 68] = struct.pack(">I", vhd_checksum(data[start : start + 512], 64))
        if data[:8] == b"conectix":
            hdr = struct.unpack_from(">Q", data, 16)[0]
            if data[hdr : hdr + 8] == b"cxsparse":
                data[hdr + 36 : hdr + 40] = struct.pack(">I", vhd_checksum(data[hdr : hdr + 1024], 36))
    path.write_bytes(bytes(data))


def _patch_footers(path: Path, offset: int, value: bytes) -> None:
    """Patch a field of the footer (both copies of a dynamic image) and re-seal."""
    size = path.stat().st_size
    starts = [size - 512]
    if path.read_bytes()[:8] == b"conectix":
        starts.append(0)
    for start in starts:
        _patch(path, start + offset, value)


def _random_writes(image: DiskImage, model: bytearray, rng: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        length = rng.choice([1, 100, 511, 512, 513, 4096, 70001, rng.randrange(1, 3 * MiB)])
        if rng.random() < 0.3:  # straddle a 2 MiB block boundary
            boundary = rng.randrange(1, size // (2 * MiB)) * 2 * MiB
            offset = max(0, min(size - length, boundary - rng.randrange(1, length + 1)))
        else:
            offset = rng.randrange(0, size - length)
        data = rng.randbytes(length)
        assert image.write_at(offset, data) == length
        model[offset : offset + length] = data


# -- qemu-made images --------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("force_size", ["off", "on"])
def test_qemu_made_images_read_like_qemu(tmp_path: Path, subformat: str, force_size: str) -> None:
    img = tmp_path / "qemu.vhd"
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat},force_size={force_size}", img, "64M")
    fill_with_pattern(img, "vpc")
    assert detect_format(img) == "vhd"
    with open_image(img) as image:
        assert image.format == "vhd"
        assert isinstance(image, VHDImage)
        assert image.disk_type == subformat
        # qemu rounds 64 MiB up to a whole CHS geometry unless force_size is on
        assert image.size == (64 * MiB if force_size == "on" else 67125248)
    assert_reads_like_qemu(img, "vpc", tmp_path)


def test_qemu_writes_into_a_diskhandler_image(tmp_path: Path) -> None:
    img = tmp_path / "ours.vhd"
    create_image(img, 64 * MiB, block_size=512 * 1024).close()
    fill_with_pattern(img, "vpc")
    assert_reads_like_qemu(img, "vpc", tmp_path)
    assert img.read_bytes()[:512] == img.read_bytes()[-512:]


# -- diskhandler-made images -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"subformat": "fixed"}, {"block_size": 512 * 1024}, {"subformat": "dynamic", "block_size": 4096}],
    ids=["dynamic", "fixed", "dynamic-512k", "dynamic-4k"],
)
def test_diskhandler_writes_read_back_through_qemu(tmp_path: Path, options: dict[str, Any]) -> None:
    size = 24 * MiB + 3 * 512  # not a whole number of blocks
    path = tmp_path / "disk.vhd"
    rng = random.Random(f"vhd-{sorted(options.items())}")
    model = bytearray(size)
    with create_image(path, size, **options) as image:
        _random_writes(image, model, rng, 30)
        image.write_at(size - 3, b"end")
        model[size - 3 :] = b"end"
        image.write_at(2 * MiB - 2, b"\x5a" * 4096)  # across a block boundary
        model[2 * MiB - 2 : 2 * MiB - 2 + 4096] = b"\x5a" * 4096
    # qemu sees the same size (creator 'pyti' with the maximum geometry) and the same bytes
    info = qemu_img("info", "-f", "vpc", path)
    assert f"({size} bytes)" in info
    flat = qemu_flatten(path, "vpc", tmp_path / "flat.raw")
    assert hashlib.sha256(flat.read_bytes()).digest() == hashlib.sha256(model).digest()
    compare_with_raw(path, flat)
    # qemu-io reads our writes (its pattern check fails the test otherwise)
    qemu_io(path, "vpc", ["read -P 0x5a 2097150 4096", f"read -P 0x64 {size - 1} 1"])
    data = path.read_bytes()
    if options.get("subformat") != "fixed":
        assert data[:512] == data[-512:], "the footer copy at offset 0 must equal the trailing footer"
    foot = data[-512:]
    assert foot[28:32] == b"pyti"
    assert struct.unpack_from(">HBB", foot, 56) == (65535, 16, 255)
    assert struct.unpack_from(">Q", foot, 48)[0] == size
    assert vhd_checksum(foot, 64) == struct.unpack_from(">I", foot, 64)[0]


def test_dynamic_allocation_keeps_the_file_valid_after_every_step(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with create_image(path, 8 * MiB) as image:
        for block in (3, 0, 2):
            image.write_at(block * 2 * MiB + 1000, b"x" * 10)
            data = path.read_bytes()
            assert data[-512:] == data[:512]
            with open_image(path) as again:
                assert again.read_at(block * 2 * MiB + 1000, 10) == b"x" * 10
    assert path.stat().st_size == 512 + 1024 + 512 + 3 * (512 + 2 * MiB) + 512


def test_a_block_left_by_a_killed_writer_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(path, 8 * MiB).close()
    data = path.read_bytes()
    # a crashed allocation: junk where the block went, the footer at the new end, no BAT entry
    junk = b"\xee" * (512 + 2 * MiB)
    path.write_bytes(data[:-512] + junk + data[-512:])
    with open_image(path, writable=True) as image:
        assert image.read() == bytes(8 * MiB)
        image.write_at(4 * MiB + 7, b"new")
    with open_image(path) as image:
        expect = bytearray(8 * MiB)
        expect[4 * MiB + 7 : 4 * MiB + 10] = b"new"
        assert image.read() == expect
    assert_reads_like_qemu(path, "vpc", tmp_path)


def test_fixed_image_layout(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    with create_image(path, 3 * MiB, subformat="fixed") as image:
        image.write_at(MiB, b"fixed")
    data = path.read_bytes()
    assert len(data) == 3 * MiB + 512
    assert data[MiB : MiB + 5] == b"fixed"
    assert data[-512:-504] == b"conectix"
    assert struct.unpack_from(">QI", data, 3 * MiB + 16)[0] == 0xFFFFFFFFFFFFFFFF


def test_alias_vpc(tmp_path: Path) -> None:
    with create_image(tmp_path / "a.img", MiB, "vpc") as image:
        assert image.format == "vhd"
    with open_image(tmp_path / "a.img", format="vpc") as image:
        assert image.size == MiB


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"subformat": "sparse"}, ValueError, "subformat"),
        ({"block_size": 3 * MiB}, ValueError, "power of two"),
        ({"block_size": 256}, ValueError, "power of two"),
        ({"cluster_size": 65536}, TypeError, "unknown VHD options"),
    ],
)
def test_create_rejects_bad_options(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        create_image(tmp_path / "x.vhd", 4 * MiB, **kwargs)
    assert not (tmp_path / "x.vhd").exists()


def test_create_rejects_bad_sizes_and_fixed_children(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        create_image(tmp_path / "a.vhd", MiB + 1)
    with pytest.raises(ValueError, match="2040 GiB"):
        create_image(tmp_path / "b.vhd", 2041 << 30)
    create_image(tmp_path / "base.vhd", MiB).close()
    with pytest.raises(ValueError, match="cannot be fixed"):
        create_image(tmp_path / "c.vhd", parent=tmp_path / "base.vhd", subformat="fixed")
    with pytest.raises(ValueError, match="needs parent"):
        create_image(tmp_path / "d.vhd", MiB, subformat="differencing")


def test_differencing_blocks_too_small_for_a_bitmap_are_refused(tmp_path: Path) -> None:
    # The bitmap takes block_size / 512 / 8 bytes rounded down to sectors (qemu and VirtualBox agree):
    # none at all below 4 KiB, so a child could not say which sectors it holds.
    base = tmp_path / "base.vhd"
    create_image(base, 64 * 1024, block_size=2048).close()
    with pytest.raises(ValueError, match="at least 4 KiB"):
        create_image(tmp_path / "small.vhd", parent=base, block_size=2048)
    assert not (tmp_path / "small.vhd").exists()
    child = tmp_path / "child.vhd"
    with create_image(child, parent=base, block_size=4096) as image:
        image.write_at(0, b"x" * 100)
    _patch(child, 512 + 28, struct.pack(">II", 32, 2048))  # max table entries, block size
    with pytest.raises(UnsupportedImageError, match="at least 4 KiB") as excinfo:
        open_image(child)
    assert excinfo.value.field == "dynamic header block size"


# -- differencing chains ------------------------------------------------------------------------------


@pytest.mark.parametrize("base_maker", ["diskhandler", "qemu"])
def test_three_level_chain_against_model(tmp_path: Path, base_maker: str) -> None:
    size = 20 * MiB
    rng = random.Random(f"chain-{base_maker}")
    base = tmp_path / "base.vhd"
    if base_maker == "qemu":
        qemu_img("create", "-f", "vpc", "-o", "force_size=on", base, str(size))
        qemu_io(base, "vpc", ["write -P 0x11 0 3M", "write -P 0x22 5M 100k", "write -P 0x33 19M 1M"])
        model = bytearray(qemu_flatten(base, "vpc", tmp_path / "base.raw").read_bytes())
    else:
        model = bytearray(size)
        with create_image(base, size) as image:
            _random_writes(image, model, rng, 12)
    models = [bytes(model)]
    files = [base]
    for level in (1, 2, 3):
        child = tmp_path / f"level{level}.vhd"
        digests = [_sha(f) for f in files]
        with create_image(child, parent=files[-1]) as image:
            assert isinstance(image, VHDImage)
            assert image.disk_type == "differencing"
            assert image.size == size
            assert image.chain == (child, *reversed(files))
            assert image.read_at(0, size) == model, "a new child reads as its parent"
            _random_writes(image, model, rng, 12)
            image.write_at(777, b"!")  # a one-byte write: the rest of its sector comes from the parent
            model[777] = ord("!")
            assert image.read() == model
        assert [_sha(f) for f in files] == digests, "writing the leaf changed a parent"
        files.append(child)
        models.append(bytes(model))
    # the independent parser agrees on the whole chain
    assert _flatten_chain(list(reversed(files)), size) == models[-1]
    for level, path in enumerate(files):
        with open_image(path) as image:
            assert image.chain == tuple(reversed(files[: level + 1]))
            assert not any(p.writable() for p in image.iter_chain() if p is not image)
            assert image.read() == models[level], f"level {level} reads wrong"
            for _ in range(20):  # unaligned reads across block and bitmap-run boundaries
                length = rng.randrange(1, 3 * MiB)
                offset = rng.randrange(0, size - length)
                assert image.read_at(offset, length) == models[level][offset : offset + length]


def test_child_sets_only_the_bits_of_written_sectors(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    with create_image(base, 4 * MiB) as image:
        image.write_at(0, b"\xaa" * 4 * MiB)
    child = tmp_path / "child.vhd"
    with create_image(child, parent=base) as image:
        image.write_at(512 * 9 + 100, b"\x01" * 600)  # touches sectors 9 and 10, partially
        image.write_at(2 * MiB, b"\x02" * 512)  # sector 0 of block 1, whole
    data = child.read_bytes()
    table = struct.unpack_from(">Q", data, 512 + 16)[0]
    bat = struct.unpack_from(">2I", data, table)
    first = data[bat[0] * 512 : bat[0] * 512 + 512]
    assert first[1] == 0b0110_0000  # MSB first: sectors 9 and 10
    assert first.count(0) == 511
    second = data[bat[1] * 512 : bat[1] * 512 + 512]
    assert second[0] == 0x80
    assert second.count(0) == 511
    with open_image(child) as image:
        sector9 = image.read_at(512 * 9, 1024)
    assert sector9 == b"\xaa" * 100 + b"\x01" * 600 + b"\xaa" * 324


def test_reading_a_fragmented_child_keeps_its_caches_bounded(tmp_path: Path) -> None:
    from diskhandler.formats import vhd

    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    block, blocks = 65536, 600
    with create_image(base, block * blocks, block_size=block) as image:
        image.write_at(0, b"\x11" * block * blocks)
    with create_image(child, parent=base, block_size=block) as image:
        for index in range(blocks):
            image.write_at(index * block, b"\x22" * 512)
        bat = list(image._bat or [])
    with child.open("r+b") as f:  # every other sector in the child: 128 runs per block
        for sector in bat:
            f.seek(sector * 512)
            f.write(b"\xaa" * 16)
    one = bytearray(b"\x11" * block)
    for s in range(0, 128, 2):
        one[s * 512 : s * 512 + 512] = bytes(512)
    one[:512] = b"\x22" * 512
    with open_image(child) as image:
        assert isinstance(image, VHDImage)
        for index in range(blocks):
            assert image.read_at(index * block, block) == one
        cached = sum(len(runs) for runs in image._runs.values())
        assert cached <= vhd._RUNS_CACHE_LIMIT < 128 * blocks


def test_child_records_its_parent_as_windows_does(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_image(base, 4 * MiB).close()
    child = tmp_path / "child.vhd"
    create_image(child, parent=base).close()
    data = child.read_bytes()
    hdr = data[512:1536]
    assert hdr[40:56] == _footer(base)[68:84]  # parent unique id, raw bytes
    assert hdr[64:576].rstrip(b"\0").decode("utf-16-be").rstrip("\0") == "base.vhd"
    locators = {}
    for i in range(8):
        code, _space, length, _res, offset = struct.unpack_from(">4sIIIQ", hdr, 576 + 24 * i)
        if code != bytes(4):
            locators[code] = data[offset : offset + length].decode("utf-16-le")
    assert locators == {b"W2ru": ".\\base.vhd", b"W2ku": str(base.resolve())}
    assert struct.unpack_from(">I", data[-512:], 60)[0] == 4
    assert data[:512] == data[-512:]


def test_parent_found_after_the_pair_moves_and_by_name(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    base = tmp_path / "a" / "base.vhd"
    with create_image(base, 4 * MiB) as image:
        image.write_at(0, b"base")
    create_image(tmp_path / "a" / "child.vhd", parent=base).close()
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)  # absolute locator now stale: the relative one works
    with open_image(moved / "child.vhd") as image:
        assert image.chain == (moved / "child.vhd", moved / "base.vhd")
        assert image.read(4) == b"base"


def test_missing_parent(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_image(base, 4 * MiB).close()
    create_image(tmp_path / "child.vhd", parent=base).close()
    base.unlink()
    with pytest.raises(ChainError, match="not found") as excinfo:
        open_image(tmp_path / "child.vhd")
    assert excinfo.value.field == "parent locator"
    assert excinfo.value.path == tmp_path / "child.vhd"


def test_damaged_parent_is_named_not_called_missing(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_image(base, 4 * MiB).close()
    create_image(child, parent=base).close()
    _patch_footers(base, 0, b"CONECTIX")
    with pytest.raises(ChainError, match=r"could not be read.*base\.vhd: footer cookie") as excinfo:
        open_image(child)
    assert excinfo.value.field == "parent locator"


def test_replaced_parent_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_image(base, 4 * MiB).close()
    create_image(tmp_path / "child.vhd", parent=base).close()
    base.unlink()
    create_image(base, 4 * MiB).close()  # same name, another unique id
    with pytest.raises(ChainError, match="unique id") as excinfo:
        open_image(tmp_path / "child.vhd")
    assert excinfo.value.field == "parent unique id"


def test_cyclic_parents(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    create_image(base, 4 * MiB).close()
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    create_image(a, parent=base).close()
    create_image(b, parent=a).close()
    # point a at b: its parent unique id and name; its locators name base, whose id no longer matches
    _patch(a, 512 + 40, _footer(b)[68:84])
    _patch(a, 512 + 64, "b.vhd".encode("utf-16-be") + bytes(512 - 10))
    with pytest.raises(ChainError, match="loops") as excinfo:
        open_image(b)
    assert excinfo.value.field == "parent"


# -- sizes, footers, flags -----------------------------------------------------------------------------


def _qemu_fixed(tmp_path: Path, size: str = "10M") -> Path:
    path = tmp_path / "fixed.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed,force_size=on", path, size)
    qemu_io(path, "vpc", ["write -P 0x42 0 64k", "write -P 0x43 9M 1M"])
    return path


def test_size_from_current_size_for_windows_images(tmp_path: Path) -> None:
    path = _qemu_fixed(tmp_path)
    end = path.stat().st_size - 512
    _patch(path, end + 28, b"win ")
    _patch(path, end + 56, struct.pack(">HBB", 301, 4, 17))  # 10,479,616 bytes < 10 MiB, as Windows does
    with open_image(path) as image:  # no warning: rounding down is what CHS always does
        assert image.size == 10 * MiB
    assert_reads_like_qemu(path, "vpc", tmp_path)


def test_size_from_chs_for_virtual_pc_images_with_a_warning(tmp_path: Path) -> None:
    path = _qemu_fixed(tmp_path)
    end = path.stat().st_size - 512
    _patch(path, end + 28, b"vpc ")
    _patch(path, end + 56, struct.pack(">HBB", 301, 4, 17))
    with pytest.warns(ImageWarning, match="sizes disks by CHS geometry"), open_image(path) as image:
        assert image.size == 301 * 4 * 17 * 512
    with pytest.warns(ImageWarning):
        assert_reads_like_qemu(path, "vpc", tmp_path)  # qemu also uses CHS for 'vpc '


def test_other_creators_use_the_current_size(tmp_path: Path) -> None:
    path = _qemu_fixed(tmp_path)
    end = path.stat().st_size - 512
    _patch(path, end + 28, b"vbox")  # VirtualBox sizes by current size; qemu 7.2 would use CHS here
    _patch(path, end + 56, struct.pack(">HBB", 301, 4, 17))
    with open_image(path) as image:
        assert image.size == 10 * MiB


def test_old_virtual_pc_511_byte_footer(tmp_path: Path) -> None:
    path = tmp_path / "vpc.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", path, "10M")  # creator 'qemu', CHS size
    qemu_io(path, "vpc", ["write -P 0x61 0 1M", "write -P 0x62 9M 1M"])
    _patch(path, path.stat().st_size - 512 + 28, b"vpc ")
    flat = qemu_flatten(path, "vpc", tmp_path / "flat.raw")
    data = path.read_bytes()
    assert data[-1] == 0
    path.write_bytes(data[:-1])  # Virtual PC before 2004 wrote 511 bytes: the last (reserved) one is missing
    assert detect_format(path) == "vhd"
    compare_with_raw(path, flat)
    with open_image(path, writable=True) as image:
        image.write_at(image.size - 5, b"tail!")
    assert path.read_bytes()[-516:-511] == b"tail!"


def test_stale_checksum_opens_read_only_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with create_image(path, 4 * MiB) as image:
        image.write_at(0, b"data")
    _patch_footers(
        path,
        40,
        struct.pack(">Q", 4 * MiB + 1),
    )  # a hand edit: original size
    _patch(path, 64, b"\0\0\0\0", fix=False)  # ...and a stale checksum in the copy that is read
    with pytest.warns(ImageWarning, match="footer checksum is stale"):
        image = open_image(path)
    with image:
        assert not image.writable()
        assert image.read(4) == b"data"
    with pytest.raises(ReadOnlyImageError, match="stale"):
        open_image(path, writable=True)


def test_saved_state_refuses_writing(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(path, 4 * MiB).close()
    _patch_footers(path, 84, b"\x01")
    with open_image(path) as image:
        assert isinstance(image, VHDImage)
        assert image.footer.saved_state == 1
    with pytest.raises(ImageInUseError, match="saved"):
        open_image(path, writable=True)


# -- damaged input -----------------------------------------------------------------------------------


def _small_dynamic(tmp_path: Path) -> Path:
    path = tmp_path / "small.vhd"
    with create_image(path, 6 * MiB) as image:
        image.write_at(2 * MiB - 10, b"z" * 20)
    return path


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [
        (0, b"notavhd!", "footer cookie"),  # both copies: see below
        (512, b"cxsparsX", "dynamic header cookie"),
        (16, struct.pack(">Q", 1 << 40), "footer data offset"),
        (512 + 32, struct.pack(">I", 3 * MiB), "dynamic header block size"),
        (512 + 32, struct.pack(">I", 1 << 31), "dynamic header block size"),
        (512 + 28, struct.pack(">I", 1), "dynamic header max table entries"),
        (512 + 16, struct.pack(">Q", 1 << 50), "dynamic header table offset"),
        (1536, struct.pack(">I", 0x7FFFFFF), "BAT entry 0"),
        (1540, struct.pack(">I", 2), "BAT entry 1"),  # a block on top of the header
        (48, struct.pack(">Q", 1 << 62), "current size"),
        (60, struct.pack(">I", 5), "footer disk type"),
        (12, struct.pack(">I", 0x00020000), "footer format version"),
    ],
)
def test_damaged_headers(tmp_path: Path, offset: int, value: bytes, field: str) -> None:
    path = _small_dynamic(tmp_path)
    if offset < 512:  # footer fields live in both copies
        _patch_footers(path, offset, value)
    else:
        _patch(path, offset, value)
    with pytest.raises(ImageFormatError) as excinfo:
        open_image(path, format="vhd")
    assert excinfo.value.field == field
    assert str(path) in str(excinfo.value)
    if field in ("footer disk type", "footer format version"):
        assert isinstance(excinfo.value, UnsupportedImageError)


@pytest.mark.parametrize("keep", [0, 100, 511, 1000, 1600, 2048 + 4096])
def test_truncated_files(tmp_path: Path, keep: int) -> None:
    path = _small_dynamic(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)  # "trailing footer missing" comes first
        with pytest.raises(ImageFormatError) as excinfo:
            open_image(path, format="vhd")
    assert str(path) in str(excinfo.value)


def test_missing_trailing_footer_warns(tmp_path: Path) -> None:
    path = _small_dynamic(tmp_path)
    path.write_bytes(path.read_bytes()[:-512])
    with pytest.warns(ImageWarning, match="trailing footer is missing"), open_image(path) as image:
        assert image.read_at(2 * MiB - 10, 20) == b"z" * 20


def _fuzz_open(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageWarning)
        try:
            with open_image(path, format="vhd") as image:
                image.read_at(0, 64 * 1024)
                image.read_at(max(0, image.size - 4096), 4096)
        except ImageFormatError:
            pass


@settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2047 + 512), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=8,
    ),
    reseal=st.booleans(),
)
def test_fuzz_header_mutations(tmp_path: Path, mutations: list[tuple[int, int]], reseal: bool) -> None:
    src = tmp_path / "fuzz-src.vhd"
    if not src.exists():
        base = tmp_path / "fuzz-base.vhd"
        with create_image(base, 4 * MiB) as image:
            image.write_at(MiB, b"b" * 4096)
        with create_image(src, parent=base) as image:
            image.write_at(MiB + 100, b"c" * 1000)
    data = bytearray(src.read_bytes())
    for where, byte in mutations:
        at = where if where < 2048 else len(data) - 512 + (where - 2048)
        data[at] = byte
    path = tmp_path / "fuzz.vhd"
    path.write_bytes(bytes(data))
    if reseal:
        _patch(path, 0, bytes(data[:1]))
    _fuzz_open(path)


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.binary(min_size=0, max_size=3000), cookie_at=st.sampled_from([None, "head", "tail"]))
def test_fuzz_random_data(tmp_path: Path, noise: bytes, cookie_at: str | None) -> None:
    data = bytearray(noise)
    if cookie_at == "head":
        data[:8] = b"conectix"
    elif cookie_at == "tail" and len(data) >= 512:
        data[-512:-504] = b"conectix"
    path = tmp_path / "noise.vhd"
    path.write_bytes(bytes(data))
    _fuzz_open(path)


# -- real images made by other tools -------------------------------------------------------------------


@needs_real_images
def test_real_ext2_vhd_reads_like_qemu(tmp_path: Path) -> None:
    path = DFVFS / "ext2.vhd"
    with open_image(path) as image:
        assert image.size == 4212736  # CHS 121/4/17 and the current size agree
        assert image.read_at(1024 + 56, 2) == b"\x53\xef"  # the ext2 superblock magic
    assert_reads_like_qemu(path, "vpc", tmp_path)


@needs_real_images
def test_real_hand_edited_differencing_pair(tmp_path: Path) -> None:
    child, parent = DFVFS / "image-differential.vhd", DFVFS / "image.vhd"
    with pytest.warns(ImageWarning, match="stale") as record:
        image = open_image(child)
    with image:
        assert image.chain == (child, parent)
        assert not image.writable()
        data = image.read()
    warned = {str(w.message).split(":")[0] for w in record}
    assert warned == {str(child), str(parent)}
    assert data == _flatten_chain([child, parent], 104448)
    with pytest.raises(ReadOnlyImageError, match="stale"):
        open_image(child, writable=True)


def test_unique_id_is_a_uuid(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    create_image(a, MiB).close()
    create_image(b, MiB).close()
    ua, ub = uuid.UUID(bytes=_footer(a)[68:84]), uuid.UUID(bytes=_footer(b)[68:84])
    assert ua != ub
    assert ua.version == 4


def test_writing_a_block_another_tool_allocated_sets_its_bitmap_bits(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with create_image(path, 4 * MiB) as image:
        image.write_at(0, b"a" * 512)
    data = path.read_bytes()
    bitmap_at = struct.unpack_from(">I", data, 1536)[0] * 512
    _patch(path, bitmap_at, bytes(512))  # as Windows leaves it: no sector marked used yet
    with open_image(path, writable=True) as image:
        image.write_at(512 * 17 + 3, b"b" * 10)
    bitmap = path.read_bytes()[bitmap_at : bitmap_at + 512]
    assert bitmap[2] == 0x40  # sector 17, MSB first
    assert bitmap.count(0) == 511


@settings(deadline=None, max_examples=200)
@given(bitmap=st.binary(min_size=4, max_size=4), sectors=st.integers(min_value=1, max_value=32))
def test_bitmap_runs_match_the_bits(bitmap: bytes, sectors: int) -> None:
    runs = _bitmap_runs(bitmap, sectors)
    bits = [bool(bitmap[s // 8] & (0x80 >> (s % 8))) for s in range(sectors)]
    assert runs[0][0] == 0
    assert runs[-1][1] == sectors
    for (_, end, before), (start, _, after) in itertools.pairwise(runs):
        assert end == start
        assert before != after
    for first, last, present in runs:
        assert bits[first:last] == [present] * (last - first)


def _windows_style_child(parent: Path, child: Path, parent_windows_path: str) -> None:
    """A differencing child laid out as Windows 10 writes one (dfvfs's fat-differential.vhd): BAT at
    0x2000, block data 4 KiB-aligned, locators with their space in bytes, full path in the name field."""
    pfoot = _footer(parent)
    size = struct.unpack_from(">Q", pfoot, 48)[0]
    block = 2 * MiB
    entries = -(-size // block)
    w2ku = parent_windows_path.encode("utf-16-le")
    w2ru = (".\\" + parent_windows_path.rsplit("\\", 1)[-1]).encode("utf-16-le")
    out = bytearray(0x2000 + _round(entries * 4, 4096))
    out[0x2000 : 0x2000 + entries * 4] = b"\xff" * (entries * 4)
    w2ku_at = len(out)
    out += w2ku + bytes(4096 - len(w2ku))
    w2ru_at = len(out)
    out += w2ru + bytes(65536 - len(w2ru))
    out += bytes(4096 - 512)  # the first block's bitmap ends on a 4 KiB boundary
    bitmap_at = len(out)
    bitmap = bytearray(512)
    bitmap[0] = 0b0010_0000  # sector 2 only
    out += bitmap + bytes(block)
    out[bitmap_at + 512 + 1024 : bitmap_at + 512 + 1536] = b"W" * 512
    struct.pack_into(">I", out, 0x2000, bitmap_at // 512)
    foot = bytearray(pfoot)
    foot[28:32] = b"win "
    struct.pack_into(">I", foot, 60, 4)
    foot[68:84] = uuid.uuid4().bytes
    struct.pack_into(">I", foot, 64, vhd_checksum(foot, 64))
    hdr = bytearray(1024)
    struct.pack_into(">8sQQIII", hdr, 0, b"cxsparse", 2**64 - 1, 0x2000, 0x10000, entries, block)
    hdr[40:56] = pfoot[68:84]
    name = parent_windows_path.encode("utf-16-be")
    hdr[64 : 64 + len(name)] = name
    struct.pack_into(">4sIIIQ", hdr, 576, b"W2ku", 4096, len(w2ku), 0, w2ku_at)
    struct.pack_into(">4sIIIQ", hdr, 600, b"W2ru", 65536, len(w2ru), 0, w2ru_at)
    struct.pack_into(">I", hdr, 36, vhd_checksum(hdr, 36))
    out[0:512] = foot
    out[512:1536] = hdr
    out += foot
    child.write_bytes(bytes(out))


def _round(value: int, to: int) -> int:
    return -(-value // to) * to


def test_windows_made_differencing_layout(tmp_path: Path) -> None:
    parent = tmp_path / "fat-parent.vhd"
    with create_image(parent, 4 * MiB) as image:
        image.write_at(0, b"P" * 4096)
    child = tmp_path / "fat-differential.vhd"
    _windows_style_child(parent, child, "C:\\Users\\someone\\Desktop\\fat-parent.vhd")
    expect = bytearray(b"P" * 4096 + bytes(4 * MiB - 4096))
    expect[1024:1536] = b"W" * 512
    with open_image(child) as image:
        assert image.chain == (child, parent)
        assert image.read() == expect
    assert _flatten_chain([child, parent], 4 * MiB) == expect
    # writing: a one-byte write completes its sector from the parent, a new block goes after the last
    with open_image(child, writable=True) as image:
        image.write_at(5, b"!")
        image.write_at(3 * MiB, b"N" * 600)
    expect[5] = ord("!")
    expect[3 * MiB : 3 * MiB + 600] = b"N" * 600
    with open_image(child) as image:
        assert image.read() == expect
    assert _flatten_chain([child, parent], 4 * MiB) == expect
    data = child.read_bytes()
    assert data[:512] == data[-512:]


def test_qemu_reads_the_sectors_a_child_holds(tmp_path: Path) -> None:
    """qemu ignores a differencing VHD's parent, but it must still parse our child's own blocks."""
    base = tmp_path / "base.vhd"
    with create_image(base, 8 * MiB) as image:
        image.write_at(0, b"\x11" * 8 * MiB)
    child = tmp_path / "child.vhd"
    with create_image(child, parent=base) as image:
        image.write_at(4096, b"\x22" * 8192)
        image.write_at(5 * MiB, b"\x33" * 512)
    qemu_io(child, "vpc", ["read -P 0x22 4096 8192", f"read -P 0x33 {5 * MiB} 512"])


def _allocating_workload(path: Path) -> None:
    with open_image(path, writable=True) as image:
        image.write_at(2 * MiB + 5, b"\x22" * 100)  # a new block
        image.write_at(0, b"\x12" * 10)  # in place
        image.write_at(4 * MiB, b"\x33" * MiB)  # half of a new block
        image.write_at(6 * MiB - 7, b"\x44" * 14)  # into the block at 6 MiB


def test_power_cut_at_any_write_leaves_no_stale_data_for_the_next_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = tmp_path / "seed.vhd"
    with create_image(seed, 8 * MiB) as image:
        image.write_at(0, b"\x11" * MiB)

    def check(work: Path, when: str) -> None:
        with open_image(work) as image:
            survivors = bytearray(image.read_at(0, 8 * MiB))
        assert survivors[MiB - 10 : MiB] == b"\x11" * 10, when
        # qemu puts its next block right after the last one the BAT references and writes only the
        # sectors it was given: whatever an interrupted allocation left there must read as zeros
        qemu_io(work, "vpc", ["write -P 0x55 7M 4k"])
        survivors[7 * MiB : 7 * MiB + 4096] = b"\x55" * 4096
        with open_image(work) as image:
            assert image.read_at(0, 8 * MiB) == survivors, when

    power_cut_at_every_write(
        monkeypatch, seed, tmp_path / "work.vhd", _allocating_workload, check, min_writes=12
    )


def test_power_cut_in_a_child_leaves_the_parent_showing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.vhd"
    with create_image(base, 8 * MiB) as image:
        image.write_at(0, b"\x11" * 8 * MiB)
    seed = tmp_path / "seed.vhd"
    create_image(seed, parent=base).close()

    def check(work: Path, when: str) -> None:
        with open_image(work) as image:
            got = image.read_at(0, 8 * MiB)
        for start, data in [(0, b"\x12" * 10), (2 * MiB + 5, b"\x22" * 100), (4 * MiB, b"\x33" * MiB)]:
            part = got[start : start + len(data)]
            assert part in (data, b"\x11" * len(data)), when  # old or new, never anything else
        rest = got[10 : 2 * MiB + 5] + got[2 * MiB + 105 : 4 * MiB] + got[5 * MiB : 6 * MiB - 7]
        assert rest == b"\x11" * len(rest), when

    power_cut_at_every_write(
        monkeypatch, seed, tmp_path / "work.vhd", _allocating_workload, check, min_writes=12
    )
