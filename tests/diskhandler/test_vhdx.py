"""VHDX: qemu-made images read byte-identical, ours pass qemu-img check/convert, chains, the log, bad input.

qemu reads and writes fixed and dynamic VHDX with 512-byte logical sectors, but not differencing
images: chains are checked against a model kept in the test.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import (
    ChainError,
    ImageFormatError,
    ImageInUseError,
    ParentPolicyError,
    SpecialFileError,
    UnsupportedImageError,
    create_image,
    detect_format,
    open_image,
)
from diskhandler.formats import _vhdx_layout as L
from diskhandler.formats.vhdx import VHDXImage
from diskhandler.partitions import list_partitions
from tests.diskhandler.imagetools import (
    assert_reads_like_qemu,
    compare_with_raw,
    fill_with_pattern,
    patch_file,
    power_cut_at_every_write,
    qemu_check,
    qemu_flatten,
    qemu_img,
    qemu_io,
    sha256_of_file,
)

MiB = 1 << 20


def _vhdx(path: Path) -> VHDXImage:
    image = open_image(path)
    assert isinstance(image, VHDXImage)
    return image


# -- qemu-made images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        "subformat=dynamic",
        "subformat=dynamic,block_size=1M,log_size=1M",
        "subformat=dynamic,block_size=32M,log_size=2M",
        "subformat=dynamic,block_state_zero=off,block_size=2M",
        "subformat=fixed,block_size=1M",
        "subformat=fixed",
    ],
)
def test_qemu_made_image_reads_byte_identical(tmp_path: Path, options: str) -> None:
    path = tmp_path / "q.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", options, path, "64M")
    assert detect_format(path) == "vhdx"
    with _vhdx(path) as image:
        assert image.size == 64 * MiB
        assert image.read() == bytes(64 * MiB)
        assert image.disk_type in ("dynamic", "fixed")
    fill_with_pattern(path, "vhdx")
    assert_reads_like_qemu(path, "vhdx", tmp_path)


def test_qemu_writes_to_our_image_and_we_read_them(tmp_path: Path) -> None:
    path = tmp_path / "ours.vhdx"
    create_image(path, 64 * MiB, block_size=2 * MiB).close()
    fill_with_pattern(path, "vhdx")
    qemu_check(path, "vhdx")
    assert_reads_like_qemu(path, "vhdx", tmp_path)
    with open_image(path, writable=True) as image:  # and on top of qemu's blocks, ours again
        image.write_at(MiB - 100, b"\xee" * 300)
    qemu_check(path, "vhdx")
    assert_reads_like_qemu(path, "vhdx", tmp_path)


@pytest.mark.parametrize(
    ("subformat", "block_size"),
    [("dynamic", MiB), ("dynamic", 8 * MiB), ("fixed", 4 * MiB), ("dynamic", None)],
)
def test_our_image_passes_qemu_check_and_convert(
    tmp_path: Path, subformat: str, block_size: int | None
) -> None:
    path = tmp_path / "ours.vhdx"
    rng = random.Random(f"{subformat}-{block_size}")
    size = 48 * MiB
    model = bytearray(size)
    opts = {"subformat": subformat} | ({"block_size": block_size} if block_size else {})
    with create_image(path, size, "vhdx", **opts) as image:
        for _ in range(25):
            length = rng.choice([1, 512, 4096, rng.randrange(1, 3 * MiB)])
            offset = rng.randrange(0, size - length)
            data = rng.randbytes(length)
            image.write_at(offset, data)
            model[offset : offset + length] = data
    qemu_check(path, "vhdx")
    flat = qemu_flatten(path, "vhdx", tmp_path / "flat.raw")
    assert hashlib.sha256(flat.read_bytes()).digest() == hashlib.sha256(model).digest()
    info = qemu_img("info", "--output=json", path)
    assert '"virtual-size": 50331648' in info
    # qemu-img convert *to* VHDX of our raw copy reads back the same through us
    again = tmp_path / "again.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", flat, again)
    compare_with_raw(again, flat)


def test_create_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_size"):
        create_image(tmp_path / "a.vhdx", MiB, block_size=3 * MiB)
    with pytest.raises(ValueError, match="log_size"):
        create_image(tmp_path / "b.vhdx", MiB, log_size=1000)
    with pytest.raises(ValueError, match="logical_sector_size"):
        create_image(tmp_path / "c.vhdx", MiB, logical_sector_size=1024)
    with pytest.raises(ValueError, match="sectors"):
        create_image(tmp_path / "d.vhdx", MiB + 1)
    with pytest.raises(TypeError, match="unknown VHDX options"):
        create_image(tmp_path / "e.vhdx", MiB, cluster_size=4096)
    assert not list(tmp_path.iterdir())


def test_geometry_attributes(tmp_path: Path) -> None:
    path = tmp_path / "g.vhdx"
    create_image(path, 8 * MiB, block_size=4 * MiB, logical_sector_size=4096).close()
    with _vhdx(path) as image:
        assert (image.block_size, image.logical_sector_size, image.disk_type) == (4 * MiB, 4096, "dynamic")
        assert isinstance(image.disk_id, uuid.UUID)


# -- differencing chains -----------------------------------------------------------------------------


def test_three_level_chain_against_a_model(tmp_path: Path) -> None:
    rng = random.Random(7)
    size = 24 * MiB
    model = bytearray(size)

    def scribble(image: VHDXImage | object, count: int) -> None:
        for _ in range(count):
            length = rng.choice([1, 100, 512, 4096, rng.randrange(1, 2 * MiB)])
            offset = rng.randrange(0, size - length)
            data = rng.randbytes(length)
            image.write_at(offset, data)  # type: ignore[attr-defined]
            model[offset : offset + length] = data

    base = tmp_path / "base.vhdx"
    with create_image(base, size, block_size=MiB) as image:
        scribble(image, 10)
    mid = tmp_path / "snap" / "mid.avhdx"  # Hyper-V's name for differencing disks, in another folder
    mid.parent.mkdir()
    with create_image(mid, parent=base, format="vhdx") as image:
        assert image.read() == model
        scribble(image, 12)
    digests = {p: sha256_of_file(p) for p in (base, mid)}
    top = tmp_path / "snap" / "top.avhdx"
    with create_image(top, parent=mid, format="vhdx") as image:
        scribble(image, 12)
        image.write_at(0, bytes(4096))  # zeros written over parent data stay zeros
        model[0:4096] = bytes(4096)
    with _vhdx(top) as image:
        assert image.disk_type == "differencing"
        assert image.chain == (top, mid, base)
        assert image.read() == model
    assert {p: sha256_of_file(p) for p in (base, mid)} == digests


def test_parent_changed_after_the_child_was_made_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    create_image(base, 4 * MiB).close()
    child = tmp_path / "child.vhdx"
    create_image(child, parent=base).close()
    with open_image(base, writable=True) as image:  # a new DataWriteGuid: the child's link is stale
        image.write_at(0, b"changed")
    with pytest.raises(ChainError, match="DataWriteGuid"):
        open_image(child)


def test_missing_parent_says_where_it_looked(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    create_image(base, 4 * MiB).close()
    child = tmp_path / "child.vhdx"
    create_image(child, parent=base).close()
    base.rename(tmp_path / "moved.vhdx")
    with pytest.raises(ChainError, match=r"base\.vhdx \(missing\)"):
        open_image(child)


def test_parent_found_by_file_name_beside_the_child(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    base = tmp_path / "a" / "base.vhdx"
    with create_image(base, 4 * MiB) as image:
        image.write_at(0, b"base data")
    child = tmp_path / "a" / "child.vhdx"
    create_image(child, parent=base).close()
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)  # relative_path still works: both moved together
    with open_image(moved / "child.vhdx") as image:
        assert image.read_at(0, 9) == b"base data"


# -- the log ---------------------------------------------------------------------------------------


def _qemu_log_left_unapplied(tmp_path: Path) -> tuple[Path, bytes]:
    """A qemu-written log entry whose update is undone in the file, as if the process had died
    between writing the log and applying it: the header names the log again, the BAT entry is reset."""
    path = tmp_path / "log.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", path, "16M")
    qemu_io(path, "vhdx", ["write -P 0x5a 2M 1M"])
    data = path.read_bytes()
    log_offset = struct.unpack_from("<Q", data, L.HEADER1_OFFSET + 72)[0]
    entry = data[log_offset : log_offset + 64]
    assert entry[:4] == b"loge"  # qemu logged its BAT update (and cleared the header's log GUID)
    log_guid = entry[32:48]
    bat_offset = 2 * MiB
    assert struct.unpack_from("<Q", data, bat_offset + 16)[0] & 7 == 6  # block 2 fully present
    patch_file(path, bat_offset + 16, struct.pack("<Q", 2))  # back to ZERO: the update "never landed"
    for offset in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):
        raw = bytearray(data[offset : offset + L.HEADER_SIZE])
        raw[48:64] = log_guid
        raw[8:16] = struct.pack("<Q", struct.unpack_from("<Q", raw, 8)[0] + 10)
        patch_file(path, offset, L.sealed(bytes(raw)))
    return path, b"\x5a" * MiB


def test_read_only_open_replays_the_log_in_memory_and_changes_nothing(tmp_path: Path) -> None:
    path, expect = _qemu_log_left_unapplied(tmp_path)
    before = sha256_of_file(path)
    with _vhdx(path) as image:
        assert image.replayed >= 1
        assert image.read_at(2 * MiB, MiB) == expect
        assert image.read_at(0, MiB) == bytes(MiB)
    assert sha256_of_file(path) == before


def test_writable_open_replays_the_log_into_the_file(tmp_path: Path) -> None:
    path, expect = _qemu_log_left_unapplied(tmp_path)
    with open_image(path, writable=True) as image:
        assert image.read_at(2 * MiB, MiB) == expect
    with _vhdx(path) as image:
        assert image.replayed == 0  # the log is empty now
        assert image.read_at(2 * MiB, MiB) == expect
    qemu_check(path, "vhdx")
    assert_reads_like_qemu(path, "vhdx", tmp_path)


def test_a_log_the_header_names_but_that_is_garbage_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.vhdx"
    create_image(path, 4 * MiB).close()
    data = path.read_bytes()
    for offset in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):
        raw = bytearray(data[offset : offset + L.HEADER_SIZE])
        raw[48:64] = uuid.uuid4().bytes_le
        patch_file(path, offset, L.sealed(bytes(raw)))
    for writable in (False, True):
        with pytest.raises(ImageFormatError, match="no valid log sequence"):
            open_image(path, writable=writable)


def _allocating_workload(path: Path) -> None:
    with open_image(path, writable=True) as image:
        image.write_at(0, b"\x12" * 10)
        image.write_at(2 * MiB + 5, b"\x22" * 100)
        image.write_at(4 * MiB, b"\x33" * MiB)


def test_power_cut_at_every_write_leaves_old_or_new_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = tmp_path / "seed.vhdx"
    with create_image(seed, 8 * MiB, block_size=MiB) as image:
        image.write_at(MiB, b"\x44" * 16)

    def check(work: Path, when: str) -> None:
        for writable in (False, True):  # read-only replays in memory; writable replays into the file
            with open_image(work, writable=writable) as image:
                got = image.read_at(0, 8 * MiB)
            for start, data in [(0, b"\x12" * 10), (2 * MiB + 5, b"\x22" * 100), (4 * MiB, b"\x33" * MiB)]:
                assert got[start : start + len(data)] in (data, bytes(len(data))), when
            assert got[MiB : MiB + 16] == b"\x44" * 16, when
        qemu_check(work, "vhdx")

    power_cut_at_every_write(
        monkeypatch, seed, tmp_path / "work.vhdx", _allocating_workload, check, min_writes=12
    )


def test_power_cut_in_a_child_leaves_the_parent_showing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.vhdx"
    with create_image(base, 8 * MiB, block_size=MiB) as image:
        image.write_at(0, b"\x11" * 8 * MiB)
    seed = tmp_path / "seed.vhdx"
    create_image(seed, parent=base, block_size=MiB).close()

    def check(work: Path, when: str) -> None:
        with open_image(work) as image:
            got = image.read_at(0, 8 * MiB)
        for start, data in [(0, b"\x12" * 10), (2 * MiB + 5, b"\x22" * 100), (4 * MiB, b"\x33" * MiB)]:
            assert got[start : start + len(data)] in (data, b"\x11" * len(data)), when
        rest = got[10 : 2 * MiB + 5] + got[2 * MiB + 105 : 4 * MiB] + got[5 * MiB :]
        assert rest == b"\x11" * len(rest), when

    power_cut_at_every_write(
        monkeypatch, seed, tmp_path / "work.vhdx", _allocating_workload, check, min_writes=10
    )


# -- bad input --------------------------------------------------------------------------------------


def _fresh(tmp_path: Path) -> Path:
    path = tmp_path / "d.vhdx"
    with create_image(path, 8 * MiB, block_size=MiB) as image:
        image.write_at(0, b"data" * 1000)
    return path


def test_one_damaged_header_is_survived_both_are_an_error(tmp_path: Path) -> None:
    path = _fresh(tmp_path)
    patch_file(path, L.HEADER1_OFFSET + 100, b"\xff")
    with open_image(path) as image:
        assert image.read_at(0, 4) == b"data"
    patch_file(path, L.HEADER2_OFFSET + 100, b"\xff")
    with pytest.raises(ImageFormatError, match=r"no valid header.*checksum"):
        open_image(path)


def test_unknown_required_region_and_metadata_are_refused(tmp_path: Path) -> None:
    path = _fresh(tmp_path)
    data = bytearray(path.read_bytes())
    for offset in (L.REGION1_OFFSET, L.REGION2_OFFSET):
        table = bytearray(data[offset : offset + L.REGION_TABLE_SIZE])
        struct.pack_into("<I", table, 8, 3)
        table[80:112] = L.RegionEntry(uuid.uuid4().bytes_le, 100 * MiB, MiB, 1).to_bytes()
        patch_file(path, offset, L.sealed(bytes(table)))
    with pytest.raises(UnsupportedImageError, match="required region"):
        open_image(path)


def test_metadata_item_outside_its_region_is_an_error(tmp_path: Path) -> None:
    path = _fresh(tmp_path)
    meta = 2 * MiB  # log 1 MiB at 1 MiB, metadata next
    assert path.read_bytes()[meta : meta + 8] == b"metadata"
    patch_file(path, meta + 32 + 16, struct.pack("<II", 0x7FFF_0000, 8))  # file parameters far away
    with pytest.raises(ImageFormatError, match="file parameters"):
        open_image(path)


def test_bad_bat_state_is_an_error(tmp_path: Path) -> None:
    path = _fresh(tmp_path)
    patch_file(path, 3 * MiB + 8, struct.pack("<Q", 7))  # PARTIALLY_PRESENT in a dynamic image
    with pytest.raises(ImageFormatError, match="BAT entry 1"):
        open_image(path)


def _open_fuzzed(path: Path) -> None:
    error: ImageFormatError | None = None
    try:
        with open_image(path, format="vhdx") as image:
            image.read_at(0, 4096)
            image.read_at(max(0, image.size - 5000), 5000)
    except ImageFormatError as exc:
        error = exc
    if error is not None:
        assert error.path == path


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("vhdx") / "f.vhdx"
    with create_image(path, 4 * MiB, block_size=MiB) as image:
        image.write_at(MiB, b"x" * 5000)
    return path.read_bytes()


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from([L.HEADER1_OFFSET, L.HEADER2_OFFSET, L.REGION1_OFFSET, 2 * MiB, 3 * MiB]),
            st.integers(0, 200),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=6,
    ),
    reseal=st.booleans(),
)
def test_fuzz_structures(
    tmp_path: Path, valid_bytes: bytes, edits: list[tuple[int, int, int]], reseal: bool
) -> None:
    """Damaged headers, region table, metadata and BAT: a typed error or a working image, nothing else.

    With ``reseal`` the checksums are recomputed, so the damage reaches the parsers behind them."""
    data = bytearray(valid_bytes)
    for base, at, byte in edits:
        data[base + at] = byte
    if reseal:
        for offset, size in ((L.HEADER1_OFFSET, L.HEADER_SIZE), (L.HEADER2_OFFSET, L.HEADER_SIZE)):
            data[offset : offset + size] = L.sealed(bytes(data[offset : offset + size]))
        for offset in (L.REGION1_OFFSET, L.REGION2_OFFSET):
            size = L.REGION_TABLE_SIZE
            data[offset : offset + size] = L.sealed(bytes(data[offset : offset + size]))
    path = tmp_path / "fuzz.vhdx"
    path.write_bytes(bytes(data))
    try:
        _open_fuzzed(path)
    finally:
        path.unlink()


def test_jupyter_view_shows_format_size_and_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    create_image(base, 8 * MiB).close()
    child = tmp_path / "child.avhdx"
    create_image(child, parent=base, format="vhdx").close()
    with open_image(child) as image:
        view = image._repr_html_()
    assert "vhdx, 8.0 MiB (8388608 bytes), read-only" in view
    assert view.index("child.avhdx") < view.index("base.vhdx")  # leaf first
    assert "no partition table, no LVM volumes" in view


def test_updates_lost_after_their_log_entries_are_replayed_from_the_whole_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-place BAT updates of a session never reach the disk (not flushed when the host died):
    the log's sequence, from its tail, must bring all of them back."""
    from diskhandler.formats import vhdx as vhdx_module

    path = tmp_path / "d.vhdx"
    create_image(path, 8 * MiB, block_size=MiB).close()
    bat_at = 3 * MiB  # log at 1 MiB (1 MiB), metadata at 2 MiB, then the BAT
    real = vhdx_module.pwrite_all

    def lossy(fd: int, data: bytes | memoryview, offset: int) -> None:
        if not bat_at <= offset < bat_at + MiB:
            real(fd, data, offset)

    crashed = tmp_path / "crashed.vhdx"
    image = open_image(path, writable=True)
    monkeypatch.setattr(vhdx_module, "pwrite_all", lossy)
    image.write_at(0, b"a" * MiB)
    image.write_at(3 * MiB + 10, b"b" * 10)
    image.write_at(7 * MiB - 1, b"cd")  # across a block boundary: two more allocations
    shutil.copyfile(path, crashed)  # what the disk holds when the host dies
    monkeypatch.undo()
    image.close()
    with _vhdx(crashed) as ro:
        assert ro.replayed >= 4
        assert ro.read_at(0, MiB) == b"a" * MiB
        assert ro.read_at(3 * MiB + 10, 10) == b"b" * 10
        assert ro.read_at(7 * MiB - 1, 2) == b"cd"
    with open_image(crashed, writable=True):
        pass
    qemu_check(crashed, "vhdx")
    flat = qemu_flatten(crashed, "vhdx", tmp_path / "flat.raw").read_bytes()
    assert flat[3 * MiB + 10 : 3 * MiB + 20] == b"b" * 10
    assert flat[7 * MiB - 1 : 7 * MiB + 1] == b"cd"


