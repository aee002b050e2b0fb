"""DiskOperations' file operations beyond the two transfer primitives: walk/find/glob, bytes and text,
open, rename, chmod/chown, symlinks, recursive put/get, and the Jupyter view.

The disk is an ext4 VDI made by ``create_io_disk`` (mke2fs -d); what diskhandler writes is judged by
``debugfs`` and ``e2fsck -fn`` on the filesystem cut out of ``qemu-img convert``'s flat copy.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from diskhandler.create import create_io_disk
from diskhandler.errors import FilesystemError, GuestPathError
from diskhandler.operations import DiskOperations
from tests.diskhandler.imagetools import qemu_check, qemu_flatten, run

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MiB = 1 << 20


def make_disk(tmp_path: Path) -> Path:
    files = tmp_path / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("guest\n")
    (files / "data" / "deep" / "er").mkdir(parents=True)
    (files / "data" / "a.csv").write_text("x,y\n1,2\n")
    (files / "data" / "deep" / "b.csv").write_text("x,y\n3,4\n")
    (files / "data" / "deep" / "er" / "c.txt").write_text("c")
    (files / "data" / "<i>odd & name").write_text("html")
    image = tmp_path / "disk.vdi"
    create_io_disk(image, 64 * MiB, format="vdi", filesystem="ext4", files=files, partition_table="mbr")
    return image


def check_filesystem(image: Path, tmp_path: Path) -> Path:
    """qemu-img check, then e2fsck -fn on the partition; the partition's filesystem as a file."""
    qemu_check(image, "vdi")
    flat = qemu_flatten(image, "vdi", tmp_path / "flat.raw")
    fs = tmp_path / "fs.raw"
    with flat.open("rb") as src, fs.open("wb") as out:
        src.seek(MiB)  # create_io_disk's partition starts at 1 MiB
        while chunk := src.read(4 * MiB):
            out.write(chunk)
    run("e2fsck", "-fn", fs)
    return fs


def test_walk_find_glob(tmp_path: Path) -> None:
    with DiskOperations(make_disk(tmp_path), readonly=True) as d:
        walked = list(d.walk("/data"))
        assert walked[0] == ("/data", ["deep"], ["<i>odd & name", "a.csv"])
        assert [w[0] for w in walked] == ["/data", "/data/deep", "/data/deep/er"]
        assert [w[0] for w in d.walk("/data", maxdepth=1)] == ["/data"]
        assert [w[0] for w in d.walk("/data", topdown=False)] == ["/data/deep/er", "/data/deep", "/data"]
        assert d.find("/data") == [
            "/data/<i>odd & name", "/data/a.csv", "/data/deep/b.csv", "/data/deep/er/c.txt",
        ]  # fmt: skip
        assert d.find("/data", withdirs=True, maxdepth=1) == ["/data", "/data/<i>odd & name",
                                                             "/data/a.csv", "/data/deep"]  # fmt: skip
        assert d.find("/etc/hostname") == ["/etc/hostname"]
        assert d.find("/nope") == []
        assert d.glob("/data/*.csv") == ["/data/a.csv"]
        assert d.glob("/data/**/*.csv") == ["/data/a.csv", "/data/deep/b.csv"]
        assert d.glob("/**/c.txt") == ["/data/deep/er/c.txt"]
        assert d.glob("/data/deep/?.csv") == ["/data/deep/b.csv"]
        assert d.glob("/data/[ab].csv") == ["/data/a.csv"]
        assert d.glob("/data/[!a].csv") == []
        assert d.glob("/etc/hostname") == ["/etc/hostname"]
        assert d.glob("/etc/nope*") == []
        with pytest.raises(NotADirectoryError):
            list(d.walk("/etc/hostname"))
        with pytest.raises(FileNotFoundError):
            list(d.walk("/missing"))


