"""DiskOperations: the original PyTI example on every format and partitioning, large files, trees,
owners and modes, full filesystems, and clear errors.

Disks are made by the reference tools (parted / sgdisk, ``mke2fs -d``, ``qemu-img convert``); after
diskhandler has written them, ``qemu-img check``, ``e2fsck -fn`` and ``debugfs`` judge the result.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from diskhandler import open_image
from diskhandler.create import create_io_disk
from diskhandler.errors import FilesystemError, GuestLinkWarning, MissingDependencyError
from diskhandler.filesystems import detect_filesystem_bytes
from diskhandler.operations import DiskOperations
from tests.diskhandler.imagetools import qemu_check, qemu_flatten, run

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MiB = 1 << 20
FORMATS = ["raw", "vdi", "vhd", "vmdk", "qcow2"]
QEMU_NAMES = {"raw": "raw", "vdi": "vdi", "vhd": "vpc", "vmdk": "vmdk", "qcow2": "qcow2"}
# qemu-img check has no checker for raw and vpc; those are judged by flattening and e2fsck alone.
CHECKABLE = {"vdi", "vmdk", "qcow2"}
SCHEMES = ["mbr", "gpt", None]


class Disk:
    """A test disk: the image, its format, and where its ext4 filesystem lies."""

    def __init__(self, path: Path, fmt: str, start: int, size: int) -> None:
        self.path = path
        self.fmt = fmt
        self.start = start
        self.size = size

    def flat(self, dest: Path) -> Path:
        """The whole disk as a raw file (qemu-img convert; a raw image is its own flat copy)."""
        if self.fmt == "raw":
            return self.path
        return qemu_flatten(self.path, QEMU_NAMES[self.fmt], dest)

    def filesystem(self, dest: Path) -> Path:
        """The filesystem's byte range cut out into ``dest``."""
        flat = self.flat(dest.with_suffix(".flat"))
        with flat.open("rb") as src, dest.open("wb") as out:
            src.seek(self.start)
            left = self.size
            while left:
                chunk = src.read(min(left, 4 * MiB))
                assert chunk, "flat image shorter than the partition"
                out.write(chunk)
                left -= len(chunk)
        if flat != self.path:
            flat.unlink()
        return dest

    def check(self, tmp_path: Path) -> Path:
        """qemu-img check (non-raw) and e2fsck -fn; returns the extracted filesystem for debugfs."""
        if self.fmt in CHECKABLE:
            qemu_check(self.path, QEMU_NAMES[self.fmt])
        fs = self.filesystem(tmp_path / "fs.ext4")
        run("e2fsck", "-fn", fs)
        return fs


def build_disk(
    tmp_path: Path,
    fmt: str,
    scheme: str | None,
    *,
    size: int = 128 * MiB,
    files: Path | None = None,
    name: str = "disk",
) -> Disk:
    """An ext4 disk made by the reference tools: partitioned by parted (MBR) or sgdisk (GPT)."""
    flat = tmp_path / f"{name}.flat.raw"
    with flat.open("wb") as f:
        f.truncate(size)
    start = MiB if scheme else 0
    fs_size = size - 2 * MiB if scheme else size
    if scheme == "mbr":
        run(
            "parted",
            "-s",
            flat,
            "mklabel",
            "msdos",
            "mkpart",
            "primary",
            "ext4",
            "1MiB",
            f"{(start + fs_size) // MiB}MiB",
        )
        fs_size -= 512  # parted's end is inclusive: the partition stops one sector short
        fs_size -= fs_size % 4096
    elif scheme == "gpt":
        run("sgdisk", "-n", f"1:2048:+{fs_size // 1024}K", flat)
    argv: list[str | Path] = ["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={start},root_owner=0:0"]
    if files is not None:
        argv += ["-d", files]
    run(*argv, flat, f"{fs_size // 1024}k")
    if fmt == "raw":
        image = flat.rename(tmp_path / f"{name}.raw")
    else:
        image = tmp_path / f"{name}.{fmt}"
        run("qemu-img", "convert", "-f", "raw", "-O", QEMU_NAMES[fmt], flat, image)
        flat.unlink()
    return Disk(image, fmt, start, fs_size)


