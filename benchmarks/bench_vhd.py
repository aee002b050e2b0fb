"""VHD throughput: diskhandler against qemu-img on the same files, in the same run, page cache warm.

Reads: a fully written image (random data, written by ``qemu-img convert``) read sequentially through
``DiskImage.readinto`` with a reused page-aligned 1 MiB buffer, against ``qemu-img convert`` of the same
image into qemu's null driver. Writes: sequential 1 MiB ``DiskImage.write`` calls into a new image,
against ``qemu-img convert -O vpc`` from the raw file. Dynamic and fixed images; best of ``--repeat``.

Run: ``python benchmarks/bench_vhd.py [--size-mib 512] [--repeat 3] [--dir /tmp]``. The goal is reads
at half of qemu-img's speed or better.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from diskhandler import create_image, open_image

MiB = 1 << 20


def _best(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def _warm(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(16 * MiB):
            pass


def _read_all(path: Path) -> None:
    buf = mmap.mmap(-1, MiB)
    with open_image(path) as image:
        while image.readinto(buf):
            pass


def _write_all(raw: Path, dest: Path, size: int, subformat: str) -> None:
    dest.unlink(missing_ok=True)
    buf = mmap.mmap(-1, MiB)
    view = memoryview(buf)
    with raw.open("rb", buffering=0) as src, create_image(dest, size, "vhd", subformat=subformat) as image:
        while n := src.readinto(view):
            image.write(view[:n])
    view.release()


def _qemu_write(raw: Path, dest: Path, opts: str) -> None:
    dest.unlink(missing_ok=True)
    _run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", opts, raw, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the scratch files go")
    args = parser.parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed", file=sys.stderr)
        return 2
    size = args.size_mib * MiB
    mb = size / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-vhd-", dir=args.dir))
    try:
        raw = work / "random.raw"
        with raw.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        print(f"VHD, {args.size_mib} MiB of random data, best of {args.repeat}")
        print(f"{'case':<28}{'diskhandler MB/s':>18}{'qemu-img MB/s':>16}{'ratio':>8}")
        for subformat in ("dynamic", "fixed"):
            img = work / f"{subformat}.vhd"
            opts = f"subformat={subformat},force_size=on"
            _run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", opts, raw, img)
            _warm(img)
            ours = _best(args.repeat, partial(_read_all, img))
            qemu_read = ["qemu-img", "convert", "-n", "-f", "vpc", str(img), "--target-image-opts"]
            qemu_read.append(f"driver=null-co,size={size}")
            theirs = _best(args.repeat, partial(_run, *qemu_read))
            print(f"{'read ' + subformat:<28}{mb / ours:>18.0f}{mb / theirs:>16.0f}{theirs / ours:>8.2f}")

            _warm(raw)
            out = work / f"out-{subformat}.vhd"
            ours = _best(args.repeat, partial(_write_all, raw, out, size, subformat))
            qout = work / f"qemu-{subformat}.vhd"

            theirs = _best(args.repeat, partial(_qemu_write, raw, qout, opts))
            print(f"{'write ' + subformat:<28}{mb / ours:>18.0f}{mb / theirs:>16.0f}{theirs / ours:>8.2f}")
            for p in (out, qout, img):
                p.unlink(missing_ok=True)

        # A differencing child with every sector in its parent: the chain's read cost (qemu cannot do it).
        base = work / "base.vhd"
        _run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, base)
        child = work / "child.vhd"
        with create_image(child, parent=base) as image:
            for off in range(0, size, 4 * MiB):  # every other 2 MiB block gets one sector of its own
                image.write_at(off + 4096, b"\xff" * 512)
        _warm(base)
        ours = _best(args.repeat, partial(_read_all, child))
        print(f"{'read differencing chain':<28}{mb / ours:>18.0f}{'-':>16}{'-':>8}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
