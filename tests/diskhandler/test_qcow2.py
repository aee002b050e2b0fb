"""qcow2: every variant qemu-img makes reads like qemu; diskhandler's writes pass ``qemu-img check``.

Images are built by qemu-img/qemu-io in each test (pattern writes, zeroed ranges and holes), flattened
with ``qemu-img convert -O raw`` and compared byte for byte with what diskhandler reads. Writes go
through diskhandler at random unaligned offsets, against a bytearray model, then ``qemu-img check`` must
report no error and no leak and ``qemu-img convert`` must read back the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import (
    ChainError,
    DiskImage,
    ImageFormatError,
    MissingDependencyError,
    UnsupportedImageError,
    create_image,
    open_image,
)
from diskhandler.errors import SnapshotNotFoundError
from diskhandler.formats.qcow2 import QCOW2Image
from tests.diskhandler.imagetools import (
    REAL_IMAGES,
    assert_reads_like_qemu,
    compare_with_raw,
    fill_with_pattern,
    qemu_check,
    qemu_flatten,
    qemu_img,
    qemu_io,
    run,
)
from tests.diskhandler.imagetools import PowerCut as _PowerCut
from tests.diskhandler.imagetools import patch_file as _patch
from tests.diskhandler.imagetools import read_field as _header_field
from tests.diskhandler.imagetools import sha256_of_file as _sha

MiB = 1 << 20
SIZE = 64 * MiB

# Every kind of image `qemu-img create -f qcow2` makes: (id, -o options).
QEMU_VARIANTS = [
    ("v2-compat-0.10", "compat=0.10"),
    ("v3-default", ""),
    ("cluster-512", "cluster_size=512"),
    ("cluster-4k", "cluster_size=4k"),
    ("cluster-64k", "cluster_size=64k"),
    ("cluster-2M", "cluster_size=2M"),
    ("extended-l2-128k", "extended_l2=on,cluster_size=128k"),
    ("preallocation-metadata", "preallocation=metadata"),
    ("lazy-refcounts", "lazy_refcounts=on"),
    ("refcount-bits-1", "refcount_bits=1"),
    ("refcount-bits-64", "refcount_bits=64"),
]


def _qemu_create(path: Path, options: str = "", size: int = SIZE, *backing: str) -> Path:
    argv: list[str | Path] = ["create", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    argv += [*backing, path]
    if not backing:
        argv.append(str(size))
    qemu_img(*argv)
    return path


def _model_of(path: Path, tmp_path: Path, fmt: str = "qcow2") -> bytearray:
    flat = qemu_flatten(path, fmt, tmp_path / f"{path.name}.model")
    data = bytearray(flat.read_bytes())
    flat.unlink()
    return data


def _random_writes(image: DiskImage, model: bytearray, rng: random.Random, count: int) -> None:
    """Writes of awkward lengths at unaligned offsets, mirrored in ``model``."""
    for _ in range(count):
        length = rng.choice([1, 511, 513, 4096, 65537, 300_000, rng.randrange(1, 3 * MiB)])
        offset = rng.randrange(0, len(model) - length)
        data = rng.randbytes(length)
        image.write_at(offset, data)
        model[offset : offset + length] = data


def _assert_qemu_agrees(path: Path, model: bytearray, tmp_path: Path) -> None:
    qemu_check(path, "qcow2")
    flat = qemu_flatten(path, "qcow2", tmp_path / "after.raw")
    assert flat.read_bytes() == model, "qemu reads diskhandler's writes differently"
    compare_with_raw(path, flat)
    flat.unlink()


# -- images made by qemu ------------------------------------------------------------------------


@pytest.mark.parametrize("options", [pytest.param(o, id=i) for i, o in QEMU_VARIANTS])
def test_qemu_variant_reads_like_qemu_and_takes_writes(tmp_path: Path, options: str) -> None:
    path = _qemu_create(tmp_path / "disk.qcow2", options)
    fill_with_pattern(path, "qcow2")
    assert_reads_like_qemu(path, "qcow2", tmp_path)

    model = _model_of(path, tmp_path)
    rng = random.Random(f"qcow2-{options}")
    with open_image(path, writable=True) as image:
        assert isinstance(image, QCOW2Image)
        _random_writes(image, model, rng, 25)
        image.write_at(9 * MiB + 100, b"\xab" * 1000)  # into the zeroed range left by qemu-io
        model[9 * MiB + 100 : 9 * MiB + 1100] = b"\xab" * 1000
        assert image.read_at(0, SIZE) == model
    _assert_qemu_agrees(path, model, tmp_path)
    # qemu-io reads diskhandler's bytes, pattern by pattern.
    qemu_io(path, "qcow2", ["read -P 0xab 9437284 1000"])


def test_qemu_io_reads_pattern_written_by_diskhandler(tmp_path: Path) -> None:
    path = tmp_path / "made.qcow2"
    with create_image(path, SIZE) as image:
        image.write_at(3 * MiB - 700, b"\x5a" * 70_000)  # unaligned, across cluster boundaries
        image.write_at(SIZE - 5, b"\x77" * 5)
    qemu_check(path, "qcow2")
    qemu_io(path, "qcow2", ["read -P 0x5a 3145028 70000", "read -P 0x77 67108859 5", "read -P 0 0 1M"])


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_images_read_and_write(tmp_path: Path, compression: str) -> None:
    raw = tmp_path / "pattern.raw"
    qemu_img("create", "-f", "raw", raw, str(SIZE))
    fill_with_pattern(raw, "raw")
    path = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}", raw, path)
    info = json.loads(qemu_img("info", "--output=json", path))
    assert info["format-specific"]["data"]["compression-type"] == compression
    assert_reads_like_qemu(path, "qcow2", tmp_path)

    model = bytearray(raw.read_bytes())
    rng = random.Random(f"compressed-{compression}")
    with open_image(path, writable=True) as image:
        image.write_at(100, b"\x01\x02\x03")  # inside the first compressed cluster
        model[100:103] = b"\x01\x02\x03"
        image.write_at(MiB + 65530, b"\xee" * 20)  # across two compressed clusters
        model[MiB + 65530 : MiB + 65550] = b"\xee" * 20
        image.write_at(MiB + 2 * 65536, bytes(65536))  # a whole compressed cluster of zeros
        model[MiB + 2 * 65536 : MiB + 3 * 65536] = bytes(65536)
        _random_writes(image, model, rng, 15)
    _assert_qemu_agrees(path, model, tmp_path)


def test_compressed_clusters_in_a_snapshotted_image(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    _qemu_create(path)
    qemu_io(path, "qcow2", ["write -c -P 0x21 0 64k", "write -c -P 0x22 64k 64k", "write -P 0x23 1M 64k"])
    qemu_img("snapshot", "-c", "before", path)
    model = _model_of(path, tmp_path)
    with open_image(path, writable=True) as image:
        image.write_at(10, b"new")
        image.write_at(MiB + 10, b"new")
        model[10:13] = model[MiB + 10 : MiB + 13] = b"new"
    _assert_qemu_agrees(path, model, tmp_path)
    with open_image(path) as image:
        assert isinstance(image, QCOW2Image)
        with image.open_snapshot("before") as old:
            assert old.read_at(0, 3) == b"\x21" * 3
            assert old.read_at(MiB, 3) == b"\x23" * 3


def test_zstd_without_the_module_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _qemu_create(tmp_path / "z.qcow2", "compression_type=zstd")
    qemu_io(path, "qcow2", ["write -c -P 0x42 0 64k", "write -P 0x43 64k 64k"])
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    with open_image(path) as image:
        assert image.read_at(65536, 4) == b"\x43" * 4  # uncompressed clusters still read
        with pytest.raises(MissingDependencyError, match=r"pip install zstandard.*pyti\[zstd\]"):
            image.read_at(0, 4)


# -- backing chains -----------------------------------------------------------------------------


def test_three_deep_qcow2_chain(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.qcow2")
    fill_with_pattern(base, "qcow2")
    mid = _qemu_create(tmp_path / "mid.qcow2", "", SIZE, "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(mid, "qcow2", ["write -P 0x71 100k 300k", "write -z 1M 4k"])
    top = _qemu_create(tmp_path / "top.qcow2", "", SIZE, "-b", "mid.qcow2", "-F", "qcow2")
    qemu_io(top, "qcow2", ["write -P 0x72 200k 5000", "write -P 0x73 8M 1k"])
    assert_reads_like_qemu(top, "qcow2", tmp_path)
    with open_image(top) as image:
        assert image.chain == (top, mid, base)

    base_digest, mid_digest = _sha(base), _sha(mid)
    model = _model_of(top, tmp_path)
    with open_image(top, writable=True) as image:
        _random_writes(image, model, random.Random("chain"), 20)
        image.write_at(1 * MiB + 4000, b"\x99" * 200)  # partial write into a cluster of the backing file
        model[MiB + 4000 : MiB + 4200] = b"\x99" * 200
    _assert_qemu_agrees(top, model, tmp_path)
    assert _sha(base) == base_digest, "writing the overlay changed the base"
    assert _sha(mid) == mid_digest, "writing the overlay changed its backing file"


def test_raw_base_and_relative_paths_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    base = images / "base.raw"
    qemu_img("create", "-f", "raw", base, str(SIZE))
    fill_with_pattern(base, "raw")
    monkeypatch.chdir(images)
    qemu_img("create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", "sub/mid.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "sub/top.qcow2")
    qemu_io(Path("sub/top.qcow2"), "qcow2", ["write -P 0x61 4M 10k"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    top = images / "sub" / "top.qcow2"
    assert_reads_like_qemu(top, "qcow2", tmp_path)
    with open_image(top) as image:
        assert [p.name for p in image.chain] == ["top.qcow2", "mid.qcow2", "base.raw"]
        assert image.parent is not None
        assert image.parent.parent is not None
        assert image.parent.parent.format == "raw"


def test_backing_file_without_format_is_probed(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.qcow2")
    qemu_io(base, "qcow2", ["write -P 0x31 0 64k"])
    top = tmp_path / "top.qcow2"
    with create_image(top, parent=base) as image:
        assert image.read_at(0, 2) == b"\x31\x31"
    # Turn the backing format extension into an unknown (ignored) one, as in images from old qemu
    # versions that wrote none: qemu then probes too.
    header = top.read_bytes()[:4096]
    at = header.index(struct.pack(">I", 0xE2792ACA))
    _patch(top, at, struct.pack(">I", 0x0BADF00D))
    info = json.loads(qemu_img("info", "--output=json", top))
    assert "backing-filename-format" not in info
    with open_image(top) as image:
        assert image.parent is not None
        assert image.parent.format == "qcow2"
        assert image.read_at(0, 2) == b"\x31\x31"


def test_created_overlay_stores_relative_name_and_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    base = tmp_path / "a" / "base.raw"
    base.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    top = tmp_path / "b" / "top.qcow2"
    monkeypatch.chdir(tmp_path)  # both paths relative to the current directory, one through a symlink
    with create_image(Path("link/top.qcow2"), parent=Path("a/base.raw")) as image:
        assert image.size == MiB
        assert image.read_at(256, 4) == bytes(range(4))
        image.write_at(1000, b"xyz")
    info = json.loads(qemu_img("info", "--output=json", top))
    assert info["backing-filename"] == "../a/base.raw"
    assert info["backing-filename-format"] == "raw"
    qemu_check(top, "qcow2")
    expect = bytearray(base.read_bytes())
    expect[1000:1003] = b"xyz"
    assert qemu_flatten(top, "qcow2", tmp_path / "flat").read_bytes() == expect


def test_missing_and_cyclic_backing_files(tmp_path: Path) -> None:
    a = _qemu_create(tmp_path / "a.qcow2")
    b = _qemu_create(tmp_path / "b.qcow2", "", SIZE, "-b", "a.qcow2", "-F", "qcow2")
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", a)  # a -> b -> a
    with pytest.raises(ChainError, match="loops"):
        open_image(a)
    c = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", c, "1M")
    with pytest.raises(ChainError, match=r"gone\.qcow2") as excinfo:
        open_image(c)
    assert excinfo.value.path == c
    assert b.exists()


# -- internal snapshots -------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["", "compat=0.10", "extended_l2=on,cluster_size=64k"])
def test_internal_snapshots_read_by_name_and_cow_on_write(tmp_path: Path, options: str) -> None:
    path = _qemu_create(tmp_path / "snap.qcow2", options)
    fill_with_pattern(path, "qcow2")
    qemu_img("snapshot", "-c", "first", path)
    qemu_io(path, "qcow2", ["write -P 0x81 0 128k", "write -P 0x82 20M 64k", "write -z 1M 64k"])
    qemu_img("snapshot", "-c", "second", path)
    qemu_io(path, "qcow2", ["write -P 0x83 30000 100"])

    expected = {}
    for name in ("first", "second"):
        flat = tmp_path / f"{name}.raw"
        qemu_img("convert", "-f", "qcow2", "-l", f"snapshot.name={name}", "-O", "raw", path, flat)
        expected[name] = flat.read_bytes()
        flat.unlink()

    with open_image(path) as image:
        assert isinstance(image, QCOW2Image)
        snaps = image.snapshots()
        assert [s.name for s in snaps] == ["first", "second"]
        assert [s.id for s in snaps] == ["1", "2"]
        assert snaps[0].disk_size == SIZE
        for name, data in expected.items():
            with image.open_snapshot(name) as view:
                assert view.snapshot == name
                assert not view.writable()
                assert view.read_at(0, SIZE) == data
        with pytest.raises(SnapshotNotFoundError, match="'first', 'second'") as excinfo:
            image.open_snapshot("third")
        assert excinfo.value.names == ["first", "second"]
        with image.open_snapshot("1") as by_id:  # ids work when no name matches
            assert by_id.snapshot == "first"

    model = _model_of(path, tmp_path)
    with open_image(path, writable=True) as image:
        _random_writes(image, model, random.Random(f"snap-{options}"), 20)
        image.write_at(5, b"after")  # a cluster shared with both snapshots
        model[5:10] = b"after"
    _assert_qemu_agrees(path, model, tmp_path)
    for name, data in expected.items():  # the snapshots did not change
        flat = tmp_path / f"{name}.again"
        qemu_img("convert", "-f", "qcow2", "-l", f"snapshot.name={name}", "-O", "raw", path, flat)
        assert flat.read_bytes() == data
        with open_image(path) as image:
            assert isinstance(image, QCOW2Image)
            with image.open_snapshot(name) as view:
                assert view.read_at(0, SIZE) == data


# -- images made by diskhandler -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"version": 2},
        {"compat": "0.10"},
        {"cluster_size": 512},
        {"cluster_size": 2 * MiB},
        {"extended_l2": True, "cluster_size": 128 * 1024},
        {"extended_l2": True, "cluster_size": 16 * 1024},
        {"refcount_bits": 1},
        {"refcount_bits": 64},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_created_variants_pass_check_at_every_point(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "new.qcow2"
    model = bytearray(20 * MiB)
    image = create_image(path, len(model), **options)
    qemu_check(path, "qcow2")  # right after creation
    _random_writes(image, model, random.Random(str(options)), 10)
    qemu_check(path, "qcow2")  # while still open, after writes
    image.close()
    info = json.loads(qemu_img("info", "--output=json", path))
    expect_compat = "0.10" if options.get("version") == 2 or options.get("compat") == "0.10" else "1.1"
    assert info["format-specific"]["data"]["compat"] == expect_compat
    assert info["cluster-size"] == options.get("cluster_size", 65536)
    if options.get("extended_l2"):
        assert info["format-specific"]["data"]["extended-l2"] is True
    _assert_qemu_agrees(path, model, tmp_path)


def test_extended_l2_subcluster_writes_over_a_backing_file(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.qcow2")
    fill_with_pattern(base, "qcow2")
    top = tmp_path / "top.qcow2"
    model = _model_of(base, tmp_path)
    with create_image(top, parent=base, extended_l2=True, cluster_size=128 * 1024) as image:
        image.write_at(4096 + 10, b"\xcd" * 100)  # one subcluster: the rest comes from the base
        model[4106:4206] = b"\xcd" * 100
        _random_writes(image, model, random.Random("ext-l2"), 10)
    _assert_qemu_agrees(top, model, tmp_path)
    qemu_io(top, "qcow2", ["write -z 8M 4k"])  # qemu sets a subcluster zero bit; we overwrite part of it
    model[8 * MiB : 8 * MiB + 4096] = bytes(4096)
    with open_image(top, writable=True) as image:
        image.write_at(8 * MiB + 100, b"\x01")
        model[8 * MiB + 100] = 1
    _assert_qemu_agrees(top, model, tmp_path)


def test_refcount_table_grows(tmp_path: Path) -> None:
    # 512-byte clusters: one refcount block covers 128 KiB and the first table 8 MiB of file.
    path = tmp_path / "grow.qcow2"
    model = bytearray(24 * MiB)
    rng = random.Random("grow")
    with create_image(path, len(model), cluster_size=512) as image:
        for offset in range(0, len(model), 3 * MiB):
            data = rng.randbytes(2 * MiB + 3)
            image.write_at(offset, data)
            model[offset : offset + len(data)] = data
    assert _header_field(path, 56, ">I") > 1, "refcount table should have grown"
    _assert_qemu_agrees(path, model, tmp_path)


def test_partial_write_into_zero_cluster_keeps_zeros(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "z.qcow2")
    qemu_io(path, "qcow2", ["write -P 0x11 0 128k", "write -z 0 64k"])  # zero flag over allocated data
    with open_image(path, writable=True) as image:
        image.write_at(1000, b"\x22" * 10)
    model = bytearray(SIZE)
    model[64 * 1024 : 128 * 1024] = b"\x11" * 65536
    model[1000:1010] = b"\x22" * 10
    _assert_qemu_agrees(path, model, tmp_path)


def test_unknown_autoclear_bits_are_cleared_when_writing(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "a.qcow2")
    _patch(path, 88, struct.pack(">Q", 1 << 40))
    with open_image(path) as image:  # reading leaves them alone
        image.read_at(0, 10)
    assert _header_field(path, 88, ">Q") == 1 << 40
    with open_image(path, writable=True):  # nor does opening writable without writing
        pass
    assert _header_field(path, 88, ">Q") == 1 << 40
    with open_image(path, writable=True) as image:
        image.write_at(0, b"x")
    assert _header_field(path, 88, ">Q") == 0
    qemu_check(path, "qcow2")


# -- refusals and corrupt input -----------------------------------------------------------------


def test_dirty_and_corrupt_images_read_but_refuse_writing(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "d.qcow2", "lazy_refcounts=on")
    qemu_io(path, "qcow2", ["write -P 0x44 0 64k"])
    _patch(path, 72, struct.pack(">Q", 1))  # dirty
    with open_image(path) as image:
        assert image.read_at(0, 2) == b"\x44\x44"
    with pytest.raises(UnsupportedImageError, match=r"qemu-img check -r all"):
        open_image(path, writable=True)
    _patch(path, 72, struct.pack(">Q", 2))  # corrupt
    with open_image(path) as image:
        assert image.read_at(0, 2) == b"\x44\x44"
    with pytest.raises(ImageFormatError, match="corrupt") as excinfo:
        open_image(path, writable=True)
    assert excinfo.value.field == "incompatible_features"


@pytest.mark.parametrize(
    ("offset", "data", "field", "error"),
    [
        (0, b"QFI\xfc", "magic", ImageFormatError),
        (4, struct.pack(">I", 4), "version", UnsupportedImageError),
        (20, struct.pack(">I", 30), "cluster_bits", ImageFormatError),
        (24, struct.pack(">Q", 1 << 62), "size", ImageFormatError),
        (32, struct.pack(">I", 1), "crypt_method", UnsupportedImageError),
        (32, struct.pack(">I", 2), "crypt_method", UnsupportedImageError),
        (36, struct.pack(">I", 1 << 30), "l1_size", ImageFormatError),
        (36, struct.pack(">I", 0), "l1_size", ImageFormatError),
        (40, struct.pack(">Q", 1 << 50), "l1_table_offset", ImageFormatError),
        (40, struct.pack(">Q", 4096 * 17 + 8), "l1_table_offset", ImageFormatError),
        (56, struct.pack(">I", 1 << 30), "refcount_table_clusters", ImageFormatError),
        (60, struct.pack(">I", 1 << 30), "nb_snapshots", ImageFormatError),
        (72, struct.pack(">Q", 1 << 20), "incompatible_features", UnsupportedImageError),
        (72, struct.pack(">Q", 1 << 2), "incompatible_features", UnsupportedImageError),
        (96, struct.pack(">I", 7), "refcount_order", ImageFormatError),
        (100, struct.pack(">I", 50), "header_length", ImageFormatError),
        (104, b"\x05", "compression_type", UnsupportedImageError),
        (8, struct.pack(">QI", 400, 5000), "backing_file_size", ImageFormatError),
    ],
)
def test_bad_header_fields_are_named(
    tmp_path: Path, offset: int, data: bytes, field: str, error: type[Exception]
) -> None:
    path = _qemu_create(tmp_path / "bad.qcow2")
    _patch(path, offset, data)
    with pytest.raises(error) as excinfo:
        open_image(path, format="qcow2").close()
    assert isinstance(excinfo.value, ImageFormatError)
    assert excinfo.value.field == field
    assert excinfo.value.path == path
    assert str(path) in str(excinfo.value)


def test_truncated_images(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "t.qcow2")
    qemu_io(path, "qcow2", ["write -P 0x55 1M 64k"])
    full = path.read_bytes()
    for length in (0, 10, 71, 103, 4096, 3 * 65536 + 8):
        path.write_bytes(full[:length])
        with pytest.raises(ImageFormatError), open_image(path, format="qcow2") as image:
            image.read_at(0, SIZE)
    path.write_bytes(full[: len(full) - 65536])  # the data cluster is cut off
    with open_image(path) as image, pytest.raises(ImageFormatError, match="past the end"):
        image.read_at(MiB, 10)


def test_bad_table_entries(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "e.qcow2")
    qemu_io(path, "qcow2", ["write -P 0x55 0 64k"])
    l1 = _header_field(path, 40, ">Q")
    l2 = _header_field(path, l1, ">Q") & 0x00FFFFFFFFFFFE00
    _patch(path, l2, struct.pack(">Q", (1 << 63) | 0x50000 | 0x10))  # reserved bit 4
    with open_image(path) as image, pytest.raises(ImageFormatError, match="reserved") as excinfo:
        image.read_at(0, 1)
    assert excinfo.value.field == "L2 table"
    _patch(path, l1, struct.pack(">Q", (1 << 63) | (l2 + 512)))  # L2 table not cluster aligned
    with open_image(path) as image, pytest.raises(ImageFormatError, match="unaligned"):
        image.read_at(0, 1)
    _patch(path, l1, struct.pack(">Q", (1 << 63) | (1 << 40)))  # L2 table past the end
    with open_image(path) as image, pytest.raises(ImageFormatError, match="truncated"):
        image.read_at(0, 1)


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", path, "1M")
    with pytest.raises(UnsupportedImageError, match="external data file"):
        open_image(path)


def test_create_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cluster_size"):
        create_image(tmp_path / "a.qcow2", MiB, cluster_size=1000)
    with pytest.raises(ValueError, match="extended_l2"):
        create_image(tmp_path / "b.qcow2", MiB, version=2, extended_l2=True)
    with pytest.raises(ValueError, match="contradicts"):
        create_image(tmp_path / "c.qcow2", MiB, version=3, compat="0.10")
    with pytest.raises(TypeError, match="unknown qcow2 options"):
        create_image(tmp_path / "d.qcow2", MiB, preallocation="full")
    assert not list(tmp_path.iterdir())


_FUZZ_SEED: dict[str, bytes] = {}


def _fuzz_seed(tmp_dir: Path) -> bytes:
    if "image" not in _FUZZ_SEED:
        path = tmp_dir / "seed.qcow2"
        _qemu_create(path, "cluster_size=4k", 4 * MiB)
        qemu_io(path, "qcow2", ["write -P 0x11 0 8k", "write -c -P 0x22 1M 4k", "write -z 2M 4k"])
        qemu_img("snapshot", "-c", "s", path)
        qemu_io(path, "qcow2", ["write -P 0x33 4k 4k"])
        _FUZZ_SEED["image"] = path.read_bytes()
    return _FUZZ_SEED["image"]


def _open_and_read_everything(path: Path) -> None:
    try:
        with open_image(path, format="qcow2") as image:
            assert isinstance(image, QCOW2Image)
            buf = bytearray(min(image.size, 4 * MiB))
            image.readinto_at(0, buf)
            for snap in image.snapshots():
                with image.open_snapshot(snap.name) as view:
                    view.read_at(0, 4 * MiB)
        with open_image(path, format="qcow2", writable=True) as image:
            for offset in (0, 5000, 1 * MiB + 10, image.size - 3):
                if 0 <= offset < image.size:
                    image.write_at(offset, b"abc"[: image.size - offset])
    except ImageFormatError:
        pass


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_header_and_metadata(tmp_path: Path, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(_fuzz_seed(tmp_path))
    for offset, value in mutations:
        # Hit the header mostly, and the L1/L2/refcount/snapshot clusters that follow it.
        target = offset if offset < 512 else 4096 * (offset % 8) + offset % 4096
        data[target % len(data)] = value
    path = tmp_path / "fuzzed.qcow2"
    path.write_bytes(data)
    _open_and_read_everything(path)


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_random_data_after_magic(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "random.qcow2"
    path.write_bytes(b"QFI\xfb" + tail)
    _open_and_read_everything(path)


# -- real images ---------------------------------------------------------------------------------


def test_real_dfvfs_image_reads_like_qemu(tmp_path: Path) -> None:
    real = REAL_IMAGES / "dfvfs" / "ext2.qcow2"
    if not real.exists():
        pytest.skip(f"real test image {real} is not available")
    copy = tmp_path / real.name
    shutil.copyfile(real, copy)
    assert_reads_like_qemu(copy, "qcow2", tmp_path)
    run("qemu-img", "check", "-f", "qcow2", copy)
    assert os.path.getsize(copy) == os.path.getsize(real)


# -- crash safety ----------------------------------------------------------------------------------


def _crash_workload(path: Path) -> None:
    rng = random.Random("crash")
    with open_image(path, writable=True) as image:
        image.write_at(10, b"\x01" * 5000)  # a cluster shared with the snapshot: copy-on-write
        image.write_at(MiB + 100, b"\x02" * 3)  # a compressed cluster
        image.write_at(3 * MiB - 50, b"\x03" * 100)  # unallocated, across an L2 table boundary
        image.write_at(6 * MiB, rng.randbytes(1_500_000))  # new clusters, refcount blocks and table


@pytest.mark.parametrize("options", ["cluster_size=4k", "cluster_size=512"])
def test_interrupted_writes_leave_a_valid_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str
) -> None:
    seed = _qemu_create(tmp_path / "seed.qcow2", options, 16 * MiB)
    # With 512-byte clusters the first refcount table covers 8 MiB of file: the workload crosses that.
    qemu_io(seed, "qcow2", ["write -P 0x11 0 64k", "write -c -P 0x12 1M 64k", "write -P 0x13 4M 7M"])
    qemu_img("snapshot", "-c", "snap", seed)

    calls = 0
    stop_at = -1
    table_moves: list[int] = []  # calls that point the header at a new refcount table
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def counted(real: Any) -> Any:
        def write(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if len(args) == 3 and args[2] == 48:
                table_moves.append(calls)
            if calls == stop_at:
                raise _PowerCut(5, "simulated power cut")
            return real(*args)

        return write

    monkeypatch.setattr(os, "pwrite", counted(real_pwrite))
    monkeypatch.setattr(os, "pwritev", counted(real_pwritev))
    work = tmp_path / "work.qcow2"
    shutil.copyfile(seed, work)
    _crash_workload(work)
    total = calls
    assert total > 10
    run("qemu-img", "check", "-f", "qcow2", work)
    stops = list(range(1, total + 1))
    if total > 60:  # every early write, then a sample of the rest
        stops = [*range(1, 25), *sorted(random.Random(options).sample(range(25, total + 1), 35))]
    for move in table_moves:  # around the moment the refcount table moves
        stops += range(max(1, move - 6), min(total, move + 3) + 1)
    if "512" in options:
        assert table_moves, "the workload should have grown the refcount table"
    for stop in stops:
        calls, stop_at = 0, stop
        shutil.copyfile(seed, work)
        with pytest.raises(_PowerCut):
            _crash_workload(work)
        proc = subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", work], check=False, capture_output=True, text=True
        )
        # 0: clean; 3: leaked clusters only (reclaimable with `qemu-img check -r leaks`).
        assert proc.returncode in (0, 3), f"power cut at write {stop} of {total}:\n{proc.stdout}{proc.stderr}"
        with open_image(work) as image:
            assert image.read_at(0, 10) == b"\x11" * 10


def test_small_l2_cache_still_reads_and_writes_right(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diskhandler.formats import qcow2

    monkeypatch.setattr(qcow2, "_L2_CACHE_BYTES", 3 * 4096)  # three 4 KiB tables, each mapping 2 MiB
    path = _qemu_create(tmp_path / "cache.qcow2", "cluster_size=4k")
    fill_with_pattern(path, "qcow2")
    assert_reads_like_qemu(path, "qcow2", tmp_path)
    model = _model_of(path, tmp_path)
    with open_image(path, writable=True) as image:
        _random_writes(image, model, random.Random("cache"), 20)
        image.write_at(MiB, bytes(range(256)) * 40_000)  # one write over five L2 tables
        model[MiB : MiB + 10_240_000] = bytes(range(256)) * 40_000
        assert image.read_at(0, SIZE) == model
    _assert_qemu_agrees(path, model, tmp_path)


def test_persistent_bitmaps_become_stale_after_a_write(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "bitmap.qcow2")
    qemu_img("bitmap", "--add", path, "b0")
    assert _header_field(path, 88, ">Q") & 1  # "bitmaps are consistent"
    with open_image(path, writable=True) as image:
        image.write_at(0, b"changed")
    assert _header_field(path, 88, ">Q") == 0
    proc = subprocess.run(["qemu-img", "check", path], check=False, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # leaked bitmap clusters, no error
    assert "lacking bitmap support" in proc.stderr
    run("qemu-img", "check", "-r", "leaks", path)
    qemu_check(path, "qcow2")
    qemu_io(path, "qcow2", ["read -P 0 7 100"])
    with open_image(path) as image:
        assert image.read_at(0, 7) == b"changed"


def test_small_refcount_cache_keeps_refcounts_right(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diskhandler.formats import _qcow2_refcount

    monkeypatch.setattr(_qcow2_refcount, "_BLOCK_CACHE_BYTES", 2 * 512)  # two 512-byte blocks
    path = tmp_path / "rc.qcow2"
    model = bytearray(12 * MiB)
    rng = random.Random("refcount-cache")
    with create_image(path, len(model), cluster_size=512) as image:
        _random_writes(image, model, rng, 15)
    qemu_img("snapshot", "-c", "s", path)  # shared clusters: writes now copy and release
    with open_image(path, writable=True) as image:
        _random_writes(image, model, rng, 15)
    _assert_qemu_agrees(path, model, tmp_path)


def test_whole_clusters_of_zeros_store_no_data(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.qcow2")
    fill_with_pattern(base, "qcow2")
    top = tmp_path / "top.qcow2"
    model = _model_of(base, tmp_path)
    with create_image(top, parent=base) as image:
        image.write_at(MiB, bytes(MiB))  # over the base's data: zero clusters hide it
        model[MiB : 2 * MiB] = bytes(MiB)
    size_after_zeros = top.stat().st_size
    info = json.loads(qemu_img("map", "--output=json", top))
    zero_run = next(e for e in info if e["start"] == MiB)
    assert zero_run["zero"] is True
    assert zero_run["data"] is False
    assert zero_run["depth"] == 0
    with open_image(top, writable=True) as image:
        image.write_at(8 * MiB, b"\x01" * 65536)  # data, then zeros over it: the cluster is released
        image.write_at(8 * MiB, bytes(65536))
        model[8 * MiB : 8 * MiB + 65536] = bytes(65536)
    _assert_qemu_agrees(top, model, tmp_path)
    assert top.stat().st_size <= size_after_zeros + 2 * 65536

    fresh = tmp_path / "fresh.qcow2"
    with create_image(fresh, SIZE) as image:  # zeros where the disk reads zeros: nothing at all
        empty_size = fresh.stat().st_size
        image.write_at(0, bytes(4 * MiB))
    assert fresh.stat().st_size == empty_size
    qemu_check(fresh, "qcow2")


def test_zeros_in_a_version_2_overlay_are_stored_as_data(tmp_path: Path) -> None:
    base = _qemu_create(tmp_path / "base.qcow2")
    qemu_io(base, "qcow2", ["write -P 0x11 0 1M"])
    top = tmp_path / "top.qcow2"
    with create_image(top, parent=base, version=2) as image:
        image.write_at(0, bytes(65536))  # v2 has no zero flag
    model = bytearray(SIZE)
    model[65536:MiB] = b"\x11" * (MiB - 65536)
    _assert_qemu_agrees(top, model, tmp_path)


def test_failed_write_leaves_tables_as_they_were(tmp_path: Path) -> None:
    path = _qemu_create(tmp_path / "f.qcow2")
    qemu_io(path, "qcow2", ["write -c -P 0x21 64k 64k"])
    l1 = _header_field(path, 40, ">Q")
    l2 = _header_field(path, l1, ">Q") & 0x00FFFFFFFFFFFE00
    compressed_at = _header_field(path, l2 + 8, ">Q") & ((1 << 54) - 1)
    _patch(path, compressed_at, b"\xff" * 64)  # the deflate stream is damaged
    with open_image(path, writable=True) as image:
        with pytest.raises(ImageFormatError, match="compressed cluster"):
            image.write_at(65536 - 50, b"\x33" * 100)  # cluster 0 is fine, cluster 1 cannot be merged
        assert image.read_at(65536 - 50, 50) == bytes(50)  # nothing of the failed write shows
        image.write_at(MiB, b"\x44" * 10)
    proc = subprocess.run(["qemu-img", "check", path], check=False, capture_output=True, text=True)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr  # at worst a leaked cluster
    with open_image(path) as image:
        assert image.read_at(65536 - 50, 50) == bytes(50)
        assert image.read_at(MiB, 10) == b"\x44" * 10


def test_old_qcow_version_1_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "old.qcow"
    qemu_img("create", "-f", "qcow", path, "1M")
    with pytest.raises(UnsupportedImageError, match=r"qcow \(version 1\).*convert -O qcow2") as excinfo:
        open_image(path)
    assert excinfo.value.field == "format"
