"""Images in use: a running QEMU guest or another diskhandler writer holds the image.

The holder is a real ``qemu-system-x86_64`` (paused with ``-S``: no kernel needed, but its image locks
are in place), so the test sees exactly the OFD locks QEMU takes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskhandler import ImageInUseError, open_image
from diskhandler._locking import check_not_in_use, find_lock_holders
from diskhandler.operations import DiskOperations
from tests.diskhandler.test_operations import build_disk

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


def _wait_locked(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"qemu exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            check_not_in_use(path)
        except ImageInUseError:
            return
        time.sleep(0.05)
    pytest.fail("qemu did not lock the image in time")


@pytest.fixture
def qemu_holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 (Debian package qemu-system-x86) is not installed")
    guest = tmp_path / "files"
    guest.mkdir()
    (guest / "hello.txt").write_text("hello from the guest disk\n")
    disk = build_disk(tmp_path, "qcow2", "mbr", files=guest)
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "64", "-display", "none", "-S",
            "-nodefaults", "-drive", f"file={disk.path},format=qcow2,if=virtio",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_locked(disk.path, proc)
        yield disk.path, proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_running_qemu_guest_blocks_writers(
    qemu_holder: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    image, proc = qemu_holder
    before = image.read_bytes()
    with pytest.raises(ImageInUseError, match=rf"qemu-system-x86_64 \(pid {proc.pid}\)") as info:
        DiskOperations(image).mount()
    assert info.value.holder is not None
    assert f"pid {proc.pid}" in info.value.holder
    assert info.value.path == image
    with pytest.raises(ImageInUseError, match="qemu"):
        open_image(image, writable=True)
    assert image.read_bytes() == before  # nothing was written, not even a header
    # Reading still works, through the block layer and through a read-only mount.
    with open_image(image) as disk:
        assert disk.read_at(510, 2) == b"\x55\xaa"
    with DiskOperations(image, readonly=True) as d:
        d.download("/hello.txt", tmp_path / "hello.txt")
    assert (tmp_path / "hello.txt").read_text() == "hello from the guest disk\n"
    proc.kill()
    proc.wait()
    with open_image(image, writable=True):  # the locks died with qemu
        pass


def test_qemu_refuses_an_image_diskhandler_writes(tmp_path: Path) -> None:
    disk = build_disk(tmp_path, "qcow2", None)
    with open_image(disk.path, writable=True):
        proc = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(disk.path)], capture_output=True, check=False
        )
        assert proc.returncode != 0
        assert b"lock" in proc.stderr
    ok = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(disk.path)], capture_output=True, check=False
    )
    assert ok.returncode == 0, ok.stderr


def test_two_writers_exclude_each_other(tmp_path: Path) -> None:
    disk = build_disk(tmp_path, "vdi", "gpt")
    first = open_image(disk.path, writable=True)
    try:
        with pytest.raises(ImageInUseError, match=rf"\(pid {os.getpid()}\)"):
            open_image(disk.path, writable=True)
        assert any(f"pid {os.getpid()}" in h for h in find_lock_holders(disk.path))
        with open_image(disk.path) as reader:  # readers are never refused
            assert reader.size == first.size
    finally:
        first.close()
    with DiskOperations(disk.path) as d:
        with pytest.raises(ImageInUseError):
            DiskOperations(disk.path).mount()
        with pytest.raises(ImageInUseError):
            open_image(disk.path, writable=True)
        assert d.listdir("/") == ["lost+found"]
    open_image(disk.path, writable=True).close()
    assert find_lock_holders(disk.path) == []
