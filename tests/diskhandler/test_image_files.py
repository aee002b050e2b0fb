"""The files an image names — parents, backing files, extents — are opened through one door.

Hostile images are built with qemu-img (backing files) and by hand where the format is text (VMDK
descriptors); parents are swapped for FIFOs, devices, directories and /proc or /sys files. Every case
runs in a child process with a memory cap and a time limit, so a hang fails one test instead of the
session.
"""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from diskhandler import (
    ChainError,
    DiskHandlerError,
    ImageFileError,
    ImageFormatError,
    ImagePathError,
    ParentPolicyError,
    SpecialFileError,
    create_image,
    open_image,
)
from tests.childrun import run_cases
from tests.diskhandler.imagetools import qemu_img

MiB = 1 << 20
FLAT_HEAD = (
    '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
)


def _sys_file() -> str:
    for candidate in ("/sys/kernel/uevent_seqnum", "/sys/power/state", "/sys/kernel/mm/page_idle/bitmap"):
        if os.path.isfile(candidate):
            return candidate
    pytest.skip("no readable /sys file on this machine")


def _targets(tmp_path: Path) -> dict[str, str]:
    """Things that are not disk images, by name."""
    fifo = tmp_path / "special" / "fifo"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    folder = tmp_path / "special" / "folder"
    folder.mkdir()
    return {
        "fifo": str(fifo),
        "dev-zero": "/dev/zero",
        "dev-null": "/dev/null",
        "directory": str(folder),
        "proc": "/proc/self/environ",
        "sys": _sys_file(),
    }


def open_case(case: str) -> int:
    """Child side: open the image ``case`` names (``path`` or ``path|policy``), read its first MiB."""
    path, _, policy = case.partition("|")
    with open_image(path, parents=policy or "any") as image:  # type: ignore[arg-type]
        return len(image.read_at(0, MiB))


def _child_of(tmp_path: Path, fmt: str, kind: str, target: str) -> Path:
    """An image of format ``fmt`` whose parent / backing file / extent is ``target``."""
    folder = tmp_path / f"{fmt}-{kind}"
    folder.mkdir()
    if fmt == "qcow2":
        child = folder / "child.qcow2"
        qemu_img("create", "-f", "qcow2", "-u", "-b", target, "-F", "raw", child, "1M")
    elif fmt == "vmdk-extent":
        child = folder / "child.vmdk"
        child.write_text(FLAT_HEAD + f'RW 2048 FLAT "{target}" 0\n')
    else:  # vmdk, vhd, vdi: a real chain whose parent is then swapped for a link to the target
        base = folder / f"base.{fmt}"
        create_image(base, MiB).close()
        child = folder / f"child.{fmt}"
        create_image(child, parent=base).close()
        base.unlink()
        base.symlink_to(target)
    return child


SPECIAL_FORMATS = ["qcow2", "vmdk-extent", "vmdk", "vhd", "vdi"]


def test_special_parents_give_a_typed_error_at_once(tmp_path: Path) -> None:
    targets = _targets(tmp_path)
    cases = {
        f"{fmt}/{kind}": str(_child_of(tmp_path, fmt, kind, target))
        for fmt in SPECIAL_FORMATS
        for kind, target in targets.items()
    }
    results = run_cases("tests.diskhandler.test_image_files:open_case", list(cases.values()), per_case=5)
    failures = []
    for name, path in cases.items():
        r = results[path]
        fmt, _kind = name.split("/")
        if r.hung or "DiskHandlerError" not in r.mro or r.seconds > 2:
            failures.append(f"{name}: {r.raised} after {r.seconds}s: {r.message[:300]}")
        elif fmt not in ("vdi", "vhd") and r.raised != "SpecialFileError":
            # VDI and VHD parents are searched for (by UUID among the .vdi files, through the VHD's
            # locators); a FIFO is no candidate, so the chain is "not found" (a ChainError).
            failures.append(f"{name}: {r.raised} instead of SpecialFileError: {r.message[:300]}")
    assert not failures, "\n".join(failures)


def test_special_file_as_the_image_itself(tmp_path: Path) -> None:
    targets = _targets(tmp_path)
    results = run_cases("tests.diskhandler.test_image_files:open_case", list(targets.values()), per_case=5)
    for target in targets.values():
        r = results[target]
        assert r.raised == "SpecialFileError", (target, r)
        assert "OSError" in r.mro
        assert "not a regular file" in r.message or "/proc" in r.message or "/sys" in r.message


