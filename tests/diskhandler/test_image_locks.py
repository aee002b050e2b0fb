"""Locks cover every file of an image, in both directions, against real qemu-io processes.

diskhandler writing an image locks each file it writes — a VMDK's descriptor and every extent — and
its parents as QEMU locks backing files; qemu-io then refuses to write any of them. Conversely, a
qemu-io holding any one of those files makes a writable open_image raise ImageInUseError naming it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from diskhandler import ImageInUseError, create_image, open_image
from diskhandler._locking import check_not_in_use
from tests.diskhandler.imagetools import qemu_img

MiB = 1 << 20


@contextmanager
def qemu_io_holding(path: Path, fmt: str) -> Iterator[subprocess.Popen[bytes]]:
    """A qemu-io process with ``path`` open for writing until the block ends."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", fmt, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"qemu-io exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                check_not_in_use(path)
            except ImageInUseError:
                break
            if time.monotonic() > deadline:
                pytest.fail("qemu-io did not lock the image in time")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()  # qemu-io quits at the end of its input
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def qemu_io_write(path: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 0x55 0 512", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _split_vmdk(tmp_path: Path, subformat: str) -> tuple[Path, list[Path]]:
    desc = tmp_path / "disk.vmdk"
    create_image(desc, 4 * MiB, subformat=subformat).close()
    with open_image(desc) as image:
        extents = [p for p in image.extent_files if p != desc]  # type: ignore[attr-defined]
    assert extents
    return desc, extents


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
def test_writing_a_split_vmdk_locks_every_extent(tmp_path: Path, subformat: str) -> None:
    desc, extents = _split_vmdk(tmp_path, subformat)
    with open_image(desc, writable=True):
        for extent in extents:
            result = qemu_io_write(extent, "raw")
            assert result.returncode != 0
            assert "lock" in result.stderr, result.stderr
        assert "lock" in qemu_io_write(desc, "vmdk").stderr
    assert qemu_io_write(desc, "vmdk").returncode == 0  # closed: the locks are gone


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
def test_an_extent_held_by_qemu_refuses_a_writer(tmp_path: Path, subformat: str) -> None:
    desc, extents = _split_vmdk(tmp_path, subformat)
    with qemu_io_holding(extents[-1], "raw") as proc:  # a sparse extent alone opens only as raw
        with pytest.raises(ImageInUseError, match=rf"qemu-io \(pid {proc.pid}\)") as info:
            open_image(desc, writable=True)
        assert info.value.path == extents[-1]
        with open_image(desc) as image:  # readers are never refused
            assert image.size == 4 * MiB
    with open_image(desc, writable=True) as image:
        image.write_at(0, b"x")


def test_writing_a_child_locks_its_parents_as_qemu_does(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", child)
    with open_image(child, writable=True) as image:
        image.write_at(0, b"child data")
        result = qemu_io_write(base, "qcow2")
        assert result.returncode != 0
        assert 'Failed to get "write" lock' in result.stderr, result.stderr
        # qemu reading the parent (sharing it read-only, as a second overlay would) is fine
        info = subprocess.run(["qemu-img", "info", str(base)], capture_output=True, text=True, check=False)
        assert info.returncode == 0, info.stderr
    assert qemu_io_write(base, "qcow2").returncode == 0


def test_a_parent_written_by_qemu_refuses_a_writer_of_the_child(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", child)
    with qemu_io_holding(base, "qcow2") as proc:
        with pytest.raises(ImageInUseError, match="a parent of") as info:
            open_image(child, writable=True)
        assert info.value.path == base
        assert f"pid {proc.pid}" in str(info.value)
        with open_image(child) as image:  # reading stays possible (as qemu-img --force-share)
            assert image.read_at(0, 4) == bytes(4)
    with open_image(child, writable=True):
        pass
