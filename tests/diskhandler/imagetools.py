"""Reference-tool helpers for diskhandler tests: build images with qemu-img/qemu-io, flatten them with
``qemu-img convert -O raw``, and compare what diskhandler reads against that.

These tools belong in tests and benchmarks only, never in diskhandler itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from diskhandler import open_image

__all__ = [
    "PATTERN_WRITES",
    "REAL_IMAGES",
    "PowerCut",
    "assert_reads_like_qemu",
    "compare_with_raw",
    "fill_with_pattern",
    "patch_file",
    "power_cut_at_every_write",
    "qemu_check",
    "qemu_flatten",
    "qemu_img",
    "qemu_io",
    "read_field",
    "run",
    "sha256_of_file",
]

MiB = 1 << 20

# Real images made by other products, kept in a shared/testdata/real-images folder beside the project
# (tests that use them skip when it is absent).
REAL_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "real-images"

# (qemu-io command) list that leaves data, explicit zeros, unaligned writes and holes in a 64 MiB disk.
PATTERN_WRITES: tuple[str, ...] = (
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 1M",  # a whole 1 MiB block
    "write -P 0x33 3145216 3000",  # unaligned, across a 1 MiB / 2 MiB boundary region
    "write -P 0x44 5M 256k",
    "write -z 5M 64k",  # zeroes over data
    "write -P 0x55 8M 2M",
    "write -z 9M 512k",
    "write -P 0x66 67043328 65536",  # the last 64 KiB of a 64 MiB disk
)


def run(*args: str | Path, input: bytes | None = None) -> str:
    """Run a reference tool; fail the test with its stderr when it fails."""
    tool = str(args[0])
    if shutil.which(tool) is None:
        pytest.fail(f"reference tool {tool} is not installed (the README's test command installs it)")
    proc = subprocess.run([str(a) for a in args], input=input, capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace")


def qemu_img(*args: str | Path) -> str:
    return run("qemu-img", *args)


def qemu_io(path: Path, fmt: str, commands: Sequence[str]) -> None:
    """Run qemu-io commands on an image (writes go through qemu's own format driver)."""
    argv: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    run(*argv, path)


def fill_with_pattern(path: Path, fmt: str, size: int = 64 * MiB) -> None:
    """Fill an image of at least 64 MiB with PATTERN_WRITES (clipped to ``size``)."""
    cmds = [c for c in PATTERN_WRITES if _fits(c, size)]
    qemu_io(path, fmt, cmds)


def _fits(cmd: str, size: int) -> bool:
    parts = cmd.split()
    off, length = _num(parts[-2]), _num(parts[-1])
    return off + length <= size


def _num(text: str) -> int:
    mult = {"k": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1] in mult:
        return int(text[:-1]) * mult[text[-1]]
    return int(text)


def qemu_flatten(path: Path, fmt: str | None, dest: Path) -> Path:
    """``qemu-img convert -O raw`` of ``path`` into ``dest``."""
    argv: list[str | Path] = ["qemu-img", "convert"]
    if fmt:
        argv += ["-f", fmt]
    argv += ["-O", "raw", path, dest]
    run(*argv)
    return dest


def qemu_check(path: Path, fmt: str) -> str:
    """``qemu-img check``; fails the test when qemu reports any error or leak."""
    return run("qemu-img", "check", "-f", fmt, path)


def compare_with_raw(image_path: Path, raw: Path, chunk: int = 4 * MiB) -> None:
    """Assert that diskhandler reads ``image_path`` byte-identical to the flat file ``raw``."""
    with open_image(image_path) as image, raw.open("rb") as ref:
        ref_size = raw.stat().st_size
        assert image.size == ref_size, f"size {image.size} != reference {ref_size}"
        buf = bytearray(chunk)
        offset = 0
        while offset < ref_size:
            n = image.readinto(buf)
            expect = ref.read(chunk)
            assert n == len(expect), f"short read at {offset}"
            if buf[:n] != expect:
                first = next(i for i in range(n) if buf[i] != expect[i])
                pytest.fail(
                    f"{image_path}: byte {offset + first} differs from qemu's "
                    f"({buf[first]:#04x} != {expect[first]:#04x})"
                )
            offset += n


def assert_reads_like_qemu(image_path: Path, fmt: str | None, tmp_path: Path) -> None:
    """Flatten with qemu-img and compare with what diskhandler reads."""
    flat = qemu_flatten(image_path, fmt, tmp_path / f"{image_path.name}.flat")
    try:
        compare_with_raw(image_path, flat)
    finally:
        flat.unlink(missing_ok=True)


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def patch_file(path: Path, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` of a file in place (no checksum is fixed up)."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def read_field(path: Path, offset: int, fmt: str) -> int:
    """The integer stored at ``offset`` of a file, as the one-field struct format ``fmt`` (``">Q"``, ...)."""
    with path.open("rb") as f:
        f.seek(offset)
        value: int = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    return value


class PowerCut(OSError):
    """Raised by a test's patched write call: the process 'dies' there, nothing after it reaches the file."""


def power_cut_at_every_write(
    monkeypatch: pytest.MonkeyPatch,
    seed: Path,
    work: Path,
    workload: Callable[[Path], None],
    check: Callable[[Path, str], None],
    *,
    min_writes: int,
) -> int:
    """Run ``workload`` on a fresh copy of ``seed`` once per ``os.pwrite`` it makes, cutting the power
    (raising :class:`PowerCut`) at that write, and ``check`` what the crash left. Returns the number
    of writes; asserts there were at least ``min_writes`` (the workload really allocates)."""
    calls = 0
    stop_at = -1
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == stop_at:
            raise PowerCut(5, "simulated power cut")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    shutil.copyfile(seed, work)
    workload(work)
    total = calls
    assert total >= min_writes
    for stop in range(1, total + 1):
        calls, stop_at = 0, stop
        shutil.copyfile(seed, work)
        with pytest.raises(PowerCut):
            workload(work)
        calls, stop_at = 0, -1
        check(work, f"power cut at write {stop} of {total}")
    return total
