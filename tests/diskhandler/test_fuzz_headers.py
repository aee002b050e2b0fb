"""Header fuzzing of every format, each case in a child process with a memory cap and a time limit.

A valid image of each format and subformat (made by qemu-img, or by diskhandler where qemu cannot
make it) gets its header fields overwritten with boundary values (0, 1, 2**31 - 1, 2**32 - 1, 2**63,
...) and random bytes, chosen by hypothesis. Every mutated image is opened, read at its start, middle
and end, and (for half of them) opened for writing and written, in a child under ``RLIMIT_AS`` and a
per-case time limit (:mod:`tests.childrun`). The only acceptable outcomes are success or a
``DiskHandlerError``: a hang, a ``MemoryError`` (an allocation sized by a header field), a bare
``struct.error``/``IndexError``/``OverflowError``/``ValueError``, or a dead child fails the test.
The FIFO, device, directory and /proc parents are in ``test_image_files.py``, run the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from diskhandler import DiskHandlerError, create_image, open_image
from diskhandler.partitions import list_partitions
from tests.childrun import run_cases
from tests.diskhandler.imagetools import qemu_img, run

MiB = 1 << 20
CASES_PER_EXAMPLE = 20
BOUNDARY = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x200,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 62,
    1 << 63,
]


def _qemu(fmt: str, *options: str) -> object:
    def make(path: Path) -> None:
        argv = ["create", "-f", fmt]
        if options:
            argv += ["-o", ",".join(options)]
        qemu_img(*argv, path, "2M")
        qemu_img_io(path, fmt)

    return make


def qemu_img_io(path: Path, fmt: str) -> None:
    """Some data, so that maps and tables have entries to corrupt."""
    from tests.diskhandler.imagetools import qemu_io

    qemu_io(path, fmt, ["write -P 0x11 0 64k", "write -P 0x22 1M 64k"])


def _ours(fmt: str, **options: object) -> object:
    def make(path: Path) -> None:
        with create_image(path, 2 * MiB, fmt, **options) as image:  # type: ignore[arg-type]
            image.write_at(0, b"\x11" * 65536)
            image.write_at(MiB, b"\x22" * 65536)

    return make


def _partitioned(scheme: str) -> object:
    """A raw disk with an MBR (three primaries and an extended one with two logical partitions) or a
    GPT made by the reference tools, for fuzzing the partition-table parsers."""

    def make(path: Path) -> None:
        with path.open("wb") as f:
            f.truncate(8 * MiB)
        if scheme == "gpt":
            run("sgdisk", "-n", "1:2048:+1M", "-n", "2:0:+1M", "-n", "3:0:+1M", path)
        else:
            run(
                "parted", "-s", path, "mklabel", "msdos",
                "mkpart", "primary", "1MiB", "2MiB", "mkpart", "extended", "2MiB", "7MiB",
                "mkpart", "logical", "3MiB", "4MiB", "mkpart", "logical", "5MiB", "6MiB",
            )  # fmt: skip
        with path.open("r+b") as f:
            f.seek(0x100000)
            f.write(b"\x11" * 65536)

    return make


# (id, suffix, maker, header regions as (start, end); negative = from the end of the file)
FORMATS: list[tuple[str, str, object, list[tuple[int, int]]]] = [
    ("qcow2-v3", "qcow2", _qemu("qcow2"), [(0, 512), (0x10000, 0x10000 + 64), (0x20000, 0x20000 + 64)]),
    ("qcow2-v2", "qcow2", _qemu("qcow2", "compat=0.10"), [(0, 512), (0x10000, 0x10000 + 64)]),
    ("vdi", "vdi", _qemu("vdi"), [(0, 0x200), (0x200, 0x240)]),
    ("vdi-virtualbox", "vdi", _ours("vdi"), [(0, 0x200), (0x100000, 0x100040)]),
    ("vhd-dynamic", "vhd", _qemu("vpc"), [(0, 512), (512, 1536), (1536, 1600), (-512, 0)]),
    ("vhd-fixed", "vhd", _qemu("vpc", "subformat=fixed"), [(-512, 0)]),
    ("vmdk-sparse", "vmdk", _qemu("vmdk"), [(0, 512), (512, 1536)]),
    ("vmdk-stream", "vmdk", _qemu("vmdk", "subformat=streamOptimized"), [(0, 512), (512, 1536), (-1536, 0)]),
    ("vmdk-descriptor", "vmdk", _qemu("vmdk", "subformat=monolithicFlat"), [(0, 400)]),
    ("vhdx", "vhdx", _qemu("vhdx"), [(0, 512), (0x10000, 0x10100), (0x30000, 0x30100), (0x200000, 0x200200)]),
    ("raw-mbr", "img", _partitioned("mbr"), [(0x1BE, 0x200), (0x200000, 0x200200), (0x400000, 0x400200)]),
    ("raw-gpt", "img", _partitioned("gpt"), [(0x1BE, 0x200), (0x200, 0x400), (0x400, 0x600), (-0x4200, 0)]),
]


def fuzz_case(case: str) -> str:
    """Child side: open, read at three places, and for ``|w`` cases write; what happened, briefly."""
    path, _, mode = case.partition("|")
    with open_image(path, parents="same-dir") as image:
        size = image.size
        for offset in (0, size // 2, max(0, size - 65536)):
            image.read_at(offset, 65536)
        for part in list_partitions(image):  # MBR, EBR chains, GPT and LVM parsed from hostile bytes
            part.read_at(0, 512)
            part.close()
    if mode == "w":
        with open_image(path, writable=True, parents="same-dir") as image:
            image.write_at(0, b"\x33" * min(4096, image.size))  # within the disk: past it is ENOSPC
            if image.size >= 1536:
                image.write_at((image.size // 3) & ~511, b"\x44" * 512)
    return f"ok {size}"


def _mutations() -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """(position within the regions' bytes, bytes to write there): boundary values and noise."""
    boundary = st.tuples(
        st.integers(0, 1 << 20),
        st.sampled_from(BOUNDARY).flatmap(
            lambda v: st.sampled_from(
                [v.to_bytes(8, e)[:n] for e in ("little", "big") for n in (1, 2, 4, 8) if v < 1 << (8 * n)]
                or [v.to_bytes(8, "little")]
            )
        ),
    )
    noise = st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8))
    return st.lists(st.one_of(boundary, noise), min_size=1, max_size=4)


