"""A hostile guest filesystem never makes pyti read or write a host file.

The guest is built with the real tools an attacker has: ``mke2fs -d`` from a crafted tree (symbolic
links chained through ``.`` and ``..``, absolute links to the host's canary, loops, FIFOs, a socket, a
character device, names with newlines, invalid UTF-8 and 255 bytes), then ``debugfs`` for what a tree
cannot hold (a block device, a directory hard-linked into itself), then ``qemu-img convert`` to qcow2.
A canary folder on the host must stay exactly as it was, whatever is downloaded or uploaded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import DiskOperations, FilesystemError, GuestLinkWarning, ImageWarning
from tests.diskhandler.imagetools import run

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MiB = 1 << 20
CANARY = b"host canary: never read, never written\n"
ODD_NAMES = ["new\nline", os.fsdecode(b"bad-\xff\xfe-utf8"), "x" * 255, "-rf", "back\\slash", "..."]


class Host:
    """The host side of the attack: a canary folder whose every byte and name must survive."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        (folder / "canary.txt").write_bytes(CANARY)
        (folder / "sub").mkdir()
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int, bytes]]:
        found = {}
        for path in sorted(self.folder.parent.rglob("*")):
            if self.folder not in path.parents and path != self.folder:
                continue
            st = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            found[str(path)] = (st.st_mode, st.st_mtime_ns, data)
        return found

    def assert_untouched(self) -> None:
        assert self.snapshot() == self.before
        siblings = sorted(p.name for p in self.folder.parent.iterdir())
        assert "pwned" not in siblings
        assert "pwned.txt" not in siblings


def _guest_tree(root: Path, host: Host) -> None:
    """The crafted tree ``mke2fs -d`` copies into the guest filesystem."""
    climb = "../" * 12
    canary = host.folder / "canary.txt"
    (root / "tree").mkdir(parents=True)
    t = root / "tree"
    (t / "file.txt").write_bytes(b"a guest file\n")
    (t / "dir").mkdir()
    (t / "dir" / "inner.txt").write_bytes(b"inner\n")
    # The chain from the issue: a link to ".", then one through it to "..".
    (t / "a").symlink_to(".")
    (t / "b").symlink_to("a/..")
    (t / "c").symlink_to("b/" + host.folder.name)  # would reach the host canary folder through b
    (t / "d").symlink_to("dir/../a/a/a/../..")
    (t / "e").symlink_to("dir/..")  # inside: tree itself
    (t / "ab").symlink_to("dir/..")  # the same, sorted before "dir"
    (t / "ok-file").symlink_to("dir/inner.txt")  # inside
    (t / "ok-dir").symlink_to("dir")  # inside
    (t / "ok-via").symlink_to("ok-dir/inner.txt")  # inside, through another kept link
    (t / "abs").symlink_to(canary)  # absolute, to the real canary
    (t / "abs-dir").symlink_to(host.folder)
    (t / "root").symlink_to("/")
    (t / "climb").symlink_to(climb + str(canary).lstrip("/"))
    (t / "up").symlink_to("..")
    (t / "loop-1").symlink_to("loop-2")
    (t / "loop-2").symlink_to("loop-1")
    (t / "self").symlink_to("self")
    (t / "dangling").symlink_to("missing/../../..")
    (t / "via-abs").symlink_to("abs-dir/canary.txt")  # relative, through an absolute link
    (t / "dir" / "up2").symlink_to("../..")
    (t / "dir" / "up1").symlink_to("..")  # inside: tree itself
    os.mkfifo(t / "fifo")
    os.mknod(t / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(t / "sock"))
    sock.close()
    (t / "odd").mkdir()
    for name in ODD_NAMES:
        (t / "odd" / name).write_bytes(name.encode("utf-8", "surrogateescape"))
    (t / "loopdir").mkdir()
    (t / "broken").mkdir()
    # For uploads: guest directories that are links.
    (root / "up-root").symlink_to("/")
    (root / "up-climb").symlink_to(climb)
    (root / "up-host").symlink_to(host.folder)
    (root / "up-tree").symlink_to("tree/b")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_bytes(b"guest passwd\n")
    (root / "big").mkdir()
    with (root / "big" / "sparse.bin").open("wb") as f:  # 4 GiB claimed, nothing stored
        f.truncate(4 << 30)


