"""The vdfuse view: EntireDisk and PartitionN files over every format, read-write and read-only.

Layouts come from the reference tools (sgdisk, parted); contents are compared with ``qemu-img convert``'s
flat copy of the image.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diskhandler import ImageFormatError, ImageInUseError, open_image
from diskhandler.vdfuse import ENTIRE_DISK, VDFuseOperations, _make_operations_class, mount_vdfuse
from tests.diskhandler.imagetools import qemu_check, qemu_flatten, run
from tests.diskhandler.test_operations import CHECKABLE, FORMATS, QEMU_NAMES

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MiB = 1 << 20


def gpt_disk(tmp_path: Path, fmt: str, size: int = 48 * MiB) -> tuple[Path, Path, list[tuple[int, int, int]]]:
    """A GPT disk with three partitions of distinct random data: (image, flat reference, layout)."""
    flat = tmp_path / "ref.raw"
    with flat.open("wb") as f:
        f.truncate(size)
    run("sgdisk", "-n", "1:2048:+8M", "-n", "2:0:+16M", "-n", "3:0:0", flat)
    layout = []
    out = run("sgdisk", "-p", flat)
    for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s", out, re.M):
        number, first, last = int(m[1]), int(m[2]), int(m[3])
        layout.append((number, first * 512, (last - first + 1) * 512))
    with flat.open("r+b") as f:
        for _number, start, length in layout:
            f.seek(start)
            f.write(os.urandom(length // 2))  # the second half of each partition stays a hole
    if fmt == "raw":
        image = tmp_path / "disk.raw"
        image.write_bytes(flat.read_bytes())
    else:
        image = tmp_path / f"disk.{fmt}"
        run("qemu-img", "convert", "-f", "raw", "-O", QEMU_NAMES[fmt], flat, image)
    return image, flat, layout


@pytest.mark.parametrize("fmt", FORMATS)
def test_files_match_the_image(tmp_path: Path, fmt: str) -> None:
    image, flat, layout = gpt_disk(tmp_path, fmt)
    ref = flat.read_bytes()
    mp = tmp_path / "mnt"
    mp.mkdir()
    with open_image(image) as disk:
        disk_size = disk.size
    with mount_vdfuse(image, mp, readonly=True) as m:
        assert m.files == [ENTIRE_DISK, "Partition1", "Partition2", "Partition3"]
        entire = (mp / ENTIRE_DISK).read_bytes()
        assert len(entire) == disk_size  # qemu's VHD rounds the size up to its CHS geometry
        assert entire[: len(ref)] == ref
        assert entire[len(ref) :] == bytes(disk_size - len(ref))
        for number, start, length in layout:
            part = mp / f"Partition{number}"
            assert part.stat().st_size == length
            assert part.read_bytes() == ref[start : start + length]
    assert not os.path.ismount(mp)


@pytest.mark.parametrize("fmt", FORMATS)
def test_writes_land_in_the_image(tmp_path: Path, fmt: str) -> None:
    image, flat, layout = gpt_disk(tmp_path, fmt)
    _number, start, length = layout[1]
    writes = [
        (0, os.urandom(4096)),
        (length - 3000, os.urandom(3000)),
        (length // 2 + 123, os.urandom(700_000)),
    ]
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp) as m:
        with (m.mountpoint / "Partition2").open("r+b") as f:
            for offset, data in writes:
                f.seek(offset)
                f.write(data)
        with (m.mountpoint / "Partition2").open("r+b", buffering=0) as raw:
            raw.seek(length)

            def write_past_the_end() -> None:
                raw.write(b"past the end")
                # with libfuse3's writeback cache the kernel takes the write, and fsync reports it
                os.fsync(raw.fileno())

            with pytest.raises(OSError, match="No space left") as info:
                write_past_the_end()
            assert info.value.errno == errno.ENOSPC
    expected = bytearray(flat.read_bytes())
    for offset, data in writes:
        expected[start + offset : start + offset + len(data)] = data
    if fmt in CHECKABLE:
        qemu_check(image, QEMU_NAMES[fmt])
    got = qemu_flatten(image, QEMU_NAMES[fmt], tmp_path / "after.raw").read_bytes()
    assert got[: len(expected)] == bytes(expected)


def test_entire_disk_and_partitions_exclude_each_other(tmp_path: Path) -> None:
    image, _flat, _layout = gpt_disk(tmp_path, "qcow2")
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp) as m:
        p1 = (m.mountpoint / "Partition1").open("rb")
        p2 = (m.mountpoint / "Partition2").open("r+b")  # two partitions at once are fine
        with pytest.raises(OSError, match="busy") as info:
            (m.mountpoint / ENTIRE_DISK).open("rb")
        assert info.value.errno == errno.EBUSY
        p1.close()
        with pytest.raises(OSError, match="busy") as info:
            (m.mountpoint / ENTIRE_DISK).open("rb")
        assert info.value.errno == errno.EBUSY
        p2.close()
        whole = (m.mountpoint / ENTIRE_DISK).open("rb")
        with pytest.raises(OSError, match="busy") as info:
            (m.mountpoint / "Partition3").open("rb")
        assert info.value.errno == errno.EBUSY
        whole2 = (m.mountpoint / ENTIRE_DISK).open("rb")  # EntireDisk twice is fine
        whole.close()
        whole2.close()
        (m.mountpoint / "Partition3").open("rb").close()


def test_readonly_view(tmp_path: Path) -> None:
    image, flat, _layout = gpt_disk(tmp_path, "vdi")
    before = image.read_bytes()
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp, readonly=True) as m:
        for name in (ENTIRE_DISK, "Partition1"):
            with pytest.raises(OSError, match="Read-only") as info:
                (m.mountpoint / name).open("r+b")
            assert info.value.errno == errno.EROFS
        assert (m.mountpoint / "Partition1").stat().st_mode & 0o777 == 0o444
        with pytest.raises(OSError, match="Read-only") as info:
            (m.mountpoint / "new-file").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        # a read-only view works while another process writes the image
        with open_image(image, writable=True):
            assert (m.mountpoint / "Partition1").read_bytes()[:4096] == flat.read_bytes()[MiB : MiB + 4096]
    assert image.read_bytes() == before


def test_mbr_logical_partitions_keep_their_numbers(tmp_path: Path) -> None:
    flat = tmp_path / "mbr.raw"
    with flat.open("wb") as f:
        f.truncate(64 * MiB)
    run(
        "parted", "-s", flat, "mklabel", "msdos",
        "mkpart", "primary", "1MiB", "9MiB",
        "mkpart", "extended", "9MiB", "63MiB",
        "mkpart", "logical", "10MiB", "20MiB",
        "mkpart", "logical", "21MiB", "40MiB",
        "mkpart", "logical", "41MiB", "62MiB",
    )  # fmt: skip
    rows = {}
    for line in run("parted", "-s", "-m", flat, "unit", "B", "print").splitlines():
        fields = line.split(":")
        if fields[0].isdigit():
            rows[int(fields[0])] = (int(fields[1][:-1]), int(fields[3][:-1]))
    assert sorted(rows) == [1, 2, 5, 6, 7]
    with flat.open("r+b") as f:
        for number, (start, _size) in rows.items():
            if number != 2:
                f.seek(start)
                f.write(f"partition {number}".encode())
    image = tmp_path / "mbr.vmdk"
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", flat, image)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp, readonly=True) as m:
        # the extended container (2) holds the logical partitions; it is not shown itself
        assert m.files == [ENTIRE_DISK, "Partition1", "Partition5", "Partition6", "Partition7"]
        for number in (1, 5, 6, 7):
            part = m.mountpoint / f"Partition{number}"
            assert part.stat().st_size == rows[number][1]
            with part.open("rb") as f:
                assert f.read(11) == f"partition {number}".encode()


def test_partitionless_disk_shows_only_entire_disk(tmp_path: Path) -> None:
    image = tmp_path / "bare.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp) as m:
        assert m.files == [ENTIRE_DISK]
        with (m.mountpoint / ENTIRE_DISK).open("r+b") as f:
            f.seek(5 * MiB)
            f.write(b"superfloppy")
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0x73 5242880 1", image)  # "s"
    qemu_check(image, "qcow2")


@pytest.mark.parametrize("fmt", ["vdi", "vhd", "vmdk", "qcow2"])
def test_kill_9_leaves_a_valid_image(tmp_path: Path, fmt: str) -> None:
    image, flat, layout = gpt_disk(tmp_path, fmt)
    _number, start, length = layout[2]
    data = os.urandom(4 * MiB)
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = mount_vdfuse(image, mp)
    f = (m.mountpoint / "Partition3").open("r+b")
    try:
        f.seek(length - len(data))  # into the hole: new blocks / clusters are allocated
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        m.process.kill()  # SIGKILL: no unmount, no destroy, no close
        m.process.wait()
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the server is gone
            f.close()
        m.unmount()
    assert not os.path.ismount(mp)
    if fmt in CHECKABLE:
        qemu_check(image, QEMU_NAMES[fmt])
    got = qemu_flatten(image, QEMU_NAMES[fmt], tmp_path / "after.raw").read_bytes()
    expected = bytearray(flat.read_bytes())
    expected[start + length - len(data) : start + length] = data
    assert got[: len(expected)] == bytes(expected)


def test_spawned_child_and_errors(tmp_path: Path) -> None:
    image, flat, _layout = gpt_disk(tmp_path, "qcow2")
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp, spawn=True) as m:
        assert m.files == [ENTIRE_DISK, "Partition1", "Partition2", "Partition3"]
        with (m.mountpoint / "Partition1").open("r+b") as f:
            f.write(b"spawned")
        with pytest.raises(ImageInUseError):
            mount_vdfuse(image, tmp_path)  # a second writable view of the same image
    qemu_check(image, "qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0x73 1048576 1", image)
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 4092)
    with pytest.raises(ImageFormatError):
        mount_vdfuse(broken, mp)
    with pytest.raises(ImageFormatError):
        mount_vdfuse(broken, mp, spawn=True)
    with pytest.raises(NotADirectoryError):
        mount_vdfuse(image, flat)
    assert not os.path.ismount(mp)


def test_command_line(tmp_path: Path) -> None:
    image, flat, layout = gpt_disk(tmp_path, "vdi")
    mp = tmp_path / "mnt"
    mp.mkdir()
    # without -f it daemonizes once the mount is up
    proc = subprocess.run(
        [sys.executable, "-m", "diskhandler.vdfuse", "-r", str(image), str(mp)],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        assert sorted(os.listdir(mp)) == [ENTIRE_DISK, "Partition1", "Partition2", "Partition3"]
        _n, start, length = layout[0]
        assert (mp / "Partition1").read_bytes() == flat.read_bytes()[start : start + length]
    finally:
        subprocess.run(["fusermount", "-u", str(mp)], check=True)
    deadline = time.monotonic() + 10
    while os.path.ismount(mp) and time.monotonic() < deadline:
        time.sleep(0.05)
    bad = subprocess.run(
        [sys.executable, "-m", "diskhandler.vdfuse", str(flat / "nope"), str(mp)],
        capture_output=True,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith(b"pyti-vdfuse: ")
    assert b"Traceback" not in bad.stderr


def test_errors_reach_fuse_as_errno(tmp_path: Path) -> None:
    import mfusepy

    image = tmp_path / "d.raw"
    with image.open("wb") as f:
        f.truncate(MiB)
    disk = open_image(image)
    core = VDFuseOperations(disk, [], readonly=True)
    ops = _make_operations_class()(core)
    try:
        cases = [
            (("read", "/Partition9", 10, 0, 0), errno.ENOENT),
            (("write", "/EntireDisk", b"x", 0, 0), errno.EROFS),
            (("open", "/EntireDisk", os.O_RDWR), errno.EROFS),
            (("truncate", "/EntireDisk", 5), errno.EROFS),
            (("mkdir", "/x", 0o755), errno.EROFS),
            (("readdir", "/EntireDisk", 0), errno.ENOTDIR),
        ]
        for (name, *args), expected in cases:
            with pytest.raises(mfusepy.FuseOSError) as info:
                getattr(ops, name)(*args)
            assert info.value.errno == expected, args
        assert ops.read("/EntireDisk", 4, MiB - 2, 0) == b"\0\0"
        os.truncate(image, 4096)  # the image shrinks under the reader: damaged data is EIO, not a traceback
        with pytest.raises(mfusepy.FuseOSError) as info:
            ops.read("/EntireDisk", 4096, 8192, 0)
        assert info.value.errno == errno.EIO
        assert isinstance(info.value.__cause__, ImageFormatError)
    finally:
        core.destroy("/")


def test_writes_are_cut_at_the_end_of_the_file(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    with image.open("wb") as f:
        f.truncate(MiB)
    disk = open_image(image, writable=True)
    core = VDFuseOperations(disk, [])
    try:
        assert core.write("/EntireDisk", b"xyz", MiB - 1, 0) == 1  # a short write, as on a block device
        assert core.read("/EntireDisk", 10, MiB - 1, 0) == b"x"
        assert core.read("/EntireDisk", 10, MiB, 0) == b""
        with pytest.raises(OSError, match="past the end") as info:
            core.write("/EntireDisk", b"x", MiB, 0)
        assert info.value.errno == errno.ENOSPC
    finally:
        core.destroy("/")
    assert image.read_bytes()[-1:] == b"x"


@pytest.mark.parametrize("fmt", ["vdi", "vhd", "vmdk", "qcow2"])
def test_snapshot_chain_shows_the_leaf_and_writes_only_it(tmp_path: Path, fmt: str) -> None:
    from diskhandler import create_image

    base, flat, layout = gpt_disk(tmp_path, fmt)
    base_bytes = base.read_bytes()
    child = tmp_path / f"child.{fmt}"
    create_image(
        child, parent=base
    ).close()  # a differencing image / overlay / delta link made by diskhandler
    _number, start, length = layout[0]
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(child, mp) as m:
        part = m.mountpoint / "Partition1"
        assert (
            part.read_bytes() == flat.read_bytes()[start : start + length]
        )  # the parent's data shows through
        with part.open("r+b") as f:
            f.write(b"only in the child")
    assert base.read_bytes() == base_bytes
    with open_image(child) as disk:
        assert disk.read_at(start, 17) == b"only in the child"
        assert disk.read_at(start + 17, 4096) == flat.read_bytes()[start + 17 : start + 17 + 4096]


@pytest.mark.parametrize("library", ["libfuse.so.2", "libfuse3.so.3"])
def test_both_libfuse_versions_serve_the_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: str
) -> None:
    """libfuse3 is preferred; libfuse2 is the fallback (FUSE_LIBRARY_PATH chooses, as in mfusepy)."""
    found = [
        p
        for p in (Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/x86_64-linux-gnu"))
        if (p / library).exists()
    ]
    if not found:
        pytest.skip(f"{library} is not installed")
    monkeypatch.setenv("FUSE_LIBRARY_PATH", str(found[0] / library))
    image, flat, layout = gpt_disk(tmp_path, "vdi")
    _number, start, length = layout[1]
    data = os.urandom(3 * MiB + 5)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with mount_vdfuse(image, mp, spawn=True) as m:  # a fresh interpreter loads the chosen library
        with (m.mountpoint / "Partition2").open("r+b") as f:
            f.seek(4096 + 1)  # unaligned: the kernel's writeback cache reads the pages around it
            f.write(data)
        assert (m.mountpoint / "Partition2").read_bytes()[4097 : 4097 + len(data)] == data
        assert library in Path(f"/proc/{m.process.pid}/maps").read_text()
    qemu_check(image, "vdi")
    got = qemu_flatten(image, "vdi", tmp_path / "after.raw").read_bytes()
    expected = bytearray(flat.read_bytes())
    expected[start + 4097 : start + 4097 + len(data)] = data
    assert got[: len(expected)] == bytes(expected)
    assert length > 4097 + len(data)