def test_a_writable_open_changes_nothing_before_the_image_is_locked(tmp_path: Path) -> None:
    """A log waiting for replay is written only once the locks are taken: an image another writer
    holds is refused with the file untouched."""
    from tests.diskhandler.test_image_locks import qemu_io_holding

    path, _ = _qemu_log_left_unapplied(tmp_path)
    before = sha256_of_file(path)
    with qemu_io_holding(path, "raw"), pytest.raises(ImageInUseError):
        open_image(path, writable=True)
    assert sha256_of_file(path) == before


def test_parent_files_go_through_the_policy_and_the_special_file_check(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    base = tmp_path / "elsewhere" / "base.vhdx"
    create_image(base, 4 * MiB).close()
    (tmp_path / "vm").mkdir()
    child = tmp_path / "vm" / "child.vhdx"
    create_image(child, parent=base).close()
    with pytest.raises(ParentPolicyError):
        open_image(child, parents="same-dir")
    base.unlink()
    os.mkfifo(base)  # a FIFO where the parent was: refused at once, never a hang
    with pytest.raises(SpecialFileError):
        open_image(child)


def test_the_largest_disk_with_the_smallest_blocks(tmp_path: Path) -> None:
    """64 TiB in 1 MiB blocks: a 512 MiB BAT, read a page at a time as reads reach it, never whole."""
    path = tmp_path / "huge.vhdx"
    size = 64 << 40
    create_image(path, size, block_size=MiB).close()
    with open_image(path, writable=True) as image:
        image.write_at(size - 4096, b"end!")
        image.write_at(0, b"start")
    with _vhdx(path) as image:
        assert image.read_at(size - 4096, 4) == b"end!"
        assert image.read_at(0, 5) == b"start"
        assert image.read_at(size // 2, 4) == bytes(4)
        assert len(image._bat.pages) <= 3  # the pages of the three blocks read, not 16384 of them
    qemu_check(path, "vhdx")


def test_io_disk_in_vhdx_end_to_end(tmp_path: Path) -> None:
    """create_io_disk makes an ext4 VHDX; DiskOperations reads and writes it; qemu and e2fsck agree."""
    from diskhandler import DiskOperations
    from diskhandler.create import create_io_disk

    files = tmp_path / "files"
    files.mkdir()
    (files / "in.txt").write_text("into the guest\n")
    image = tmp_path / "io.vhdx"
    create_io_disk(image, 32 * MiB, format="vhdx", files=files, partition_table="gpt")
    with DiskOperations(image) as ops:
        ops.get_file("/in.txt", tmp_path / "back.txt")
        (tmp_path / "out.txt").write_bytes(b"out of the guest\n" * 5000)
        ops.put_file(tmp_path / "out.txt", "/out.txt")
    assert (tmp_path / "back.txt").read_text() == "into the guest\n"
    qemu_check(image, "vhdx")
    flat = qemu_flatten(image, "vhdx", tmp_path / "flat.raw")
    fs = tmp_path / "fs.ext4"
    with open_image(flat) as disk:
        (part,) = list_partitions(disk)
        fs.write_bytes(part.read_at(0, part.size))
    subprocess.run(["e2fsck", "-fn", str(fs)], check=True, capture_output=True)
    cat = subprocess.run(["debugfs", "-R", "cat /out.txt", str(fs)], check=True, capture_output=True)
    assert cat.stdout == b"out of the guest\n" * 5000


def test_a_hostile_log_cannot_make_the_scan_quadratic(tmp_path: Path) -> None:
    """Every 4 KiB of an 8 MiB log starts an entry that is valid but for its checksum and claims the
    whole log: checking each would mean 16 GiB of checksums. The scan gives up with a typed error."""
    path = tmp_path / "hostile.vhdx"
    create_image(path, 8 * MiB, log_size=8 * MiB).close()
    guid = uuid.uuid4().bytes_le
    entry = L.LogEntryHeader(b"loge", 12345, 8 * MiB, 0, 1, 0, 0, guid, 0, 0).to_bytes()
    log = bytearray(8 * MiB)
    for at in range(0, len(log), L.LOG_SECTOR):
        log[at : at + len(entry)] = entry
    patch_file(path, MiB, bytes(log))
    data = path.read_bytes()
    for offset in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):
        raw = bytearray(data[offset : offset + L.HEADER_SIZE])
        raw[48:64] = guid
        patch_file(path, offset, L.sealed(bytes(raw)))
    with pytest.raises(ImageFormatError, match="bounded time"):
        open_image(path)


def test_a_metadata_item_listed_twice_is_an_error(tmp_path: Path) -> None:
    path = _fresh(tmp_path)
    meta = 2 * MiB
    first = path.read_bytes()[meta + 32 : meta + 64]  # the file parameters entry
    patch_file(path, meta + 32 + 32, first)  # over the virtual disk size entry
    with pytest.raises(ImageFormatError, match="lists this item twice"):
        open_image(path)
