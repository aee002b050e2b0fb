"""open_image / create_image: detection by content, argument errors, chain guards."""

from __future__ import annotations

from pathlib import Path

import pytest

from diskhandler import ChainError, SpecialFileError, create_image, detect_format, open_image
from diskhandler.formats.chain import MAX_CHAIN_DEPTH, ChainGuard
from tests.diskhandler.imagetools import qemu_img

MiB = 1 << 20


@pytest.mark.parametrize(
    ("qfmt", "expected"),
    [("raw", "raw"), ("qcow2", "qcow2"), ("vdi", "vdi"), ("vpc", "vhd"), ("vmdk", "vmdk")],
)
def test_format_detected_by_content_not_suffix(tmp_path: Path, qfmt: str, expected: str) -> None:
    path = tmp_path / "misleading.qcow2" if expected != "qcow2" else tmp_path / "misleading.vdi"
    qemu_img("create", "-f", qfmt, path, "8M")
    assert detect_format(path) == expected
    with open_image(path) as image:
        assert image.format == expected


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "nope.vdi")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(SpecialFileError, match="is a directory") as excinfo:
        open_image(tmp_path)
    assert isinstance(excinfo.value, OSError)
    assert excinfo.value.filename == str(tmp_path)


def test_unknown_format_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown disk image format 'qed'"):
        create_image(tmp_path / "a.img", MiB, "qed")


def test_format_from_suffix_and_alias(tmp_path: Path) -> None:
    with create_image(tmp_path / "a.vpc", 4 * MiB) as image:
        assert image.format == "vhd"
    with create_image(tmp_path / "b", 4 * MiB, "vpc") as image:
        assert image.format == "vhd"
    with pytest.raises(ValueError, match="cannot tell the format"):
        create_image(tmp_path / "c.xyz", MiB)


def test_size_required_and_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a size"):
        create_image(tmp_path / "a.img")
    with pytest.raises(ValueError, match="positive"):
        create_image(tmp_path / "b.img", 0)


def test_raw_cannot_have_a_parent(tmp_path: Path) -> None:
    create_image(tmp_path / "base.img", MiB).close()
    with pytest.raises(ValueError, match="raw images cannot have a parent"):
        create_image(tmp_path / "child.img", parent=tmp_path / "base.img")


def test_chain_guard_detects_loops_and_depth(tmp_path: Path) -> None:
    a = tmp_path / "a"
    guard = ChainGuard().enter(a).enter(tmp_path / "b")
    with pytest.raises(ChainError, match="loops"):
        guard.enter(a)
    deep = ChainGuard()
    for i in range(MAX_CHAIN_DEPTH):
        deep = deep.enter(tmp_path / str(i))
    with pytest.raises(ChainError, match="deeper"):
        deep.enter(tmp_path / "last")


def test_qcow2_backing_loop_is_a_chain_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", a, "1M")
    qemu_img("create", "-f", "qcow2", "-b", a, "-F", "qcow2", b)
    # point a's backing file at b by rebasing without checks: a -> b -> a
    qemu_img("rebase", "-u", "-b", b, "-F", "qcow2", a)
    with pytest.raises(ChainError) as excinfo:
        open_image(b)
    assert excinfo.value.field == "parent"
