"""VHD throughput: diskhandler against qemu-img on the same files, in the same run, page cache warm.

Reads: a fully written image (random data, written by ``qemu-img convert``) read sequentially through
``DiskImage.readinto`` with a reused page-aligned 1 MiB buffer, against ``qemu-img convert`` of the same
image into qemu's null driver. Writes: sequential 1 MiB ``DiskImage.write`` calls into a new image,
against ``qemu-img convert -t unsafe -O vpc`` from the raw file. Dynamic and fixed images; best of
``--repeat``. Without a reference (qemu reads a differencing VHD without its parent): a differencing
child with almost every sector in its parent.

Run: ``python benchmarks/bench_vhd.py [--size-mib 512] [--repeat 3] [--dir /tmp]``. The goal is reads
at half of qemu-img's speed or better.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _harness as harness
from _harness import MiB

from diskhandler import create_image


def main(argv: Sequence[str] | None = None) -> int:
    with harness.session("VHD", __doc__ or "", argv) as run:
        raw, work, size, repeat = run.raw, run.folder, run.size, run.repeat
        table = harness.ComparisonTable(size, case_width=28)
        table.header()
        for subformat in ("dynamic", "fixed"):
            img = work / f"{subformat}.vhd"
            opts = f"subformat={subformat},force_size=on"
            harness.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", opts, raw, img)
            table.add(f"read {subformat}", *harness.compare_reads(img, "vpc", size, repeat))

            out, qout = work / f"out-{subformat}.vhd", work / f"qemu-{subformat}.vhd"
            times = harness.compare_writes(
                raw,
                out,
                qout,
                repeat,
                fmt="vhd",
                qemu_fmt="vpc",
                options={"subformat": subformat},
                qemu_options=[opts],
            )
            table.add(f"write {subformat}", *times)
            for p in (out, qout, img):
                harness.remove_image(p)

        # A differencing child with almost every sector in its parent: the chain's read cost.
        base = work / "base.vhd"
        harness.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, base)
        child = work / "child.vhd"
        with create_image(child, parent=base) as image:
            for off in range(0, size, 4 * MiB):  # every other 2 MiB block gets one sector of its own
                image.write_at(off + 4096, b"\xff" * 512)
        harness.read_with_diskhandler(child)  # warm the page cache
        chain = harness.best_of(repeat, lambda: harness.read_with_diskhandler(child))
        table.add("read differencing chain", chain)
        print(table.read_goal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
