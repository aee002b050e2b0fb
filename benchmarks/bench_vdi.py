"""VDI throughput of diskhandler against qemu-img, measured in the same run on the same files.

Reads: a fully written dynamic VDI (made by ``qemu-img convert`` from random data) read sequentially
through ``DiskImage.readinto`` with a reused page-aligned 1 MiB buffer, against
``qemu-img convert`` of the same image to qemu's null target. Both run with the page cache warm.

Writes: sequential 1 MiB writes of the same random data into a new dynamic VDI through
``DiskImage.write``, against ``qemu-img convert -O vdi -t unsafe`` (neither flushes to disk); qemu-img
then checks diskhandler's image and compares it with the raw file.

Without a reference (qemu reads neither differencing VDIs nor other block sizes): a two-level chain
with half the blocks in the leaf, and an image with 64 KiB blocks.

Usage: ``python benchmarks/bench_vdi.py [--size-mib 512] [--repeat 3] [--dir /tmp]``. Goal: reads at
least 0.5x qemu-img.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import _harness as harness
from _harness import MiB

from diskhandler import create_image


def main(argv: Sequence[str] | None = None) -> int:
    with harness.session("VDI", __doc__ or "", argv) as run:
        raw, d, size, repeat = run.raw, run.folder, run.size, run.repeat
        table = harness.ComparisonTable(size, case_width=44)
        table.header()

        image = d / "full.vdi"
        harness.qemu_img("convert", "-f", "raw", "-O", "vdi", raw, image)
        table.add("read dynamic", *harness.compare_reads(image, "vdi", size, repeat))

        out_ours, out_theirs = d / "ours.vdi", d / "theirs.vdi"
        times = harness.compare_writes(raw, out_ours, out_theirs, repeat, fmt="vdi", qemu_fmt="vdi")
        table.add("write dynamic", *times)
        harness.qemu_img("check", "-f", "vdi", out_ours)
        harness.qemu_img("compare", "-f", "vdi", "-F", "raw", out_ours, raw)

        leaf = d / "leaf.vdi"
        with create_image(leaf, parent=out_ours) as child:
            for offset in range(0, size, 2 * MiB):  # every other block in the leaf
                child.write_at(offset, os.urandom(MiB))
        chain = harness.best_of(repeat, lambda: harness.read_with_diskhandler(leaf))
        table.add("read 2-level chain (half the blocks in leaf)", chain)

        small = d / "small-blocks.vdi"
        harness.write_with_diskhandler(raw, small, "vdi", block_size=64 << 10)
        table.add("read 64 KiB blocks", harness.best_of(repeat, lambda: harness.read_with_diskhandler(small)))
        print(table.read_goal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