def test_error_names_what_the_file_is(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", child, "1M")
    # Safe in the test process: the door never opens a FIFO for reading.
    with pytest.raises(SpecialFileError, match="backing file is a FIFO") as excinfo:
        open_image(child)
    assert excinfo.value.filename == str(fifo)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("a" * 300, ImagePathError),  # a component longer than NAME_MAX
        ("/".join(["d"] * 2100), ImagePathError),  # a path longer than PATH_MAX
    ],
    ids=["long-component", "long-path"],
)
def test_bad_backing_names_are_typed(tmp_path: Path, name: str, error: type[Exception]) -> None:
    child = tmp_path / "child.vmdk"
    child.write_text(FLAT_HEAD + f'RW 2048 FLAT "{name}" 0\n')
    with pytest.raises(error) as excinfo:
        open_image(child)
    assert isinstance(excinfo.value, DiskHandlerError)
    assert isinstance(excinfo.value, OSError)


def test_symlink_loop_parent_is_a_path_error(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "loop", "-F", "raw", child, "1M")
    with pytest.raises(ImagePathError, match="loops"):
        open_image(child)


# -- where parents may be: the parents= policy ---------------------------------------------------


def _chain_outside(tmp_path: Path) -> tuple[Path, Path]:
    """``mine/child.qcow2`` over ``elsewhere/base.qcow2``."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "mine").mkdir()
    base = tmp_path / "elsewhere" / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    child = tmp_path / "mine" / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "../elsewhere/base.qcow2", "-F", "qcow2", child)
    return child, base


def test_parents_any_follows_the_image_like_qemu(tmp_path: Path) -> None:
    child, base = _chain_outside(tmp_path)
    with open_image(child) as image:
        assert [p.resolve() for p in image.chain] == [child.resolve(), base.resolve()]
    with open_image(child, parents="any") as image:
        assert image.parent is not None


def test_parents_same_dir_refuses_a_backing_file_elsewhere(tmp_path: Path) -> None:
    child, _ = _chain_outside(tmp_path)
    with pytest.raises(ParentPolicyError, match="outside") as excinfo:
        open_image(child, parents="same-dir")
    assert isinstance(excinfo.value, ChainError)
    assert excinfo.value.path == child
    with open_image(child, parents=tmp_path) as image:  # a folder that holds both is fine
        assert len(image.chain) == 2
    with pytest.raises(ParentPolicyError):
        open_image(child, parents=tmp_path / "mine")


def test_parents_same_dir_resolves_links_before_judging(tmp_path: Path) -> None:
    _child, base = _chain_outside(tmp_path)
    other = tmp_path / "mine" / "link-child.qcow2"
    (tmp_path / "mine" / "innocent.qcow2").symlink_to(base)
    qemu_img("create", "-f", "qcow2", "-b", "innocent.qcow2", "-F", "qcow2", other)
    with pytest.raises(ParentPolicyError, match="really"):
        open_image(other, parents="same-dir")
    # A parent beside the child, and one in a subfolder, are inside.
    qemu_img("create", "-f", "qcow2", tmp_path / "mine" / "b2.qcow2", "1M")
    (tmp_path / "mine" / "sub").mkdir()
    qemu_img("create", "-f", "qcow2", tmp_path / "mine" / "sub" / "b3.qcow2", "1M")
    for backing in ("b2.qcow2", "sub/b3.qcow2"):
        c = tmp_path / "mine" / f"c-{backing.replace('/', '-')}"
        qemu_img("create", "-f", "qcow2", "-b", backing, "-F", "qcow2", c)
        with open_image(c, parents="same-dir") as image:
            assert len(image.chain) == 2


def test_parents_none_opens_only_self_contained_images(tmp_path: Path) -> None:
    child, base = _chain_outside(tmp_path)
    with pytest.raises(ParentPolicyError, match="self-contained"):
        open_image(child, parents="none")
    with open_image(base, parents="none") as image:
        assert image.parent is None
    split = tmp_path / "split.vmdk"
    create_image(split, 4 * MiB, subformat="twoGbMaxExtentSparse").close()
    with pytest.raises(ParentPolicyError, match="extent 1"):
        open_image(split, parents="none")


def test_vmdk_extent_outside_the_folder_is_refused_by_same_dir(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"host secret " * 100_000)
    (tmp_path / "img").mkdir()
    desc = tmp_path / "img" / "disk.vmdk"
    desc.write_text(FLAT_HEAD + f'RW 2048 FLAT "{secret}" 0\n')
    with open_image(desc) as image:  # qemu would read it too
        assert image.read_at(0, 11) == b"host secret"
    with pytest.raises(ParentPolicyError, match="extent 1"):
        open_image(desc, parents="same-dir")


def test_vhd_and_vdi_parents_elsewhere_are_refused(tmp_path: Path) -> None:
    for fmt in ("vhd", "vdi", "vmdk"):
        (tmp_path / fmt / "Snapshots").mkdir(parents=True)
        base = tmp_path / fmt / f"base.{fmt}"
        create_image(base, MiB).close()
        child = tmp_path / fmt / "Snapshots" / f"child.{fmt}"
        create_image(child, parent=base).close()
        with open_image(child) as image:
            assert len(image.chain) == 2
        with pytest.raises(ParentPolicyError):
            open_image(child, parents="same-dir")
        with open_image(child, parents=tmp_path / fmt) as image:
            assert len(image.chain) == 2


def test_bad_policy_values(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    create_image(image, MiB).close()
    with pytest.raises(ValueError, match="not a parent policy"):
        open_image(image, parents="/tmp")  # type: ignore[arg-type]  # a folder must be a Path
    with pytest.raises(TypeError):
        open_image(image, parents=3)  # type: ignore[arg-type]


# -- VMDK extents that are not files of their own ------------------------------------------------


def test_an_extent_that_is_the_descriptor_itself_is_refused(tmp_path: Path) -> None:
    desc = tmp_path / "self.vmdk"
    desc.write_text(FLAT_HEAD + 'RW 1 FLAT "self.vmdk" 0\n')
    with pytest.raises(ImageFormatError, match="the descriptor itself"):
        open_image(desc, writable=True)  # writing it would overwrite its own descriptor


def test_a_flat_file_named_many_times_is_opened_once(tmp_path: Path) -> None:
    (tmp_path / "flat.bin").write_bytes(bytes(range(256)) * 4096)
    desc = tmp_path / "many.vmdk"
    desc.write_text(FLAT_HEAD + "".join(f'RW 1 FLAT "flat.bin" {i}\n' for i in range(2000)))
    with open_image(desc, writable=True) as image:  # locked once: it used to be "in use" by itself
        assert len(image._files()) == 2  # the descriptor and the one flat file
        assert image.size == 2000 * 512
        assert image.read_at(512 * 3, 4) == bytes(range(256))[0:4]
        image.write_at(0, b"\x99" * 512)
    assert (tmp_path / "flat.bin").read_bytes()[:512] == b"\x99" * 512


def test_a_sparse_extent_named_twice_is_refused(tmp_path: Path) -> None:
    desc = tmp_path / "d.vmdk"
    create_image(desc, 2 * MiB, subformat="twoGbMaxExtentSparse").close()
    text = desc.read_text()
    line = next(x for x in text.splitlines() if x.startswith("RW "))
    desc.write_text(text.replace(line, line + "\n" + line))
    with pytest.raises(ImageFormatError, match="named twice"):
        open_image(desc)


def test_too_many_extent_files_is_a_typed_error(tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"f{i}.bin").write_bytes(bytes(512))
    desc = tmp_path / "wide.vmdk"
    desc.write_text(FLAT_HEAD + "".join(f'RW 1 FLAT "f{i}.bin" 0\n' for i in range(200)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 50, hard))
    try:
        with pytest.raises(ImageFileError, match="too many open files") as excinfo:
            open_image(desc)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert excinfo.value.errno == errno.EMFILE
    with open_image(desc) as image:
        assert image.size == 200 * 512


# -- the policy and the typed errors through DiskOperations and the vdfuse child ------------------

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize("spawn", [False, True], ids=["fork", "spawn"])
def test_vdfuse_child_raises_the_same_typed_errors(tmp_path: Path, spawn: bool) -> None:
    from diskhandler.vdfuse import mount_vdfuse

    child, _base = _chain_outside(tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with pytest.raises(ParentPolicyError, match="outside") as policy:
        mount_vdfuse(child, mountpoint, parents="same-dir", spawn=spawn)
    assert policy.value.path == child
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    special = tmp_path / "special.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", special, "1M")
    with pytest.raises(SpecialFileError, match="FIFO") as info:
        mount_vdfuse(special, mountpoint, readonly=True, spawn=spawn)
    assert info.value.filename == str(fifo)
    view = mount_vdfuse(child, mountpoint, readonly=True, parents=tmp_path, spawn=spawn)
    view.unmount()


@pytest.mark.fuse
@needs_fuse
def test_disk_operations_take_the_policy(tmp_path: Path) -> None:
    from diskhandler import DiskOperations

    child, _base = _chain_outside(tmp_path)
    with pytest.raises(ParentPolicyError):
        DiskOperations(child, parents="none").mount()


@pytest.mark.parametrize(
    ("name", "errno_"),
    [
        ("a\0b", errno.EINVAL),
        ("bad\ud800name", errno.EILSEQ),
        ("y" * 300, errno.ENAMETOOLONG),
        ("/".join(["d"] * 2100), errno.ENAMETOOLONG),
    ],
    ids=["nul", "lone-surrogate", "long-name", "long-path"],
)
def test_bad_paths_given_to_open_and_create_are_typed(tmp_path: Path, name: str, errno_: int) -> None:
    for call in (open_image, lambda p: create_image(p, MiB, "qcow2")):
        with pytest.raises(ImagePathError) as excinfo:
            call(str(tmp_path / name))
        assert excinfo.value.errno == errno_
        assert isinstance(excinfo.value, OSError)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    with pytest.raises(ImagePathError):
        create_image(tmp_path / "child.qcow2", parent=str(tmp_path / name))
