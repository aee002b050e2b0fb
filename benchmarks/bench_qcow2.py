"""qcow2 throughput of diskhandler against qemu-img, measured in the same run on the same files.

Reads: a fully written qcow2 (made by ``qemu-img convert`` from random data) read sequentially through
``DiskImage.readinto`` with a reused page-aligned 1 MiB buffer, against ``qemu-img convert`` of the same
image to qemu's null target. Both run with the page cache warm. The same for a compressed image.

Writes: sequential 1 MiB writes of the same random data into a new qcow2 through ``DiskImage.write``,
against ``qemu-img convert -O qcow2 -t unsafe`` (neither flushes to disk).

Usage: ``python benchmarks/bench_qcow2.py [--size-mib 512] [--repeat 3] [--dir /tmp]``. Goal: reads at
least 0.5x qemu-img.
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diskhandler import create_image, open_image

MiB = 1 << 20


def fastest(repeat: int, action: Callable[[], object]) -> float:
    """The best wall time of ``repeat`` runs of ``action``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def read_all(path: Path) -> int:
    """Read the whole virtual disk 1 MiB at a time into one page-aligned buffer."""
    buf = mmap.mmap(-1, MiB)
    total = 0
    with open_image(path) as image:
        while n := image.readinto(buf):
            total += n
    return total


def write_all(raw: Path, target: Path, size: int) -> None:
    target.unlink(missing_ok=True)
    buf = mmap.mmap(-1, MiB)
    view = memoryview(buf)
    with raw.open("rb", buffering=0) as src, create_image(target, size, "qcow2") as image:
        while n := src.readinto(buf):
            image.write(view[:n])
    view.release()


def report(what: str, size: int, ours: float, theirs: float | None) -> None:
    line = f"{what:44s} diskhandler {size / ours / 1e6:7.0f} MB/s"
    if theirs is not None:
        line += f"   qemu-img {size / theirs / 1e6:7.0f} MB/s   ratio {theirs / ours:.2f}x"
    print(line, flush=True)


def compare_read(image: Path, size: int, repeat: int, label: str) -> None:
    assert read_all(image) == size  # also warms the page cache
    ours = fastest(repeat, lambda: read_all(image))
    null_target = f"driver=null-co,size={size}"
    theirs = fastest(
        repeat, lambda: qemu_img("convert", "-n", "-f", "qcow2", image, "--target-image-opts", null_target)
    )
    report(label, size, ours, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the scratch images go")
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        d = Path(scratch)
        raw = d / "random.raw"
        with raw.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))

        full = d / "full.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, full)
        compare_read(full, size, args.repeat, f"read  {args.size_mib} MiB qcow2 (64 KiB clusters)")

        small = d / "small.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw, small)
        compare_read(small, size, args.repeat, f"read  {args.size_mib} MiB qcow2 (4 KiB clusters)")

        # Compressible data so that the clusters really are compressed.
        text = d / "text.raw"
        with text.open("wb") as f:
            line = b"".join(b"%08d qcow2 benchmark line\n" % i for i in range(40000))
            while f.tell() < size:
                f.write(line[: size - f.tell()])
        packed = d / "compressed.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", text, packed)
        compare_read(packed, size, args.repeat, f"read  {args.size_mib} MiB compressed qcow2 (deflate)")

        out_ours, out_theirs = d / "ours.qcow2", d / "theirs.qcow2"

        def qemu_write() -> None:
            out_theirs.unlink(missing_ok=True)
            qemu_img("convert", "-t", "unsafe", "-f", "raw", "-O", "qcow2", raw, out_theirs)

        ours_w = fastest(args.repeat, lambda: write_all(raw, out_ours, size))
        theirs_w = fastest(args.repeat, qemu_write)
        report(f"write {args.size_mib} MiB qcow2 (64 KiB clusters)", size, ours_w, theirs_w)
        qemu_img("check", "-f", "qcow2", out_ours)
        qemu_img("compare", "-f", "qcow2", "-F", "raw", out_ours, raw)

        # An overlay holding every other MiB: reads alternate between the two files.
        leaf = d / "leaf.qcow2"
        with create_image(leaf, parent=out_ours) as child:
            for offset in range(0, size, 2 * MiB):
                child.write_at(offset, os.urandom(MiB))
        compare_read(leaf, size, args.repeat, f"read  {args.size_mib} MiB 2-level chain (half in leaf)")


if __name__ == "__main__":
    main()