def test_bytes_text_open_and_errors(tmp_path: Path) -> None:
    image = make_disk(tmp_path)
    with DiskOperations(image) as d:
        assert d.read_text("/etc/hostname") == "guest\n"
        assert d.read_bytes("/etc/hostname", 1, 3) == b"ue"
        assert d.read_bytes("/etc/hostname", -3) == b"st\n"
        d.write_bytes("/data/new.bin", b"\x00\xff" * 5000, mode=0o600)
        d.write_text("/data/new.txt", "grüße\n")
        with d.open("/data/new.txt", "a") as f:
            f.write("more\n")
        with d.open("/data/new.txt", "r") as f:
            assert f.read() == "grüße\nmore\n"
        with pytest.raises(FileExistsError):
            d.open("/data/new.txt", "xb")
        with d.open("/data/fresh.bin", "xb") as f:
            f.write(b"x")
        with pytest.raises(ValueError, match="unsupported mode"):
            d.open("/data/new.txt", "r+b")
        with pytest.raises(IsADirectoryError):
            d.open("/data", "rb")
        with pytest.raises(FileNotFoundError):
            d.read_bytes("/data/missing")
        with pytest.raises(FileNotFoundError):
            d.write_bytes("/no/such/dir/file", b"")
        assert stat.S_IMODE(d.stat("/data/new.bin").st_mode) == 0o600
    with DiskOperations(image, readonly=True) as d:
        with pytest.raises(FilesystemError) as info:
            d.write_text("/data/x", "no")
        assert info.value.errno == errno.EROFS
    fs = check_filesystem(image, tmp_path)
    out = tmp_path / "new.bin"
    run("debugfs", "-R", f"dump /data/new.bin {out}", fs)
    assert out.read_bytes() == b"\x00\xff" * 5000


def test_rename_chmod_chown_symlinks(tmp_path: Path) -> None:
    image = make_disk(tmp_path)
    with DiskOperations(image) as d:
        d.rename("/data/a.csv", "/data/deep/a2.csv")
        assert not d.exists("/data/a.csv")
        d.mv("/data/deep/er", "/er")
        assert d.read_text("/er/c.txt") == "c"
        with pytest.raises(FileNotFoundError):
            d.rename("/data/nothing", "/x")
        d.chmod("/er/c.txt", 0o640)
        d.chown("/er/c.txt", 1234, 5678)
        st = d.stat("/er/c.txt")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
        # an absolute link is resolved inside the guest, never on the host
        d.symlink("/etc/hostname", "/data/host-link")
        assert d.readlink("/data/host-link") == "/etc/hostname"
        assert d.islink("/data/host-link")
        assert d.read_text("/data/host-link") == "guest\n"
        d.symlink("/etc/passwd", "/data/escape")  # the host has /etc/passwd; the guest does not
        with pytest.raises(FileNotFoundError):
            d.read_bytes("/data/escape")
        d.rename("/data/host-link", "/data/renamed-link")  # the link itself moves
        assert d.readlink("/data/renamed-link") == "/etc/hostname"
        with pytest.raises(FileExistsError):
            d.symlink("x", "/data/renamed-link")
        with pytest.raises(FilesystemError, match="not a symlink"):
            d.readlink("/etc/hostname")
        with pytest.raises(GuestPathError, match="root"):
            d.rename("/", "/x")
    fs = check_filesystem(image, tmp_path)
    listing = run("debugfs", "-R", "stat /data/renamed-link", fs)
    assert 'Fast link dest: "/etc/hostname"' in listing
    assert "User:  1234   Group:  5678" in run("debugfs", "-R", "stat /er/c.txt", fs)


def test_recursive_put_and_get(tmp_path: Path) -> None:
    image = make_disk(tmp_path)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("f")
    with DiskOperations(image) as d:
        with pytest.raises(IsADirectoryError):
            d.put(tree, "/tree")
        d.put(tree, "/tree", recursive=True)
        d.put(tree / "sub" / "f.txt", "/single.txt")
        assert d.find("/tree") == ["/tree/sub/f.txt"]
        with pytest.raises(IsADirectoryError):
            d.get("/data", tmp_path / "out")
        d.get("/data", tmp_path / "out", recursive=True)
        d.get("/single.txt", tmp_path / "single.txt")
    assert (tmp_path / "out" / "deep" / "er" / "c.txt").read_text() == "c"
    assert (tmp_path / "single.txt").read_text() == "f"


def test_repr_html(tmp_path: Path) -> None:
    d = DiskOperations(make_disk(tmp_path), readonly=True)
    assert "not mounted" in d._repr_html_()
    with d:
        page = d._repr_html_()
        assert "ext on partition 1 (read-only, fuse)" in page
        assert "<code>data/</code>" in page
        assert "<code>etc/</code>" in page
        assert "used of" in page
        listing = d._listing_html("/data", limit=1)
        assert "&lt;i&gt;odd &amp; name" in listing  # guest names are escaped
        assert "<i>" not in listing
        assert "… 2 more" in listing
