"""qcow2 throughput of diskhandler against qemu-img, measured in the same run on the same files.

Reads: a fully written qcow2 (made by ``qemu-img convert`` from random data) read sequentially through
``DiskImage.readinto`` with a reused page-aligned 1 MiB buffer, against ``qemu-img convert`` of the same
image to qemu's null target. Both run with the page cache warm. The same for 4 KiB clusters, for a
compressed image and for a two-level chain with half the data in the overlay.

Writes: sequential 1 MiB writes of the same random data into a new qcow2 through ``DiskImage.write``,
against ``qemu-img convert -O qcow2 -t unsafe`` (neither flushes to disk); qemu-img then checks
diskhandler's image and compares it with the raw file.

Usage: ``python benchmarks/bench_qcow2.py [--size-mib 512] [--repeat 3] [--dir /tmp]``. Goal: reads at
least 0.5x qemu-img.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from _harness import (
    ComparisonTable,
    MiB,
    compare_reads,
    compare_writes,
    load_line,
    make_random_raw,
    parse_common_args,
    qemu_img,
    scratch_dir,
)

from diskhandler import create_image


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_common_args(__doc__ or "", argv)
    size = args.size_mib * MiB
    with scratch_dir(args.dir, "bench-qcow2-") as d:
        raw = make_random_raw(d / "random.raw", args.size_mib)
        print(f"qcow2, {args.size_mib} MiB, best of {args.repeat}; {load_line()}")
        table = ComparisonTable(size, case_width=44)
        table.header()

        full = d / "full.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, full)
        table.add("read 64 KiB clusters", *compare_reads(full, "qcow2", size, args.repeat))

        small = d / "small.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw, small)
        table.add("read 4 KiB clusters", *compare_reads(small, "qcow2", size, args.repeat))

        # Compressible data so that the clusters really are compressed.
        text = d / "text.raw"
        with text.open("wb") as f:
            line = b"".join(b"%08d qcow2 benchmark line\n" % i for i in range(40000))
            while f.tell() < size:
                f.write(line[: size - f.tell()])
        packed = d / "compressed.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", text, packed)
        table.add("read compressed (deflate)", *compare_reads(packed, "qcow2", size, args.repeat))

        out_ours, out_theirs = d / "ours.qcow2", d / "theirs.qcow2"
        times = compare_writes(raw, out_ours, out_theirs, args.repeat, fmt="qcow2", qemu_fmt="qcow2")
        table.add("write 64 KiB clusters", *times)
        qemu_img("check", "-f", "qcow2", out_ours)
        qemu_img("compare", "-f", "qcow2", "-F", "raw", out_ours, raw)

        # An overlay holding every other MiB: reads alternate between the two files.
        leaf = d / "leaf.qcow2"
        with create_image(leaf, parent=out_ours) as child:
            for offset in range(0, size, 2 * MiB):
                child.write_at(offset, os.urandom(MiB))
        table.add("read 2-level chain (half in leaf)", *compare_reads(leaf, "qcow2", size, args.repeat))
        print(table.read_goal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