def _build(tmp: Path, host: Host) -> Path:
    tree = tmp / "guest-tree"
    _guest_tree(tree, host)
    fs = tmp / "fs.raw"
    with fs.open("wb") as f:
        f.truncate(48 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", tree, fs)
    # debugfs takes the name of mknod and write literally: "/etc/passwd" becomes one name with slashes,
    # which the kernel refuses to list (EIO) - a directory nobody can read.
    commands = tmp / "debugfs.cmds"
    commands.write_text(
        "cd /tree\nmknod blk b 8 0\nln /tree/loopdir /tree/loopdir/again\n"
        f"cd /tree/broken\nmknod {host.folder}/canary.txt p\nwrite {tree}/etc/passwd {host.folder}/x\n"
    )
    run("debugfs", "-w", "-f", commands, fs)
    image = tmp / "hostile.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", fs, image)
    fs.unlink()
    return image


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Host]]:
    tmp = tmp_path_factory.mktemp("hostile")
    host = Host(tmp / "host-secrets")
    yield _build(tmp, host), host
    host.assert_untouched()


def _all_links_stay_inside(out: Path) -> None:
    real_out = out.resolve()
    for path in out.rglob("*"):
        if path.is_symlink():
            assert not os.readlink(path).startswith("/"), path
            assert os.path.exists(path), f"{path} dangles"
            assert Path(os.path.realpath(path)).is_relative_to(real_out), path


def test_tree_download_keeps_only_links_that_stay_inside(hostile: tuple[Path, Host], tmp_path: Path) -> None:
    image, host = hostile
    out = tmp_path / "copy"
    with DiskOperations(image, readonly=True) as d, pytest.warns(GuestLinkWarning) as caught:
        d.download("/tree", out)
    host.assert_untouched()
    _all_links_stay_inside(out)
    kept = sorted(p.name for p in out.iterdir() if p.is_symlink())
    assert kept == ["a", "ab", "e", "ok-dir", "ok-file", "ok-via"]
    assert sorted(p.name for p in (out / "dir").iterdir()) == ["inner.txt", "up1"]
    assert (out / "ok-via").read_bytes() == b"inner\n"
    assert (out / "file.txt").read_bytes() == b"a guest file\n"
    # special files are not copied; the directory loop is copied once
    for name in ("fifo", "null", "sock", "blk", "b", "c", "d", "abs", "climb", "root", "up", "self"):
        assert not os.path.lexists(out / name), name
    assert (out / "loopdir").is_dir()
    assert not os.path.lexists(out / "loopdir" / "again")
    warning = caught[0].message
    assert isinstance(warning, GuestLinkWarning)
    assert "leaves the destination" in warning.skipped["/tree/b"]
    assert "absolute" in warning.skipped["/tree/abs"]
    assert "loops" in warning.skipped["/tree/self"]
    assert "nowhere" in warning.skipped["/tree/dangling"]
    assert "filesystem loops" in warning.skipped["/tree/loopdir/again"]
    for name in ("fifo", "null", "sock", "blk"):
        assert "not a regular file" in warning.skipped[f"/tree/{name}"]
    assert "cannot be listed" in warning.skipped["/tree/broken"]
    names = "blk fifo null sock broken loopdir/again b c d abs abs-dir root climb up loop-1 loop-2 self"
    names += " dangling via-abs dir/up2"
    assert sorted(warning.skipped) == sorted(f"/tree/{n}" for n in names.split())
    assert "skipped 20 entries" in str(warning)
    assert "/tree/abs" in str(warning)
    assert (out / "broken").is_dir()


