"""``diskimage://`` over a hostile guest filesystem: links to folders never make a walk explode.

fsspec's walk follows links to folders (as its local filesystem does). A guest can hold a chain of
folders each linking twice to the next: ``d0/x -> ../d1``, ``d0/y -> ../d1``, ``d1/x -> ../d2`` ...
No link loops back to an ancestor, yet the paths through them double at every level: 2**40 for 40
folders, a walk (and ``find``, ``du``, a recursive ``get`` filling the host disk) that never ends.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fsspec")
from diskhandler.fsspec import DiskImageFileSystem
from tests.diskhandler.imagetools import run

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

LEVELS = 10  # 1024 paths to the last folder before the fix: slow, not endless, and plainly exponential


def _doubling_links(tmp: Path) -> Path:
    tree = tmp / "tree"
    for i in range(LEVELS + 1):
        (tree / f"d{i}").mkdir(parents=True)
        (tree / f"d{i}" / "f").write_bytes(b"f\n")
    for i in range(LEVELS):
        for name in ("x", "y"):
            (tree / f"d{i}" / name).symlink_to(f"../d{i + 1}")
    image = tmp / "dag.raw"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image)
    return image


def test_links_doubling_at_every_level_are_walked_once(tmp_path: Path) -> None:
    fs = DiskImageFileSystem(fo=str(_doubling_links(tmp_path)), skip_instance_cache=True)
    try:
        found = fs.find("/d0", withdirs=True)
        # every folder is entered once: its file is found once, wherever the links lead to it
        files = [p for p in found if p.endswith("/f")]
        assert len(files) == LEVELS + 1, len(files)
        assert "/d0/x/f" in found
        assert fs.du("/d0") == 2 * (LEVELS + 1)
        out = tmp_path / "out"
        fs.get("/d0", str(out), recursive=True)
        assert sum(1 for p in out.rglob("f")) == LEVELS + 1
    finally:
        fs.close()


def test_folders_nested_past_the_walk_limit_end_the_walk(tmp_path: Path) -> None:
    """1500 nested folders made the recursive walk a ``RecursionError``; it stops at the limit."""
    from diskhandler import ImageWarning
    from diskhandler.operations import MAX_WALK_DEPTH

    image = tmp_path / "deep.raw"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", image)
    (tmp_path / "leaf").write_bytes(b"leaf\n")
    commands = tmp_path / "deep.cmds"
    commands.write_text("mkdir a\ncd a\n" * 1500 + f"write {tmp_path / 'leaf'} leaf\n")
    run("debugfs", "-w", "-f", commands, image)
    fs = DiskImageFileSystem(fo=str(image), skip_instance_cache=True)
    try:
        with pytest.warns(ImageWarning, match=f"deeper than {MAX_WALK_DEPTH}"):
            found = fs.find("/a", withdirs=True)
        assert found[-1] == "/a" * (MAX_WALK_DEPTH + 2)  # listed in its parent, not entered
        assert len(found) == MAX_WALK_DEPTH + 2
    finally:
        fs.close()
