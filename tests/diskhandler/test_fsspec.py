"""The ``diskimage://`` fsspec filesystem: chained URLs, storage options, writing, caches, pickling,
and fsspec's own abstract test suite (copy, get, put, open, pipe) run against a guest filesystem.
"""

from __future__ import annotations

import csv
import errno
import itertools
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

fsspec = pytest.importorskip("fsspec")
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402
from fsspec.tests.abstract import AbstractFixtures  # noqa: E402
from fsspec.tests.abstract.copy import AbstractCopyTests  # noqa: E402
from fsspec.tests.abstract.get import AbstractGetTests  # noqa: E402
from fsspec.tests.abstract.open import AbstractOpenTests  # noqa: E402
from fsspec.tests.abstract.pipe import AbstractPipeTests  # noqa: E402
from fsspec.tests.abstract.put import AbstractPutTests  # noqa: E402

from diskhandler.create import create_io_disk  # noqa: E402
from diskhandler.errors import FilesystemError, ImageInUseError  # noqa: E402
from diskhandler.fsspec import DiskImageFileSystem  # noqa: E402
from tests.diskhandler.imagetools import qemu_check, qemu_flatten, run  # noqa: E402

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MiB = 1 << 20


def make_disk(directory: Path, name: str = "disk.vdi") -> Path:
    files = directory / f"{name}-files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("guest\n")
    (files / "data").mkdir()
    (files / "data" / "table.csv").write_text("name,value\nalpha,1\nbeta,2\n")
    image = directory / name
    create_io_disk(image, 48 * MiB, format="vdi", filesystem="ext4", files=files, partition_table="gpt")
    return image


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    image = make_disk(tmp_path)
    yield image
    DiskImageFileSystem.clear_instance_cache()
    for instance in list(_instances(image)):
        instance.close()


def _instances(image: Path) -> Iterator[DiskImageFileSystem]:
    """Every diskimage filesystem this test process created over ``image`` (fsspec caches them)."""
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, DiskImageFileSystem) and obj.ops.image == image:
            yield obj


def test_the_protocol_is_registered_by_entry_point() -> None:
    assert fsspec.get_filesystem_class("diskimage") is DiskImageFileSystem


def test_chained_url_reads(disk: Path) -> None:
    with fsspec.open(f"diskimage://etc/hostname::{disk}", "rt") as f:
        assert f.read() == "guest\n"
    with fsspec.open(f"diskimage://data/table.csv::file://{disk}", "rt", newline="") as f:
        assert list(csv.DictReader(f)) == [{"name": "alpha", "value": "1"}, {"name": "beta", "value": "2"}]
    with fsspec.open(f"diskimage://etc/hostname::{disk}", "rb", diskimage={"partition": 1}) as f:
        assert f.read() == b"guest\n"
    fs, path = fsspec.core.url_to_fs(f"diskimage://data::{disk}")
    assert path == "/data"
    assert fs.ls(path, detail=False) == ["/data/table.csv"]
    assert fs.info("/data/table.csv")["size"] == 26
    assert fs.glob("/**/*.csv") == ["/data/table.csv"]
    assert fs.cat_file("/etc/hostname", start=1, end=3) == b"ue"
    with pytest.raises(FileNotFoundError):
        fs.cat_file("/etc/missing")
    with pytest.raises(FilesystemError, match="no partition 7"):
        fsspec.open(f"diskimage://etc/hostname::{disk}", partition=7).open()


def test_read_only_by_default_and_writing_with_mode_a(disk: Path, tmp_path: Path) -> None:
    url = f"diskimage://data/out.txt::{disk}"
    with pytest.raises(FilesystemError, match="mode='a'") as info:
        fsspec.open(url, "wt").open()
    assert info.value.errno == errno.EROFS
    DiskImageFileSystem.clear_instance_cache()
    for instance in list(_instances(disk)):
        instance.close()
    with fsspec.open(url, "wt", diskimage={"mode": "a"}) as f:
        f.write("written through fsspec\n")
    fs, _path = fsspec.core.url_to_fs(url, diskimage={"mode": "a"})  # the same, cached instance
    assert fs.cat("/data/out.txt") == b"written through fsspec\n"
    with pytest.raises(ImageInUseError):  # one writer per image, as for qemu
        DiskImageFileSystem(fo=str(disk), mode="a", skip_instance_cache=True)
    fs.close()
    qemu_check(disk, "vdi")
    flat = qemu_flatten(disk, "vdi", tmp_path / "flat.raw")
    listing = run("sgdisk", "-i", "1", flat)
    first = int(listing.split("First sector: ")[1].split()[0])
    part = tmp_path / "part.raw"
    with flat.open("rb") as src, part.open("wb") as out:
        src.seek(first * 512)
        out.write(src.read())
    run("e2fsck", "-fn", part)
    dumped = tmp_path / "out.txt"
    run("debugfs", "-R", f"dump /data/out.txt {dumped}", part)
    assert dumped.read_text() == "written through fsspec\n"


