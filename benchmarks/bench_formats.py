"""Every format in one table: diskhandler's sequential throughput against qemu-img's, same run, same files.

For raw, vdi, vhd (qemu calls it vpc), vmdk, qcow2 and vhdx, each in its default layout (dynamic/sparse where
the format has a choice):

* read: an image fully written by ``qemu-img convert -O <fmt>`` from one random raw file, read front to
  back through ``DiskImage.readinto`` with 1 MiB calls into one reused page-aligned buffer, against
  ``qemu-img convert -O raw`` of the same image to qemu's null target. The page cache is warm for both.
* write: the raw file copied into a new image with 1 MiB ``DiskImage.write`` calls, against
  ``qemu-img convert -t unsafe -O <fmt>`` of the raw file (neither flushes to disk). Afterwards, untimed,
  ``qemu-img compare`` checks that diskhandler's image holds the raw file's bytes.

MB/s are 10^6 bytes of virtual disk per second, the best of ``--repeat`` runs; a ratio is diskhandler's
speed over qemu-img's. Goal: every read ratio at least 0.5.

Usage: ``python benchmarks/bench_formats.py [--size-mib 512] [--repeat 3] [--dir /tmp] [--formats vdi,qcow2]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import _harness as harness
from _harness import MiB

READ_GOAL = 0.5


@dataclass(frozen=True)
class Format:
    """A format as diskhandler and qemu-img name it, with the qemu-img options that make it comparable."""

    name: str
    qemu_name: str
    qemu_options: tuple[str, ...] = ()


FORMATS = (
    Format("raw", "raw"),
    Format("vdi", "vdi"),
    # force_size: the footer's size is exactly the raw file's, not rounded to a CHS geometry.
    Format("vhd", "vpc", ("force_size=on",)),
    Format("vmdk", "vmdk"),
    Format("qcow2", "qcow2"),
    Format("vhdx", "vhdx"),
)


@dataclass(frozen=True)
class Row:
    """Best times in seconds of one format's four measurements."""

    fmt: str
    read_ours: float
    read_qemu: float
    write_ours: float
    write_qemu: float


def _formats(text: str) -> list[Format]:
    known = {f.name: f for f in FORMATS}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(known)}, not {text!r}")
    return [known[name] for name in names]


def _add_formats_option(parser: argparse.ArgumentParser) -> None:
    names = ",".join(f.name for f in FORMATS)
    parser.add_argument(
        "--formats", type=_formats, default=list(FORMATS), help=f"comma-separated subset of {names}"
    )


def measure(fmt: Format, raw: Path, folder: Path, repeat: int) -> Row:
    """Read and write ``fmt`` with both tools; leaves nothing behind in ``folder`` but ``raw``."""
    size = raw.stat().st_size
    image = folder / f"qemu-made.{fmt.name}"
    convert = ["convert", "-f", "raw", "-O", fmt.qemu_name]
    for option in fmt.qemu_options:
        convert += ["-o", option]
    harness.qemu_img(*convert, raw, image)
    read_ours, read_qemu = harness.compare_reads(image, fmt.qemu_name, size, repeat, fmt=fmt.name)
    harness.remove_image(image)

    ours, theirs = folder / f"ours.{fmt.name}", folder / f"theirs.{fmt.name}"
    write_ours, write_qemu = harness.compare_writes(
        raw, ours, theirs, repeat, fmt=fmt.name, qemu_fmt=fmt.qemu_name, qemu_options=fmt.qemu_options
    )
    harness.qemu_img("compare", "-f", fmt.qemu_name, "-F", "raw", ours, raw)
    harness.remove_image(ours)
    harness.remove_image(theirs)
    return Row(fmt.name, read_ours, read_qemu, write_ours, write_qemu)


def _cells(size: int, ours: float, theirs: float) -> str:
    return f"{size / ours / 1e6:>12.0f}{size / theirs / 1e6:>10.0f}{theirs / ours:>7.2f}"


def print_header() -> None:
    """The table's two title lines: MB/s of both tools and their ratio, for reads and for writes."""
    half = f"{'diskhandler':>12}{'qemu-img':>10}{'ratio':>7}"
    print(f"{'':<8}{' read MB/s ':-^29}  {' write MB/s ':-^29}")
    print(f"{'format':<8}{half}  {half}", flush=True)


def print_row(row: Row, size: int) -> None:
    """One format's line of the table, printed as soon as it is measured."""
    reads = _cells(size, row.read_ours, row.read_qemu)
    writes = _cells(size, row.write_ours, row.write_qemu)
    print(f"{row.fmt:<8}{reads}  {writes}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    rows: list[Row] = []
    with harness.session("All formats", __doc__ or "", argv, configure=_add_formats_option) as run:
        print_header()
        for fmt in run.args.formats:
            rows.append(measure(fmt, run.raw, run.folder, run.repeat))
            print_row(rows[-1], run.size)
        # What every qemu-img figure includes besides the copying: starting and ending a process.
        tiny = harness.make_random_raw(run.folder / "tiny.raw", 1)
        startup = harness.best_of(run.repeat, lambda: harness.qemu_read(tiny, "raw", MiB))
    print(f"qemu-img start-up and exit (a 1 MiB read): {startup * 1e3:.1f} ms, inside its times above")
    print(f"after: {harness.load_line()}")
    slow = [row.fmt for row in rows if row.read_qemu / row.read_ours < READ_GOAL]
    if slow:
        print(f"reads below the goal of {READ_GOAL}x qemu-img: {', '.join(slow)}")
    else:
        print(f"every read at least {READ_GOAL}x qemu-img: goal met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
