"""What every format benchmark shares: scratch files, the timing rule, the two readers and writers, the table.

The rules, so that figures from different scripts mean the same thing:

* timing: the best wall time of ``--repeat`` runs (:func:`best_of`), with the page cache warm;
* diskhandler reads: front to back with 1 MiB ``DiskImage.readinto`` calls into one reused page-aligned
  buffer (:func:`read_with_diskhandler`);
* qemu reads: ``qemu-img convert -n`` of the same image to qemu's null block driver (:func:`qemu_read`);
* diskhandler writes: 1 MiB sequential ``DiskImage.write`` calls of a raw file into a new image
  (:func:`write_with_diskhandler`);
* qemu writes: ``qemu-img convert -t unsafe -O <fmt>`` of the same raw file (:func:`qemu_write`). Neither
  writer flushes to stable storage (``-t unsafe`` is also what ``qemu-img convert`` does by default);
* MB/s are 10^6 bytes per second of virtual disk; a ratio is diskhandler's speed over qemu-img's, so
  above 1 means diskhandler is faster.

Run the scripts from the repository root (``python benchmarks/bench_<fmt>.py``); their folder is on
``sys.path``, which is how they import this module.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diskhandler import create_image, open_image

__all__ = [
    "ComparisonTable",
    "MiB",
    "Session",
    "best_of",
    "compare_reads",
    "compare_writes",
    "load_line",
    "make_random_raw",
    "parse_common_args",
    "qemu_img",
    "qemu_read",
    "qemu_write",
    "read_with_diskhandler",
    "remove_image",
    "scratch_dir",
    "session",
    "write_with_diskhandler",
]

MiB = 1 << 20


def best_of(repeat: int, action: Callable[[], object]) -> float:
    """The best wall time, in seconds, of ``repeat`` runs of ``action``."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def qemu_img(*args: str | Path) -> None:
    """Run ``qemu-img`` with ``args``; stop the benchmark with qemu's message when it fails."""
    argv = ["qemu-img", *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
        )