def test_odd_names_are_copied_byte_for_byte(hostile: tuple[Path, Host], tmp_path: Path) -> None:
    image, _host = hostile
    out = tmp_path / "odd"
    with DiskOperations(image, readonly=True) as d:
        assert sorted(d.listdir("/tree/odd")) == sorted(ODD_NAMES)
        d.download("/tree/odd", out)
        d.get_file("/tree/odd/new\nline", tmp_path / "single")
    for name in ODD_NAMES:
        assert (out / name).read_bytes() == name.encode("utf-8", "surrogateescape")
    assert (tmp_path / "single").read_bytes() == b"new\nline"


def test_downloads_into_a_used_destination_never_follow_its_links(
    hostile: tuple[Path, Host], tmp_path: Path
) -> None:
    """What one download left (a link to "."), the next cannot use to climb out."""
    image, host = hostile
    out = tmp_path / "copy"
    with DiskOperations(image, readonly=True) as d:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GuestLinkWarning)
            d.download("/tree", out)
            d.download("/tree", out)  # again, over itself: same result, nothing followed
        _all_links_stay_inside(out)
        # A file downloaded to a path through a kept link lands inside the copy.
        d.download("/tree/file.txt", out / "a" / "again.txt")
        assert (out / "again.txt").read_bytes() == b"a guest file\n"
        # A tree whose directory has the name of a kept link is not written through it.
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "dir").symlink_to(host.folder)  # the user's own link, say
        with pytest.raises(FilesystemError, match="never writes through a link"):
            d.download("/tree", tmp_path / "other")
    host.assert_untouched()
    _all_links_stay_inside(out)


def test_single_special_files_are_refused_at_once(hostile: tuple[Path, Host], tmp_path: Path) -> None:
    image, host = hostile
    with DiskOperations(image, readonly=True) as d:
        for name in ("fifo", "null", "sock", "blk"):
            with pytest.raises(FilesystemError, match="regular"):
                d.get_file(f"/tree/{name}", tmp_path / name)
            assert not os.path.lexists(tmp_path / name)
        with pytest.raises(FileNotFoundError):  # absolute link re-rooted into the guest
            d.get_file("/tree/abs", tmp_path / "abs")
        with pytest.raises(FileNotFoundError):
            d.get_file("/tree/climb", tmp_path / "climb")
        d.get_file("/tree/b/tree/file.txt", tmp_path / "through-b")  # "a/.." is the guest's /
        # Into a folder: the guest names the file; a link there by that name is replaced, not followed.
        (tmp_path / "into").mkdir()
        (tmp_path / "into" / "file.txt").symlink_to(host.folder / "canary.txt")
        d.get_file("/tree/file.txt", tmp_path / "into")
    assert (tmp_path / "through-b").read_bytes() == b"a guest file\n"
    assert not (tmp_path / "into" / "file.txt").is_symlink()
    assert (tmp_path / "into" / "file.txt").read_bytes() == b"a guest file\n"
    host.assert_untouched()


