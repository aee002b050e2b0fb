"""Sequential VMDK throughput of diskhandler against qemu-img, measured in the same run.

Reads: a fully written image (qemu-img convert of a random-data raw file) read front to back with
1 MiB ``readinto`` calls into a reused page-aligned buffer, against ``qemu-img convert`` of the same
image to qemu's null block driver, for every subformat qemu writes. Writes: 1 MiB sequential writes
into a new image against ``qemu-img convert -t unsafe -O vmdk`` of the raw file. The page cache is warm
for both sides; the best of ``--repeat`` runs counts.

Usage: python benchmarks/bench_vmdk.py [--size-mib 512] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _harness as harness

READ_SUBFORMATS = ("monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "streamOptimized")
WRITE_SUBFORMATS = ("monolithicSparse", "monolithicFlat")


def main(argv: Sequence[str] | None = None) -> int:
    with harness.session("VMDK", __doc__ or "", argv) as run:
        raw, work, size, repeat = run.raw, run.folder, run.size, run.repeat
        table = harness.ComparisonTable(size, case_width=36)
        table.header()
        for subformat in READ_SUBFORMATS:
            image = work / f"{subformat}.vmdk"
            harness.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, image)
            table.add(f"read {subformat}", *harness.compare_reads(image, "vmdk", size, repeat))
            harness.remove_image(image)
        for subformat in WRITE_SUBFORMATS:
            ours, theirs = work / "ours.vmdk", work / "theirs.vmdk"
            option = f"subformat={subformat}"
            times = harness.compare_writes(
                raw,
                ours,
                theirs,
                repeat,
                fmt="vmdk",
                qemu_fmt="vmdk",
                options={"subformat": subformat},
                qemu_options=[option],
            )
            table.add(f"write {subformat}", *times)
            harness.remove_image(ours)
            harness.remove_image(theirs)
        print(table.read_goal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