def debugfs_dump(fs: Path, guest: str, out: Path) -> bytes:
    run("debugfs", "-R", f"dump {guest} {out}", fs)
    return out.read_bytes()


@pytest.fixture
def guest_files(tmp_path: Path) -> Path:
    root = tmp_path / "guest-files"
    (root / "root").mkdir(parents=True)
    (root / "root" / "b.txt").write_bytes(b"written by mke2fs into the guest\n")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("guest\n")
    return root


# -- the original example ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s or "none")
@pytest.mark.parametrize("fmt", FORMATS)
def test_original_example(tmp_path: Path, fmt: str, scheme: str | None, guest_files: Path) -> None:
    disk = build_disk(tmp_path, fmt, scheme, files=guest_files)
    a_txt = tmp_path / "a.txt"
    a_txt.write_bytes(os.urandom(4096))
    b_txt = tmp_path / "b.txt"

    d = DiskOperations(disk.path)
    d.mount()
    d.upload(a_txt, "/root/a.txt")
    d.download("/root/b.txt", b_txt)
    d.close_connection()

    assert b_txt.read_bytes() == b"written by mke2fs into the guest\n"
    fs = disk.check(tmp_path)
    assert debugfs_dump(fs, "/root/a.txt", tmp_path / "dumped") == a_txt.read_bytes()
    assert d.partition == (1 if scheme else None)
    assert not d.mounted