def _apply(data: bytearray, regions: list[tuple[int, int]], edits: list[tuple[int, bytes]]) -> None:
    spans = []
    for start, end in regions:
        a = start if start >= 0 else len(data) + start
        b = end if end > 0 else len(data) + end
        if 0 <= a < b <= len(data):
            spans.append((a, b))
    total = sum(b - a for a, b in spans)
    for position, value in edits:
        where = position % total
        for a, b in spans:
            if where < b - a:
                offset = a + where
                data[offset : offset + len(value)] = value
                break
            where -= b - a


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("originals")
    made = {}
    for name, suffix, make, _regions in FORMATS:
        (folder / name).mkdir()
        path = folder / name / f"disk.{suffix}"
        make(path)  # type: ignore[operator]
        made[name] = path
    return made


@pytest.mark.parametrize(("name", "regions"), [pytest.param(f[0], f[3], id=f[0]) for f in FORMATS])
@settings(
    max_examples=2,
    deadline=None,
    phases=[Phase.generate],  # no shrinking: each example runs a child; the failing files are named
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(_mutations(), min_size=CASES_PER_EXAMPLE, max_size=CASES_PER_EXAMPLE))
def test_fuzzed_headers_never_hang_crash_or_exhaust_memory(
    originals: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    regions: list[tuple[int, int]],
    batch: list[list[tuple[int, bytes]]],
) -> None:
    original = originals[name]
    work = tmp_path_factory.mktemp(f"fuzz-{name}")
    cases = []
    for i, edits in enumerate(batch):
        folder = work / str(i)
        shutil.copytree(original.parent, folder)
        target = folder / original.name
        data = bytearray(target.read_bytes())
        _apply(data, regions, edits)
        target.write_bytes(data)
        cases.append(f"{target}|w" if i % 2 else str(target))
    results = run_cases("tests.diskhandler.test_fuzz_headers:fuzz_case", cases, per_case=10)
    failures = []
    for case, edits in zip(cases, batch, strict=True):
        r = results[case]
        if r.raised is not None and "DiskHandlerError" not in r.mro:
            failures.append(f"{case} edits={edits}: {r.raised} after {r.seconds}s: {r.message[:1500]}")
    assert not failures, "\n".join(failures)


def test_the_originals_open(originals: dict[str, Path]) -> None:
    """The fuzzing starts from images that are valid, or it tests nothing."""
    for name, path in originals.items():
        with open_image(path) as image:
            assert image.read_at(0 if not name.startswith("raw-") else MiB, 4) == b"\x11" * 4, name
            if name.startswith("raw-"):
                assert len(list_partitions(image)) >= 3, name


def test_the_child_reports_disk_handler_errors(tmp_path: Path) -> None:
    """The harness itself: a damaged image is a DiskHandlerError in the child, not a crash."""
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", bad, "1M")
    data = bytearray(bad.read_bytes())
    data[20:24] = (40).to_bytes(4, "big")  # cluster_bits 40
    bad.write_bytes(data)
    result = run_cases("tests.diskhandler.test_fuzz_headers:fuzz_case", [str(bad)])[str(bad)]
    assert "DiskHandlerError" in result.mro
    with pytest.raises(DiskHandlerError):
        fuzz_case(str(bad))
