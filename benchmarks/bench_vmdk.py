"""Sequential VMDK throughput of diskhandler against qemu-img, measured in the same run.

Reads: a fully written image (qemu-img convert of a random-data raw file) read front to back with
1 MiB ``readinto`` calls into a reused page-aligned buffer, against ``qemu-img convert`` of the same
image to qemu's null block driver. Writes: 1 MiB sequential writes into a new image against
``qemu-img convert -O vmdk`` of the raw file. The page cache is warm for both sides; the best of
``--repeat`` runs counts.

Usage: python benchmarks/bench_vmdk.py [--size-mib 512] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diskhandler import create_image, open_image

MiB = 1 << 20
READ_SUBFORMATS = ("monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "streamOptimized")
WRITE_SUBFORMATS = ("monolithicSparse", "monolithicFlat")


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def _best(repeat: int, action: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def _read_all(path: Path) -> None:
    buf = mmap.mmap(-1, MiB)
    with open_image(path) as image:
        while image.readinto(buf):
            pass


def _qemu_read(path: Path, size: int) -> None:
    _run(
        "qemu-img", "convert", "-n", "-f", "vmdk", path, "--target-image-opts", f"driver=null-co,size={size}"
    )


def _write_all(path: Path, source: Path, size: int, subformat: str) -> None:
    buf = mmap.mmap(-1, MiB)
    with (
        source.open("rb", buffering=0) as src,
        create_image(path, size, "vmdk", subformat=subformat) as image,
    ):
        while n := src.readinto(buf):
            image.write(memoryview(buf)[:n])


def _cleanup(path: Path) -> None:
    for file in path.parent.glob(path.stem + "*"):
        file.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the scratch files go")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed (Debian package qemu-utils)", file=sys.stderr)
        return 2
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        work = Path(scratch)
        raw = work / "random.raw"
        with raw.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        print(f"{args.size_mib} MiB of random data, best of {args.repeat}; MB/s = 10^6 bytes/s")
        print(f"{'operation':<36}{'diskhandler':>14}{'qemu-img':>12}{'ratio':>9}")
        ratios: dict[str, float] = {}
        for subformat in READ_SUBFORMATS:
            image = work / f"{subformat}.vmdk"
            _run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, image)
            _read_all(image)  # warm the page cache for both readers
            _qemu_read(image, size)
            ours = _best(args.repeat, functools.partial(_read_all, image))
            theirs = _best(args.repeat, functools.partial(_qemu_read, image, size))
            ratios[f"read {subformat}"] = theirs / ours
            print(
                f"{'read ' + subformat:<36}{size / ours / 1e6:>14.0f}{size / theirs / 1e6:>12.0f}"
                f"{theirs / ours:>9.2f}"
            )
            _cleanup(image)
        for subformat in WRITE_SUBFORMATS:
            ours_path = work / "ours.vmdk"
            theirs_path = work / "theirs.vmdk"

            def ours_write(subformat: str = subformat, path: Path = ours_path) -> None:
                _cleanup(path)
                _write_all(path, raw, size, subformat)

            def theirs_write(subformat: str = subformat, path: Path = theirs_path) -> None:
                _cleanup(path)
                _run(
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "vmdk",
                    "-o",
                    f"subformat={subformat}",
                    raw,
                    path,
                )

            ours = _best(args.repeat, ours_write)
            theirs = _best(args.repeat, theirs_write)
            ratios[f"write {subformat}"] = theirs / ours
            print(
                f"{'write ' + subformat:<36}{size / ours / 1e6:>14.0f}{size / theirs / 1e6:>12.0f}"
                f"{theirs / ours:>9.2f}"
            )
            _cleanup(ours_path)
            _cleanup(theirs_path)
        worst = min(v for k, v in ratios.items() if k.startswith("read"))
        print(f"slowest read ratio {worst:.2f} (goal: at least 0.5 of qemu-img)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
