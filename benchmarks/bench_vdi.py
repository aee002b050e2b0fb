"""VDI throughput of diskhandler against qemu-img, measured in the same run on the same files.

Reads: a fully written dynamic VDI (made by ``qemu-img convert`` from random data) read sequentially
through ``DiskImage.readinto`` with a reused page-aligned 1 MiB buffer, against
``qemu-img convert`` of the same image to qemu's null target. Both run with the page cache warm.

Writes: sequential 1 MiB writes of the same random data into a new dynamic VDI through
``DiskImage.write``, against ``qemu-img convert -O vdi -t unsafe`` (neither flushes to disk).

Usage: ``python benchmarks/bench_vdi.py [--size-mib 512] [--repeat 3] [--dir /tmp]``. Goal: reads at
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


def best_of(repeat: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def read_with_diskhandler(path: Path) -> int:
    buf = mmap.mmap(-1, MiB)
    total = 0
    with open_image(path) as image:
        while n := image.readinto(buf):
            total += n
    return total


def write_with_diskhandler(raw: Path, target: Path, size: int) -> None:
    target.unlink(missing_ok=True)
    buf = mmap.mmap(-1, MiB)
    view = memoryview(buf)
    with raw.open("rb", buffering=0) as src, create_image(target, size, "vdi") as image:
        while n := src.readinto(buf):
            image.write(view[:n])
    view.release()


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
        image = d / "full.vdi"
        qemu_img("convert", "-f", "raw", "-O", "vdi", raw, image)

        assert read_with_diskhandler(image) == size  # also warms the page cache
        ours = best_of(args.repeat, lambda: read_with_diskhandler(image))
        null_target = f"driver=null-co,size={size}"
        theirs = best_of(
            args.repeat,
            lambda: qemu_img("convert", "-n", "-f", "vdi", image, "--target-image-opts", null_target),
        )
        print(
            f"read  {args.size_mib} MiB VDI: diskhandler {size / ours / 1e6:8.0f} MB/s   "
            f"qemu-img convert {size / theirs / 1e6:8.0f} MB/s   ratio {theirs / ours:.2f}x"
        )

        out_ours, out_theirs = d / "ours.vdi", d / "theirs.vdi"

        def qemu_write() -> None:
            out_theirs.unlink(missing_ok=True)
            qemu_img("convert", "-t", "unsafe", "-f", "raw", "-O", "vdi", raw, out_theirs)

        ours_w = best_of(args.repeat, lambda: write_with_diskhandler(raw, out_ours, size))
        theirs_w = best_of(args.repeat, qemu_write)
        print(
            f"write {args.size_mib} MiB VDI: diskhandler {size / ours_w / 1e6:8.0f} MB/s   "
            f"qemu-img convert {size / theirs_w / 1e6:8.0f} MB/s   ratio {theirs_w / ours_w:.2f}x"
        )
        qemu_img("check", "-f", "vdi", out_ours)
        qemu_img("compare", "-f", "vdi", "-F", "raw", out_ours, raw)

        # No reference tool reads these: absolute figures only.
        leaf = d / "leaf.vdi"
        with create_image(leaf, parent=out_ours) as child:
            for offset in range(0, size, 2 * MiB):  # every other block in the leaf
                child.write_at(offset, os.urandom(MiB))
        chain = best_of(args.repeat, lambda: read_with_diskhandler(leaf))
        print(
            f"read  {args.size_mib} MiB 2-level VDI chain (half the blocks in the leaf): "
            f"diskhandler {size / chain / 1e6:8.0f} MB/s"
        )
        small = d / "small-blocks.vdi"
        with raw.open("rb") as src, create_image(small, size, "vdi", block_size=64 << 10) as image:
            while chunk := src.read(MiB):
                image.write(chunk)
        small_t = best_of(args.repeat, lambda: read_with_diskhandler(small))
        print(
            f"read  {args.size_mib} MiB VDI with 64 KiB blocks: diskhandler {size / small_t / 1e6:8.0f} MB/s"
        )


if __name__ == "__main__":
    main()