@pytest.mark.parametrize(
    ("fmt", "scheme"), [("raw", "gpt"), ("vdi", "mbr"), ("vhd", "gpt"), ("vmdk", "mbr"), ("qcow2", "gpt")]
)
def test_100_mib_round_trip(tmp_path: Path, fmt: str, scheme: str) -> None:
    disk = build_disk(tmp_path, fmt, scheme, size=192 * MiB)
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(MiB))
    back = tmp_path / "back.bin"
    seen: list[tuple[int, int]] = []
    with DiskOperations(disk.path) as d:
        d.upload(big, "/big.bin", callback=lambda done, total: seen.append((done, total)))
        d.download("/big.bin", back)
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert seen[0] == (0, 100 * MiB)
    assert seen[-1] == (100 * MiB, 100 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    fs = disk.check(tmp_path)
    dumped = debugfs_dump(fs, "/big.bin", tmp_path / "dumped")
    assert hashlib.sha256(dumped).hexdigest() == digest


# -- files, trees, owners ----------------------------------------------------------------------------


def test_owner_mode_and_queries(tmp_path: Path, guest_files: Path) -> None:
    disk = build_disk(tmp_path, "qcow2", "gpt", files=guest_files)
    src = tmp_path / "script.sh"
    src.write_text("#!/bin/sh\necho hi\n")
    src.chmod(0o640)
    with DiskOperations(disk.path) as d:
        d.upload(src, "/root/run.sh", owner=(1234, 2345), mode=0o755)
        d.upload(src, "/root")  # into a directory: keeps its name and its host mode
        d.mkdir("/srv/a/b/c", parents=True, owner=(7, 8))
        with pytest.raises(FileExistsError):
            d.mkdir("/srv/a")
        d.mkdir("/srv/a", exist_ok=True)
        with pytest.raises(FileNotFoundError):
            d.mkdir("/nope/x")
        st = d.stat("/root/run.sh")
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (1234, 2345)
        assert stat.S_IMODE(d.stat("/root/script.sh").st_mode) == 0o640
        assert d.listdir("/root") == ["b.txt", "run.sh", "script.sh"]
        assert d.exists("/srv/a/b/c")
        assert not d.exists("/srv/a/b/d")
        assert not d.exists("/root/b.txt/x")
        assert d.stat("/srv/a/b/c").st_uid == 7
        with pytest.raises(OSError, match="not empty") as info:
            d.remove("/srv/a")
        assert info.value.errno == errno.ENOTEMPTY
        d.remove("/srv/a", recursive=True)
        d.remove("/root/script.sh")
        assert not d.exists("/srv/a")
        assert d.listdir("/root") == ["b.txt", "run.sh"]
    fs = disk.check(tmp_path)
    out = run("debugfs", "-R", "stat /root/run.sh", fs)
    assert "User:  1234   Group:  2345" in out
    assert "Mode:  0755" in out
    assert "script.sh" not in run("debugfs", "-R", "ls -l /root", fs)


def test_tree_upload_and_download(tmp_path: Path) -> None:
    disk = build_disk(tmp_path, "vdi", "mbr")
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    (tree / "sub" / "deeper" / "empty").write_bytes(b"")
    (tree / "sub" / "link").symlink_to("data.bin")
    (tree / "sub" / "abs-link").symlink_to("/etc/hostname")
    totals: list[tuple[int, int]] = []
    with DiskOperations(disk.path) as d:
        d.upload(tree, "/opt/tree", owner=(1000, 1000), callback=lambda a, b: totals.append((a, b)))
        assert d.listdir("/opt/tree") == ["sub", "top.txt"]
        assert d.listdir("/opt/tree/sub") == ["abs-link", "data.bin", "deeper", "link"]
        assert d.stat("/opt/tree/sub/deeper/empty").st_uid == 1000
        out = tmp_path / "out"
        with pytest.warns(GuestLinkWarning, match="abs-link"):
            d.download("/opt/tree", out)
    assert totals[-1] == (200_003, 200_003)
    assert (out / "top.txt").read_text() == "top"
    assert (out / "sub" / "data.bin").read_bytes() == (tree / "sub" / "data.bin").read_bytes()
    assert (out / "sub" / "deeper" / "empty").read_bytes() == b""
    assert os.readlink(out / "sub" / "link") == "data.bin"  # relative, inside the tree: kept
    assert not (out / "sub" / "abs-link").is_symlink()  # absolute: would point at a host file
    fs = disk.check(tmp_path)
    assert "abs-link" in run("debugfs", "-R", "ls /opt/tree/sub", fs)


def test_full_filesystem_leaves_nothing_behind(tmp_path: Path) -> None:
    disk = build_disk(tmp_path, "qcow2", "mbr", size=24 * MiB)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * MiB))
    with DiskOperations(disk.path) as d:
        with pytest.raises(FilesystemError, match="full") as info:
            d.upload(big, "/big.bin")
        assert info.value.errno == errno.ENOSPC
        assert not d.exists("/big.bin")
        small = tmp_path / "small.txt"
        small.write_text("still works")
        d.upload(small, "/small.txt")
    fs = disk.check(tmp_path)
    assert debugfs_dump(fs, "/small.txt", tmp_path / "s") == b"still works"


def test_readonly_mount(tmp_path: Path, guest_files: Path) -> None:
    disk = build_disk(tmp_path, "vhd", "gpt", files=guest_files)
    before = disk.path.read_bytes()
    src = tmp_path / "x"
    src.write_text("x")
    with DiskOperations(disk.path, readonly=True) as d:
        assert d.listdir("/") == ["etc", "lost+found", "root"]
        d.download("/etc/hostname", tmp_path / "hostname")
        with pytest.raises(FilesystemError, match="read-only"):
            d.upload(src, "/x")
        with pytest.raises(FilesystemError, match="read-only"):
            d.remove("/etc/hostname")
    assert (tmp_path / "hostname").read_text() == "guest\n"
    assert disk.path.read_bytes() == before