def test_remote_images_only_through_a_local_cache(disk: Path, tmp_path: Path) -> None:
    memory = MemoryFileSystem()
    memory.pipe("/images/disk.vdi", disk.read_bytes())
    try:
        with pytest.raises(ValueError, match="simplecache"):
            fsspec.open("diskimage://etc/hostname::memory://images/disk.vdi").open()
        url = "diskimage://etc/hostname::simplecache::memory://images/disk.vdi"
        with fsspec.open(url, "rb", simplecache={"cache_storage": str(tmp_path / "cache")}) as f:
            assert f.read() == b"guest\n"
        with pytest.raises(ValueError, match="never written back"):
            fsspec.open(url, "wb", diskimage={"mode": "a"}).open()
    finally:
        memory.rm("/images", recursive=True)
        DiskImageFileSystem.clear_instance_cache()


def test_pickles_for_dask_workers(disk: Path) -> None:
    fs = fsspec.filesystem("diskimage", fo=str(disk))
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat("/etc/hostname") == b"guest\n"
    assert "DiskOperations" in fs._repr_html_()


def test_bad_arguments(disk: Path) -> None:
    with pytest.raises(ValueError, match="mode 'w'"):
        DiskImageFileSystem(fo=str(disk), mode="w")
    with pytest.raises(ValueError, match="needs the image"):
        DiskImageFileSystem()
    with pytest.raises(FileNotFoundError):
        DiskImageFileSystem(fo=str(disk.with_name("missing.vdi")))


# -- fsspec's abstract test suite -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskImageFileSystem]:
    image = make_disk(tmp_path_factory.mktemp("abstract"))
    fs = DiskImageFileSystem(fo=str(image), mode="a", skip_instance_cache=True)
    yield fs
    fs.close()
    qemu_check(image, "vdi")


_COUNTER = itertools.count()


class DiskImageFixtures(AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def fs(self, shared_fs: DiskImageFileSystem) -> DiskImageFileSystem:
        return shared_fs

    @pytest.fixture
    def fs_path(self, shared_fs: DiskImageFileSystem) -> Iterator[str]:
        path = f"/t{next(_COUNTER)}"
        shared_fs.makedirs(path)
        yield path
        shared_fs.rm(path, recursive=True)


class TestDiskImageCopy(DiskImageFixtures, AbstractCopyTests):  # type: ignore[misc]
    pass


class TestDiskImageGet(DiskImageFixtures, AbstractGetTests):  # type: ignore[misc]
    pass


class TestDiskImagePut(DiskImageFixtures, AbstractPutTests):  # type: ignore[misc]
    pass


class TestDiskImageOpen(DiskImageFixtures, AbstractOpenTests):  # type: ignore[misc]
    pass


class TestDiskImagePipe(DiskImageFixtures, AbstractPipeTests):  # type: ignore[misc]
    pass


def test_hostile_links_and_special_files(tmp_path: Path) -> None:
    """Loops are walked once, links never reach the host, special files are skipped in a tree copy."""
    files = tmp_path / "hostile"
    (files / "a").mkdir(parents=True)
    (files / "a" / "f").write_text("guest file")
    os.symlink("/a", files / "a" / "loop")  # back to an ancestor
    os.symlink("/etc/passwd", files / "a" / "host-passwd")  # the host has it, the guest does not
    os.symlink("../../../../../../etc/passwd", files / "a" / "climb")
    os.mkfifo(files / "a" / "fifo")
    image = tmp_path / "hostile.vdi"
    create_io_disk(image, 32 * MiB, format="vdi", filesystem="ext4", files=files, partition_table=None)
    fs = DiskImageFileSystem(fo=str(image), skip_instance_cache=True)
    try:
        assert fs.find("/a") == ["/a/climb", "/a/f", "/a/fifo", "/a/host-passwd"]
        assert fs.find("/a", withdirs=True) == [
            "/a",
            "/a/climb",
            "/a/f",
            "/a/fifo",
            "/a/host-passwd",
            "/a/loop",
        ]
        assert fs.info("/a/loop")["type"] == "directory"
        assert fs.info("/a/host-passwd")["type"] == "other"
        out = tmp_path / "out"
        fs.get("/a", str(out), recursive=True)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["f", "loop"]
        assert (out / "f").read_text() == "guest file"
        with pytest.raises(FileNotFoundError):
            fs.get("/a/host-passwd", str(tmp_path / "passwd"))
        with pytest.raises(FilesystemError, match="not a regular file"):
            fs.cat_file("/a/fifo")
        assert not (tmp_path / "passwd").exists()
    finally:
        fs.close()
