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

from _harness import (
    ComparisonTable,
    MiB,
    best_of,
    compare_reads,
    compare_writes,
    load_line,
    make_random_raw,
    parse_common_args,
    qemu_img,
    read_with_diskhandler,
    scratch_dir,
    write_with_diskhandler,
)

from diskhandler import create_image


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_common_args(__doc__ or "", argv)
    size = args.size_mib * MiB
    with scratch_dir(args.dir, "bench-vdi-") as d:
        raw = make_random_raw(d / "random.raw", args.size_mib)
        print(f"VDI, {args.size_mib} MiB of random data, best of {args.repeat}; {load_line()}")
        table = ComparisonTable(size, case_width=44)
        table.header()

        image = d / "full.vdi"
        qemu_img("convert", "-f", "raw", "-O", "vdi", raw, image)
        table.add("read dynamic", *compare_reads(image, "vdi", size, args.repeat))

        out_ours, out_theirs = d / "ours.vdi", d / "theirs.vdi"
        table.add(
            "write dynamic",
            *compare_writes(raw, out_ours, out_theirs, args.repeat, fmt="vdi", qemu_fmt="vdi"),
        )
        qemu_img("check", "-f", "vdi", out_ours)
        qemu_img("compare", "-f", "vdi", "-F", "raw", out_ours, raw)

        leaf = d / "leaf.vdi"
        with create_image(leaf, parent=out_ours) as child:
            for offset in range(0, size, 2 * MiB):  # every other block in the leaf
                child.write_at(offset, os.urandom(MiB))
        table.add(
            "read 2-level chain (half the blocks in leaf)",
            best_of(args.repeat, lambda: read_with_diskhandler(leaf)),
        )

        small = d / "small-blocks.vdi"
        write_with_diskhandler(raw, small, "vdi", block_size=64 << 10)
        table.add("read 64 KiB blocks", best_of(args.repeat, lambda: read_with_diskhandler(small)))
        print(table.read_goal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