def test_uploads_through_guest_links_stay_in_the_guest(tmp_path: Path) -> None:
    host = Host(tmp_path / "host-secrets")
    image = _build(tmp_path, host)
    payload = tmp_path / "payload"
    (payload / "deep").mkdir(parents=True)
    (payload / "pwned.txt").write_bytes(b"payload\n")
    (payload / "deep" / "pwned.txt").write_bytes(b"deep payload\n")
    with DiskOperations(image) as d:
        d.upload(payload, "/up-climb/pwned")  # ../../.. from / is /
        d.upload(payload / "pwned.txt", "/up-root/etc/passwd")  # the guest's /etc/passwd
        d.upload(payload, "/up-tree/via-b")  # tree/b -> a/.. is the guest's /
        with pytest.raises(FileNotFoundError):  # the host folder's path does not exist in the guest
            d.upload(payload, "/up-host/pwned")
        d.put_file(payload / "pwned.txt", "/tree/dir/up2/dropped.txt")  # ../.. from /tree/dir
        listing = d.listdir("/")
    assert {"pwned", "via-b", "dropped.txt"} <= set(listing)
    fs = tmp_path / "check.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, fs)
    # e2fsck finds the debugfs-made directory loop (exit 4), and nothing it did not know before.
    checked = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True, check=False)
    assert checked.returncode in (0, 4), checked.stdout
    dumped = tmp_path / "dumped"
    run("debugfs", "-R", f"dump /pwned/deep/pwned.txt {dumped}", fs)
    assert dumped.read_bytes() == b"deep payload\n"
    run("debugfs", "-R", f"dump /etc/passwd {dumped}", fs)
    assert dumped.read_bytes() == b"payload\n"
    host.assert_untouched()


def test_walk_and_find_end_on_a_directory_linked_into_itself(hostile: tuple[Path, Host]) -> None:
    image, _host = hostile
    with DiskOperations(image, readonly=True) as d:
        walked = [top for top, _dirs, _files in d.walk("/tree/loopdir")]
        with pytest.warns(ImageWarning, match="/tree/broken"):
            found = d.find("/tree", withdirs=True)
        with pytest.raises(FilesystemError, match="cannot be listed"):
            d.listdir("/tree/broken")
    assert walked == ["/tree/loopdir"]
    assert "/tree/loopdir" in found
    assert "/tree/loopdir/again" not in found


def test_a_destination_link_where_a_guest_directory_goes_stops_the_download_before_any_write(
    hostile: tuple[Path, Host], tmp_path: Path
) -> None:
    """``ab -> dir/..`` stays inside only while ``dir`` is a directory: with the user's own link
    ``dir -> elsewhere`` already in the destination it would lead out, so nothing is written at all."""
    image, host = hostile
    out = tmp_path / "out"
    out.mkdir()
    (out / "dir").symlink_to(host.folder / "sub")
    with DiskOperations(image, readonly=True) as d, pytest.raises(FilesystemError, match="dir"):
        d.download("/tree", out)
    assert sorted(p.name for p in out.iterdir()) == ["dir"]
    host.assert_untouched()


def test_an_io_disk_rewritten_as_qcow2_never_reads_a_host_file(tmp_path: Path) -> None:
    """The guest owns its raw IO disk's bytes: it can write a qcow2 header there whose backing file is
    a host file. Reading the results back must not probe the format (qemu's old format-probing hole):
    the IO disk is raw because the host made it raw."""
    from pyti_core import manager
    from pyti_core.tasks import GuestLayout

    secret_tree = tmp_path / "secret-tree"
    (secret_tree / GuestLayout().results).mkdir(parents=True)
    (secret_tree / GuestLayout().results / "records.jsonl").write_bytes(b"HOST SECRET\n")
    secret = tmp_path / "host-secret.img"
    with secret.open("wb") as f:
        f.truncate(8 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext2", "-d", secret_tree, secret)
    io_disk = tmp_path / "io.img"
    run("qemu-img", "create", "-f", "qcow2", "-b", secret, "-F", "raw", io_disk)
    dest = tmp_path / "results"
    with pytest.raises((FilesystemError, OSError)):
        manager._download_results(io_disk, GuestLayout(), dest)
    assert not (dest / "records.jsonl").exists()


def test_a_sparse_file_cannot_fill_the_host_disk(hostile: tuple[Path, Host], tmp_path: Path) -> None:
    image, _host = hostile
    with DiskOperations(image, readonly=True) as d:
        assert d.stat("/big/sparse.bin").st_size == 4 << 30
        with pytest.raises(FilesystemError, match="more than the") as info:
            d.download("/big", tmp_path / "big", max_bytes=image.stat().st_size)
        assert info.value.errno == errno.EFBIG
        with pytest.raises(FilesystemError, match="more than the"):
            d.get_file("/big/sparse.bin", tmp_path / "one", max_bytes=1 << 20)
    assert not (tmp_path / "one").exists()
    assert not (tmp_path / "big").exists()


# -- the link rule as a property, without a guest: any tree of links, judged, then made for real ------

_NAMES = ["a", "b", "c"]
_STEPS = st.sampled_from(["..", ".", "a", "b", "c", "x", ""])


@st.composite
def _trees(draw: st.DrawFn) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    paths: dict[str, str] = {}  # rel path -> "dir" | "file" | "link"
    for _ in range(draw(st.integers(1, 14))):
        parents = [p for p, kind in paths.items() if kind == "dir"]
        parent = draw(st.sampled_from(["", *parents]))
        rel = f"{parent}/{draw(st.sampled_from(_NAMES))}" if parent else draw(st.sampled_from(_NAMES))
        if rel not in paths:
            paths[rel] = draw(st.sampled_from(["dir", "dir", "file", "link", "link", "link"]))
    links = {
        rel: ("/" if draw(st.booleans()) and draw(st.booleans()) else "")
        + "/".join(draw(st.lists(_STEPS, min_size=1, max_size=6)))
        for rel, kind in paths.items()
        if kind == "link"
    }
    entries = sorted(((rel, kind, 0) for rel, kind in paths.items()), key=lambda e: e[0].count("/"))
    return entries, {k: v for k, v in links.items() if v}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees())
