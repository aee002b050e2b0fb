"""Hostile guests: symlinks and ``..`` never reach the host.

diskhandler resolves guest paths with chroot semantics (like ``openat2``'s ``RESOLVE_IN_ROOT``): ``..``
stops at the guest's root and an absolute symlink target is re-rooted into the guest. A canary file on
the host proves that nothing there is read or written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest

from diskhandler.errors import FilesystemError, GuestLinkWarning, GuestPathError
from diskhandler.operations import MAX_SYMLINK_HOPS, DiskOperations
from tests.diskhandler.imagetools import run
from tests.diskhandler.test_operations import Disk, build_disk, debugfs_dump

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

CANARY_TEXT = b"host canary: must never be read or changed\n"


class Hostile:
    def __init__(self, disk: Disk, canary: Path, canary_dir: Path) -> None:
        self.disk = disk
        self.canary = canary
        self.canary_dir = canary_dir
        self.canary_stat = canary.stat()

    def assert_host_untouched(self) -> None:
        assert self.canary.read_bytes() == CANARY_TEXT
        st = self.canary.stat()
        assert (st.st_mtime_ns, st.st_size, st.st_ino) == (
            self.canary_stat.st_mtime_ns,
            self.canary_stat.st_size,
            self.canary_stat.st_ino,
        )
        assert sorted(p.name for p in self.canary_dir.iterdir()) == ["canary.txt"]


@pytest.fixture
def hostile(tmp_path: Path) -> Hostile:
    canary_dir = tmp_path / "host-secrets"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_bytes(CANARY_TEXT)
    up = "../" * (len(canary.parts) + 3)
    g = tmp_path / "guest"
    (g / "root").mkdir(parents=True)
    (g / "etc").mkdir()
    (g / "etc" / "passwd").write_bytes(b"guest passwd\n")
    (g / "root" / "evil").symlink_to(canary)  # absolute, to a host file that exists
    (g / "root" / "passwd").symlink_to("/etc/passwd")
    (g / "root" / "climb").symlink_to(up + str(canary).lstrip("/"))  # relative, climbing out
    (g / "root" / "etc-up").symlink_to("../../../../etc")  # the brief's ../../../../etc
    (g / "root" / "hostdir").symlink_to(canary_dir)  # a host directory
    (g / "root" / "hostroot").symlink_to("/")
    (g / "root" / "loop-a").symlink_to("loop-b")
    (g / "root" / "loop-b").symlink_to("loop-a")
    for i in range(MAX_SYMLINK_HOPS + 1):  # chain-0 -> chain-1 -> ... -> chain-41 (a file)
        (g / "root" / f"chain-{i}").symlink_to(f"chain-{i + 1}")
    (g / "root" / f"chain-{MAX_SYMLINK_HOPS + 1}").write_bytes(b"end of chain\n")
    os.mknod(g / "root" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    disk = build_disk(tmp_path, "qcow2", "gpt", files=g)
    return Hostile(disk, canary, canary_dir)


def test_absolute_symlink_is_rerooted_into_the_guest(hostile: Hostile, tmp_path: Path) -> None:
    with DiskOperations(hostile.disk.path) as d:
        with pytest.raises(FileNotFoundError):  # the guest has no such file: the host's is not used
            d.download("/root/evil", tmp_path / "got")
        d.download("/root/passwd", tmp_path / "passwd")
        assert (tmp_path / "passwd").read_bytes() == b"guest passwd\n"
        with pytest.raises(FileNotFoundError):
            d.download("/root/climb", tmp_path / "got")
        # ``..`` past the root stays at the root
        d.download("/../../../../etc/passwd", tmp_path / "dots")
        d.download("/root/../../../etc/./passwd", tmp_path / "dots2")
    assert (tmp_path / "dots").read_bytes() == (tmp_path / "dots2").read_bytes() == b"guest passwd\n"
    assert not (tmp_path / "got").exists()
    hostile.assert_host_untouched()


def test_uploads_through_hostile_links_stay_in_the_guest(hostile: Hostile, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(b"payload\n")
    with DiskOperations(hostile.disk.path) as d:
        with pytest.raises(FileNotFoundError):  # the re-rooted parent directories do not exist in the guest
            d.upload(src, "/root/evil")
        with pytest.raises(FileNotFoundError):
            d.upload(src, "/root/hostdir/new.txt")
        d.upload(src, "/root/etc-up/written-via-link")  # ../../../../etc from /root is the guest's /etc
        d.upload(src, "/root/passwd")  # /etc/passwd, re-rooted: the guest's file is replaced
        d.mkdir("/root/hostroot/made-here")  # "/" re-rooted: the guest's root
        assert d.listdir("/root/hostroot") == ["etc", "lost+found", "made-here", "root"]
        d.remove("/root/evil")  # the link itself goes; nothing it pointed at
        assert not d.exists("/root/evil")
    fs = hostile.disk.check(tmp_path)
    assert debugfs_dump(fs, "/etc/written-via-link", tmp_path / "a") == b"payload\n"
    assert debugfs_dump(fs, "/etc/passwd", tmp_path / "b") == b"payload\n"
    assert "made-here" in run("debugfs", "-R", "ls /", fs)
    assert not Path("/etc/written-via-link").exists()
    hostile.assert_host_untouched()


def test_symlink_loops_and_long_chains(hostile: Hostile, tmp_path: Path) -> None:
    with DiskOperations(hostile.disk.path, readonly=True) as d:
        with pytest.raises(GuestPathError, match="symlinks") as info:
            d.download("/root/loop-a", tmp_path / "x")
        assert info.value.errno == errno.ELOOP
        with pytest.raises(GuestPathError):
            d.stat("/root/chain-0")  # 41 hops
        assert d.stat("/root/chain-1").st_size == len(b"end of chain\n")  # 40 hops: allowed
        assert stat.S_ISLNK(d.stat("/root/loop-a", follow_symlinks=False).st_mode)
        assert isinstance(info.value, PermissionError)  # GuestPathError is a PermissionError


def test_device_nodes_are_never_opened(hostile: Hostile, tmp_path: Path) -> None:
    with DiskOperations(hostile.disk.path) as d:
        assert stat.S_ISCHR(d.stat("/root/null").st_mode)
        with pytest.raises(FilesystemError, match="regular"):
            d.download("/root/null", tmp_path / "null")
        src = tmp_path / "x"
        src.write_bytes(b"x")
        with pytest.raises(FilesystemError, match="not a regular file"):
            d.upload(src, "/root/null")
    assert not (tmp_path / "null").exists()


def test_tree_download_never_links_to_the_host(hostile: Hostile, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    with DiskOperations(hostile.disk.path, readonly=True) as d, pytest.warns(GuestLinkWarning) as caught:
        d.download("/root", out)
    skipped = caught[0].message.skipped  # type: ignore[union-attr]
    assert "absolute" in skipped["/root/evil"]
    assert "leaves the destination" in skipped["/root/climb"]
    assert "loops" in skipped["/root/loop-a"]
    assert "loops" in skipped["/root/loop-b"]
    for path in out.rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            assert not target.startswith("/")
            lexical = Path(os.path.normpath(path.parent / target))
            assert lexical.is_relative_to(out)  # relative and inside the copied tree
        assert not stat.S_ISCHR(path.lstat().st_mode)
    assert (out / "chain-41").read_bytes() == b"end of chain\n"
    assert not (out / "evil").exists()
    assert not (out / "evil").is_symlink()
    hostile.assert_host_untouched()
    digest = hashlib.sha256(CANARY_TEXT).hexdigest()
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert hashlib.sha256(path.read_bytes()).hexdigest() != digest