def parse_common_args(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """``--size-mib``, ``--repeat``, ``--dir`` and what ``configure`` adds; exits 2 without qemu-img."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="virtual disk size (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts (default 3)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the scratch images go (default: $TMPDIR)"
    )
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        parser.error("--size-mib and --repeat must be at least 1")
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed (Debian package qemu-utils)", file=sys.stderr)
        raise SystemExit(2)
    return args


@contextlib.contextmanager
def scratch_dir(parent: Path | None, prefix: str) -> Iterator[Path]:
    """A temporary folder for the images, removed afterwards whatever happens."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as scratch:
        yield Path(scratch)


@dataclass(frozen=True)
class Session:
    """One benchmark run: its options, its scratch folder and the random raw file every case starts from."""

    args: argparse.Namespace
    folder: Path
    raw: Path

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return int(self.args.size_mib) * MiB

    @property
    def repeat(self) -> int:
        return int(self.args.repeat)


@contextlib.contextmanager
def session(
    title: str,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Iterator[Session]:
    """Parse the options, make the scratch folder and the raw file, print the run's title line."""
    args = parse_common_args(description, argv, configure=configure)
    with scratch_dir(args.dir, f"bench-{title.lower().replace(' ', '-')}-") as folder:
        raw = make_random_raw(folder / "random.raw", args.size_mib)
        print(
            f"{title}, {args.size_mib} MiB of random data, best of {args.repeat}; {load_line()}", flush=True
        )
        yield Session(args, folder, raw)


def make_random_raw(path: Path, size_mib: int) -> Path:
    """A raw file of ``size_mib`` MiB of random bytes (incompressible, every block in use)."""
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    return path


def remove_image(path: Path) -> None:
    """Delete an image and the extent files qemu or diskhandler put beside it (``name-flat.vmdk``, ...)."""
    path.unlink(missing_ok=True)
    for extent in path.parent.glob(f"{path.stem}-*{path.suffix}"):
        extent.unlink()


def read_with_diskhandler(path: Path, fmt: str | None = None) -> int:
    """Read the whole virtual disk 1 MiB at a time into one page-aligned buffer; return the byte count.

    ``fmt`` skips format detection (a raw file of random bytes has no magic to detect).
    """
    buf = mmap.mmap(-1, MiB)
    total = 0
    try:
        with open_image(path, format=fmt) as image:
            while n := image.readinto(buf):
                total += n
    finally:
        buf.close()
    return total


def qemu_read(path: Path, fmt: str, size: int) -> None:
    """``qemu-img convert`` the image to qemu's null driver: qemu reads every byte and writes nothing."""
    qemu_img("convert", "-n", "-f", fmt, path, "--target-image-opts", f"driver=null-co,size={size}")


def write_with_diskhandler(raw: Path, target: Path, fmt: str, **options: Any) -> None:
    """Copy ``raw`` into a new image at ``target`` with 1 MiB sequential ``DiskImage.write`` calls."""
    remove_image(target)
    size = raw.stat().st_size
    buf = mmap.mmap(-1, MiB)
    view = memoryview(buf)
    try:
        with raw.open("rb", buffering=0) as src, create_image(target, size, fmt, **options) as image:
            while n := src.readinto(buf):
                image.write(view[:n])
    finally:
        view.release()
        buf.close()


def qemu_write(raw: Path, target: Path, qemu_fmt: str, *options: str) -> None:
    """``qemu-img convert -t unsafe -O <qemu_fmt> [-o option ...]`` of ``raw`` into a new ``target``."""
    remove_image(target)
    argv: list[str | Path] = ["convert", "-t", "unsafe", "-f", "raw", "-O", qemu_fmt]
    for option in options:
        argv += ["-o", option]
    qemu_img(*argv, raw, target)


def compare_reads(
    image: Path, qemu_fmt: str, size: int, repeat: int, *, fmt: str | None = None
) -> tuple[float, float]:
    """Best read times (diskhandler, qemu-img) of the same image; checks diskhandler reads ``size`` bytes.

    ``fmt`` is diskhandler's name of the format; by default diskhandler detects it.
    """
    got = read_with_diskhandler(image, fmt)  # also warms the page cache for both readers
    if got != size:
        raise SystemExit(f"diskhandler read {got} bytes of {image}, expected {size}")
    ours = best_of(repeat, lambda: read_with_diskhandler(image, fmt))
    theirs = best_of(repeat, lambda: qemu_read(image, qemu_fmt, size))
    return ours, theirs


def compare_writes(
    raw: Path,
    ours: Path,
    theirs: Path,
    repeat: int,
    *,
    fmt: str,
    qemu_fmt: str,
    options: dict[str, Any] | None = None,
    qemu_options: Sequence[str] = (),
) -> tuple[float, float]:
    """Best write times (diskhandler into ``ours``, qemu-img into ``theirs``) of ``raw``'s contents.

    Both images are left in place for the caller to check; the raw file is read once first so that
    both writers start with it in the page cache.
    """
    with raw.open("rb") as f:
        while f.read(16 * MiB):
            pass
    opts = options or {}
    ours_t = best_of(repeat, lambda: write_with_diskhandler(raw, ours, fmt, **opts))
    theirs_t = best_of(repeat, lambda: qemu_write(raw, theirs, qemu_fmt, *qemu_options))
    return ours_t, theirs_t


def load_line() -> str:
    """The 1, 5 and 15 minute load averages and the CPU count: how shared the machine was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


class ComparisonTable:
    """Rows of ``case | diskhandler MB/s | qemu-img MB/s | ratio``, printed as they come.

    ``theirs`` is ``None`` where no reference tool can do the case; its cells print as ``-``.
    """

    def __init__(self, size: int, case_width: int = 36) -> None:
        self.size = size
        self.case_width = case_width
        self.ratios: dict[str, float] = {}

    def header(self) -> None:
        print(f"{'case':<{self.case_width}}{'diskhandler MB/s':>18}{'qemu-img MB/s':>16}{'ratio':>8}")

    def add(self, case: str, ours: float, theirs: float | None = None) -> None:
        """One row from best times in seconds; the ratio is diskhandler's speed over qemu-img's."""
        line = f"{case:<{self.case_width}}{self.size / ours / 1e6:>18.0f}"
        if theirs is None:
            line += f"{'-':>16}{'-':>8}"
        else:
            self.ratios[case] = theirs / ours
            line += f"{self.size / theirs / 1e6:>16.0f}{theirs / ours:>8.2f}"
        print(line, flush=True)

    def read_goal(self, goal: float = 0.5) -> str:
        """A closing line: the slowest read ratio against the goal."""
        reads = {k: v for k, v in self.ratios.items() if k.startswith("read")}
        if not reads:
            return "no read compared with qemu-img"
        case = min(reads, key=reads.__getitem__)
        verdict = "met" if reads[case] >= goal else "NOT met"
        return f"slowest read ratio {reads[case]:.2f} ({case}); goal >= {goal}x qemu-img: {verdict}"