def test_kept_links_always_lead_to_an_entry_inside(
    tmp_path_factory: pytest.TempPathFactory, tree: tuple[list[tuple[str, str, int]], dict[str, str]]
) -> None:
    from diskhandler.operations import _HostTree

    entries, links = tree
    entries = [e for e in entries if e[1] != "link" or e[0] in links]
    top = tmp_path_factory.mktemp("rule")
    out = top / "out"
    out.mkdir()
    (top / "outside").mkdir()
    with _HostTree(out) as host_tree:
        kept, _refused = host_tree.plan_links(entries, links)
        for rel, kind, _size in entries:
            if kind == "dir":
                host_tree.mkdir(rel)
            elif kind == "file":
                (out / rel).write_bytes(b"")
            elif rel in kept:
                host_tree.symlink(links[rel], rel)
    real_out = out.resolve()
    for rel in kept:
        path = out / rel
        assert os.path.exists(path), f"{rel} -> {links[rel]} dangles"
        assert Path(os.path.realpath(path)).is_relative_to(real_out), f"{rel} -> {links[rel]} leads out"
    assert sorted(p.name for p in top.iterdir()) == ["out", "outside"]
    assert not any((top / "outside").iterdir())


def test_a_link_asking_a_file_to_be_a_directory_dangles_and_is_skipped(tmp_path: Path) -> None:
    """Found by the property above: ``b -> a/.`` (or ``a/``) with ``a`` a file leads nowhere."""
    from diskhandler.operations import _HostTree

    entries = [("a", "file", 0), ("d", "dir", 0), ("b", "link", 0), ("c", "link", 0), ("e", "link", 0)]
    links = {"b": "a/.", "c": "a/", "e": "d/."}
    with _HostTree(tmp_path) as host_tree:
        kept, refused = host_tree.plan_links(entries, links)
    assert kept == {"e"}
    assert sorted(rel for rel, _why in refused) == ["b", "c"]


def _materialize(out: Path, entries: list[tuple[str, str, int]], links: dict[str, str]) -> None:
    """What download() writes for a planned tree (files empty), through the same _HostTree."""
    from diskhandler.operations import _HostTree

    empty = os.open(os.devnull, os.O_RDONLY)
    try:
        with _HostTree(out) as host_tree:
            kept, _refused = host_tree.plan_links(entries, links)
            for rel, kind, _size in entries:
                if kind == "dir":
                    host_tree.mkdir(rel)
                elif kind == "file":
                    host_tree.write_file(rel, empty, 0, lambda _d, _t: None)
                elif rel in kept:
                    host_tree.symlink(links[rel], rel)
    finally:
        os.close(empty)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=_trees(), second=_trees())
