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

import _harness as harness
from _harness import MiB

from diskhandler import create_image


def main(argv: Sequence[str] | None = None) -> int:
    with harness.session("qcow2", __doc__ or "", argv) as run:
        raw, d, size, repeat = run.raw, run.folder, run.size, run.repeat
        table = harness.ComparisonTable(size, case_width=44)
        table.header()

        full = d / "full.qcow2"
        harness.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, full)
        table.add("read 64 KiB clusters", *harness.compare_reads(full, "qcow2", size, repeat))

        small = d / "small.qcow2"
        harness.qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw, small)
        table.add("read 4 KiB clusters", *harness.compare_reads(small, "qcow2", size, repeat))

        # Compressible data so that the clusters really are compressed.
        text = d / "text.raw"
        with text.open("wb") as f:
            line = b"".join(b"%08d qcow2 benchmark line\n" % i for i in range(40000))
            while f.tell() < size:
                f.write(line[: size - f.tell()])
        packed = d / "compressed.qcow2"
        harness.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", text, packed)
        table.add("read compressed (deflate)", *harness.compare_reads(packed, "qcow2", size, repeat))

        out_ours, out_theirs = d / "ours.qcow2", d / "theirs.qcow2"
        times = harness.compare_writes(raw, out_ours, out_theirs, repeat, fmt="qcow2", qemu_fmt="qcow2")
        table.add("write 64 KiB clusters", *times)
        harness.qemu_img("check", "-f", "qcow2", out_ours)
        harness.qemu_img("compare", "-f", "qcow2", "-F", "raw", out_ours, raw)

        # An overlay holding every other MiB: reads alternate between the two files.
        leaf = d / "leaf.qcow2"
        with create_image(leaf, parent=out_ours) as child:
            for offset in range(0, size, 2 * MiB):
                child.write_at(offset, os.urandom(MiB))
        table.add("read 2-level chain (half in leaf)", *harness.compare_reads(leaf, "qcow2", size, repeat))
        print(table.read_goal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