def test_download_errors(tmp_path: Path, guest_files: Path) -> None:
    disk = build_disk(tmp_path, "raw", None, files=guest_files)
    with DiskOperations(disk.path, readonly=True) as d:
        with pytest.raises(FileNotFoundError):
            d.download("/root/missing.txt", tmp_path / "m")
        with pytest.raises(FileNotFoundError):
            d.download("/missing/dir/file", tmp_path / "m")
        with pytest.raises(NotADirectoryError):
            d.download("/root/b.txt/x", tmp_path / "m")
        with pytest.raises(FilesystemError):
            d.get_file("/root", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_not_mounted_and_reentry(tmp_path: Path) -> None:
    disk = build_disk(tmp_path, "raw", "mbr")
    d = DiskOperations(disk.path)
    with pytest.raises(FilesystemError, match="not mounted"):
        d.listdir("/")
    d.mount()
    d.mount()  # no-op
    d.close_connection()
    d.close_connection()  # no-op
    with d:
        assert "lost+found" in d.listdir("/")


# -- choosing the filesystem -------------------------------------------------------------------------


def test_picks_largest_partition_with_a_filesystem(tmp_path: Path) -> None:
    flat = tmp_path / "multi.raw"
    with flat.open("wb") as f:
        f.truncate(96 * MiB)
    run("sgdisk", "-n", "1:2048:+16M", "-n", "2:0:+40M", "-n", "3:0:0", flat)
    # 1: small ext4, 2: larger ext4, 3: largest but empty (no filesystem)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-L", "small", "-E", f"offset={MiB}", flat, "16M")
    run("mke2fs", "-q", "-F", "-t", "ext4", "-L", "large", "-E", f"offset={17 * MiB}", flat, "40M")
    with DiskOperations(flat, readonly=True) as d:
        assert (d.partition, d.filesystem) == (2, "ext")
    with DiskOperations(flat, readonly=True, partition=1) as d:
        assert d.partition == 1
    with pytest.raises(FilesystemError, match="partition 3 holds no filesystem"):
        DiskOperations(flat, partition=3).mount()
    with pytest.raises(FilesystemError, match=r"no partition 9 .*partitions: 1, 2, 3"):
        DiskOperations(flat, partition=9).mount()


def test_blank_disk_has_no_filesystem(tmp_path: Path) -> None:
    blank = tmp_path / "blank.vdi"
    run("qemu-img", "create", "-q", "-f", "vdi", blank, "32M")
    with pytest.raises(FilesystemError, match="no filesystem"):
        DiskOperations(blank).mount()
    d = DiskOperations(blank)
    with pytest.raises(FilesystemError, match="no filesystem"):
        d.mount()
    assert not d.mounted


def test_missing_driver_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = build_disk(tmp_path, "raw", "mbr")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    d = DiskOperations(disk.path)
    with pytest.raises(MissingDependencyError, match=r"fuse2fs.*apt-get install fuse2fs"):
        d.mount()
    assert not d.mounted
    monkeypatch.undo()
    with DiskOperations(disk.path) as d2:  # the failed attempt released the image
        assert d2.listdir("/") == ["lost+found"]


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DiskOperations(tmp_path / "nope.vdi").mount()
    with pytest.raises(ValueError, match="method"):
        DiskOperations(tmp_path / "x.raw", method="nbd")  # type: ignore[arg-type]


# -- other filesystems and the kernel path ------------------------------------------------------------


def test_detect_filesystem_from_superblocks(tmp_path: Path) -> None:
    def head_after(*argv: str | Path) -> bytes:
        img = tmp_path / "fs.img"
        img.unlink(missing_ok=True)
        with img.open("wb") as f:
            f.truncate(64 * MiB)
        run(*argv, img)
        return img.read_bytes()[:4096]

    assert detect_filesystem_bytes(head_after("mke2fs", "-q", "-F", "-t", "ext2")) == "ext"
    assert detect_filesystem_bytes(head_after("mkfs.vfat")) == "vfat"
    assert detect_filesystem_bytes(head_after("mkfs.vfat", "-F", "32")) == "vfat"
    if shutil.which("mkntfs"):
        assert detect_filesystem_bytes(head_after("mkntfs", "-q", "-F", "-f")) == "ntfs"
    assert detect_filesystem_bytes(bytes(4096)) is None
    assert detect_filesystem_bytes(b"") is None


def test_vfat_through_fusefat(tmp_path: Path) -> None:
    if shutil.which("fusefat") is None:
        pytest.skip("fusefat (Debian package fusefat) is not installed")
    files = tmp_path / "files"
    files.mkdir()
    (files / "HELLO.TXT").write_text("fat")
    img = create_io_disk(tmp_path / "io.raw", 64 * MiB, "raw", "vfat", files)
    with DiskOperations(img) as d:
        assert d.filesystem == "vfat"
        assert "HELLO.TXT" in d.listdir("/")
        d.download("/HELLO.TXT", tmp_path / "hello")
        up = tmp_path / "UP.TXT"
        up.write_text("up")
        d.upload(up, "/UP.TXT")
    assert (tmp_path / "hello").read_text() == "fat"
    part = tmp_path / "p.img"
    with open_image(img) as disk, part.open("wb") as out:
        out.write(disk.read_at(MiB, 63 * MiB))
    run("fsck.vfat", "-n", part)
    # fusefat leaves FAT entry 1 with its "dirty" bits, which mtools refuses without this switch.
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    typed = subprocess.run(["mtype", "-i", str(part), "::/UP.TXT"], capture_output=True, check=True, env=env)
    assert typed.stdout == b"up"


def test_ntfs_through_ntfs_3g(tmp_path: Path) -> None:
    if shutil.which("mkntfs") is None:
        pytest.skip("mkntfs (Debian package ntfs-3g) is not installed")
    img = tmp_path / "ntfs.raw"
    with img.open("wb") as f:
        f.truncate(64 * MiB)
    run("mkntfs", "-q", "-F", "-f", img)
    src = tmp_path / "n.txt"
    src.write_text("ntfs")
    with DiskOperations(img) as d:
        assert d.filesystem == "ntfs"
        d.upload(src, "/n.txt")
    with DiskOperations(img, readonly=True) as d:
        d.download("/n.txt", tmp_path / "back")
    assert (tmp_path / "back").read_text() == "ntfs"


@pytest.mark.skipif(os.geteuid() != 0, reason="a kernel loop mount needs root")
def test_kernel_method(tmp_path: Path, guest_files: Path) -> None:
    disk = build_disk(tmp_path, "qcow2", "mbr", files=guest_files)
    src = tmp_path / "k.txt"
    src.write_text("kernel")
    with DiskOperations(disk.path, method="kernel") as d:
        d.upload(src, "/root/k.txt")
        assert d.listdir("/root") == ["b.txt", "k.txt"]
    fs = disk.check(tmp_path)
    assert debugfs_dump(fs, "/root/k.txt", tmp_path / "k") == b"kernel"


# -- create_io_disk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s or "none")
@pytest.mark.parametrize("fmt", FORMATS)
def test_create_io_disk(tmp_path: Path, fmt: str, scheme: str | None) -> None:
    files = tmp_path / "in"
    (files / "wheels").mkdir(parents=True)
    payload = os.urandom(300_000)
    (files / "wheels" / "pkg.whl").write_bytes(payload)
    (files / "job.toml").write_text("[job]\n")
    img = create_io_disk(tmp_path / f"io.{fmt}", 64 * MiB, fmt, "ext4", files, partition_table=scheme)
    if fmt in CHECKABLE:
        qemu_check(img, QEMU_NAMES[fmt])
    if fmt != "raw":
        # sparse: far less than the 64 MiB disk is allocated
        assert img.stat().st_blocks * 512 < 32 * MiB
    flat = qemu_flatten(img, QEMU_NAMES[fmt], tmp_path / "flat.raw")
    if scheme == "gpt":
        assert "8300" in run("sgdisk", "-p", flat)
    elif scheme == "mbr":
        assert "ext4" in run("parted", "-s", "-m", flat, "unit", "B", "print") or "83" in run(
            "sgdisk", "-p", flat
        )
    with DiskOperations(img) as d:
        assert d.partition == (1 if scheme else None)
        assert d.listdir("/") == ["job.toml", "lost+found", "wheels"]
        d.download("/wheels/pkg.whl", tmp_path / "pkg.whl")
        d.upload(tmp_path / "pkg.whl", "/result.whl")
    assert (tmp_path / "pkg.whl").read_bytes() == payload
    if fmt in CHECKABLE:
        qemu_check(img, QEMU_NAMES[fmt])


def test_create_io_disk_refuses_and_cleans_up(tmp_path: Path) -> None:
    files = tmp_path / "in"
    files.mkdir()
    (files / "big").write_bytes(os.urandom(12 * MiB))
    with pytest.raises(FilesystemError, match="mke2fs"):
        create_io_disk(tmp_path / "small.vdi", 8 * MiB, "vdi", "ext4", files)
    assert not (tmp_path / "small.vdi").exists()
    with pytest.raises(ValueError, match="filesystem"):
        create_io_disk(tmp_path / "x.vdi", 8 * MiB, "vdi", "btrfs")
    with pytest.raises(FileExistsError):
        create_io_disk(files / "big", 8 * MiB, "raw")


# -- for_vm ------------------------------------------------------------------------------------------

DOMAIN_XML = """<domain type='qemu'><name>t</name><devices>
  <disk type='file' device='cdrom'><source file='{iso}'/><target dev='hdc'/></disk>
  <disk type='file' device='disk'><driver type='qcow2'/><source file='{system}'/><target dev='vda'/>
    <backingStore type='file'><source file='/base/should-not-be-used.qcow2'/></backingStore></disk>
  <disk type='file' device='disk'><source file='{io}'/><target dev='vdb'/></disk>
</devices></domain>"""


class FakeDomainHolder:
    """Anything with ``xml_desc()`` (what vmanager.VirtualMachine offers), built from real XML."""

    def __init__(self, xml: str) -> None:
        self._xml = xml

    def xml_desc(self) -> str:
        return self._xml


def test_for_vm_uses_the_current_disk(tmp_path: Path) -> None:
    base = build_disk(tmp_path, "qcow2", "mbr", name="base")
    overlay = tmp_path / "overlay.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.path, overlay)
    io = build_disk(tmp_path, "raw", None, name="io")
    xml = DOMAIN_XML.format(iso=tmp_path / "x.iso", system=overlay, io=io.path)
    assert DiskOperations.for_vm(xml).image == overlay
    assert DiskOperations.for_vm(FakeDomainHolder(xml), "vdb").image == io.path
    assert DiskOperations.for_vm(FakeDomainHolder(xml), 1).image == io.path
    with pytest.raises(KeyError, match="vdz"):
        DiskOperations.for_vm(xml, "vdz")
    before = base.path.read_bytes()
    src = tmp_path / "s.txt"
    src.write_text("to the overlay")
    with DiskOperations.for_vm(FakeDomainHolder(xml)) as d:
        d.upload(src, "/s.txt")
    assert base.path.read_bytes() == before  # only the leaf was written
    qemu_check(overlay, "qcow2")
    with DiskOperations(overlay, readonly=True) as d:
        assert d.listdir("/") == ["lost+found", "s.txt"]


def test_for_vm_duck_types(tmp_path: Path) -> None:
    class WithDisks:
        def disks(self) -> dict[str, str]:
            return {"sda": "/images/a.vdi", "sdb": "/images/b.vdi"}

    assert DiskOperations.for_vm(WithDisks(), "sdb").image == Path("/images/b.vdi")
    with pytest.raises(TypeError, match="xml_desc"):
        DiskOperations.for_vm(object())
    with pytest.raises(ValueError, match="does not parse"):
        DiskOperations.for_vm("<domain>")


VBOX = """<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{{11111111-1111-1111-1111-111111111111}}" name="t" OSType="Linux">
    <MediaRegistry><HardDisks>
      <HardDisk uuid="{{{base}}}" location="base.vdi" format="VDI" type="Normal">
        <HardDisk uuid="{{{child}}}" location="Snapshots/{{{child}}}.vdi" format="VDI"/>
      </HardDisk>
    </HardDisks></MediaRegistry>
    <StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
      <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{{{child}}}"/></AttachedDevice>
    </StorageController></StorageControllers>
  </Machine>
</VirtualBox>"""


def test_for_vm_reads_vbox_files(tmp_path: Path) -> None:
    base_uuid = "22222222-2222-2222-2222-222222222222"
    child_uuid = "33333333-3333-3333-3333-333333333333"
    vbox = tmp_path / "t.vbox"
    vbox.write_text(VBOX.format(base=base_uuid, child=child_uuid))
    expected = tmp_path / "Snapshots" / f"{{{child_uuid}}}.vdi"
    assert DiskOperations.for_vm(vbox).image == expected
    assert DiskOperations(vbox).image == expected
    with pytest.raises(IndexError):
        DiskOperations.for_vm(vbox, 3)


def test_interpreter_exit_unmounts_what_was_left_open(tmp_path: Path) -> None:
    disk = build_disk(tmp_path, "vdi", "mbr")
    src = tmp_path / "left.txt"
    src.write_text("left open")
    script = (
        "import sys\nfrom diskhandler import DiskOperations\n"
        "d = DiskOperations(sys.argv[1])\nd.mount()\nd.upload(sys.argv[2], '/left.txt')\n"
        "print(d._root, flush=True)\n"  # and exit without close_connection()
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(disk.path), str(src)], capture_output=True, check=True, text=True
    )
    root = proc.stdout.strip()
    assert not os.path.ismount(root)
    assert not Path(root).exists()
    with DiskOperations(disk.path) as d:  # the image was released
        d.download("/left.txt", tmp_path / "back")
    assert (tmp_path / "back").read_text() == "left open"
    disk.check(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_no_dev_fuse_is_a_clear_error(tmp_path: Path) -> None:
    # A private mount namespace with an empty /dev (only /dev/null): /dev/fuse is really absent.
    disk = build_disk(tmp_path, "raw", "mbr")
    script = (
        "import sys\nfrom diskhandler import DiskOperations, MissingDependencyError\n"
        "try:\n    DiskOperations(sys.argv[1]).mount()\n"
        "except MissingDependencyError as exc:\n    print('refused:', exc)\n"
    )
    inner = "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
    inner += f'exec {sys.executable} -c "$0" "$1"'
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", inner, script, str(disk.path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"cannot make a mount namespace here: {proc.stderr.strip()}")
    assert proc.stdout.startswith("refused: /dev/fuse does not exist"), proc.stdout + proc.stderr
    assert os.path.exists("/dev/fuse")  # the host's /dev was not touched


@pytest.mark.parametrize("readonly", [False, True])
def test_ext_journal_needing_recovery_is_a_clear_error(tmp_path: Path, readonly: bool) -> None:
    """A guest killed mid-write leaves its ext4 journal dirty; fuse2fs crashes or refuses on it."""
    image = create_io_disk(tmp_path / "io.raw", 16 << 20, "raw", partition_table=None)
    run("debugfs", "-w", "-R", "feature needs_recovery", image)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    d = DiskOperations(image, readonly=readonly)
    with pytest.raises(FilesystemError, match="journal needs recovery") as excinfo:
        d.mount()
    assert "e2fsck -fy" in str(excinfo.value)
    assert not d.mounted
    d.close_connection()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # nothing was written