def test_a_second_download_never_turns_a_link_outward(
    tmp_path_factory: pytest.TempPathFactory,
    first: tuple[list[tuple[str, str, int]], dict[str, str]],
    second: tuple[list[tuple[str, str, int]], dict[str, str]],
) -> None:
    top = tmp_path_factory.mktemp("twice")
    out = top / "out"
    out.mkdir()
    for all_entries, links in (first, second):
        entries = [e for e in all_entries if e[1] != "link" or e[0] in links]
        with contextlib.suppress(FilesystemError, IsADirectoryError):  # a clash stops it: fine
            _materialize(out, entries, links)
    real_out = out.resolve()
    for path in out.rglob("*"):
        if path.is_symlink() and os.path.exists(path):
            assert Path(os.path.realpath(path)).is_relative_to(real_out), f"{path} -> {os.readlink(path)}"
    assert sorted(p.name for p in top.iterdir()) == ["out"]


def test_folders_nested_past_the_walk_limit_end_the_walk_not_the_host(tmp_path: Path) -> None:
    """1500 nested folders (debugfs makes them; PATH_MAX allows 2000): walks used to recurse once per
    level into a ``RecursionError``, and a download to spend minutes on paths walked from the root."""
    from diskhandler.operations import MAX_WALK_DEPTH

    host = Host(tmp_path / "host-secrets")
    image = tmp_path / "deep.raw"
    with image.open("wb") as f:
        f.truncate(32 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", image)
    (tmp_path / "leaf").write_bytes(b"leaf\n")
    commands = tmp_path / "deep.cmds"
    commands.write_text("mkdir a\ncd a\n" * 1500 + f"write {tmp_path / 'leaf'} leaf\n")
    run("debugfs", "-w", "-f", commands, image)
    out = tmp_path / "out"
    with DiskOperations(image, readonly=True) as d:
        with pytest.warns(ImageWarning, match=f"deeper than {MAX_WALK_DEPTH}"):
            walked = [top for top, _dirs, _files in d.walk("/a")]
        assert len(walked) == MAX_WALK_DEPTH + 1
        with pytest.warns(ImageWarning, match="deeper than"):
            assert d.find("/a") == []
        with pytest.warns(GuestLinkWarning) as caught:
            d.download("/a", out)
    warning = caught[0].message
    assert isinstance(warning, GuestLinkWarning)
    [(where, why)] = warning.skipped.items()
    assert where == "/a" * (MAX_WALK_DEPTH + 2)
    assert f"deeper than {MAX_WALK_DEPTH}" in why
    assert (out / "/".join(["a"] * MAX_WALK_DEPTH)).is_dir()
    assert not (out / "/".join(["a"] * (MAX_WALK_DEPTH + 1))).exists()
    host.assert_untouched()


def test_removing_a_folder_linked_into_itself_is_a_typed_error(tmp_path: Path) -> None:
    """``shutil.rmtree`` (Python 3.11, 3.12) recurses once per level: a folder hard-linked into itself,
    or nested 1500 deep, was a ``RecursionError`` out of ``remove``."""
    image = tmp_path / "loop.raw"
    with image.open("wb") as f:
        f.truncate(32 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", image)
    commands = tmp_path / "loop.cmds"
    commands.write_text("mkdir loopdir\nln /loopdir /loopdir/again\nmkdir keep\n")
    run("debugfs", "-w", "-f", commands, image)
    with DiskOperations(image) as d:
        with pytest.raises(FilesystemError, match="loops or is nested too deep") as info:
            d.remove("/loopdir", recursive=True)
        assert info.value.errno == errno.ELOOP
        assert "keep" in d.listdir("/")
