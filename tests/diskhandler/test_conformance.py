"""One conformance suite every format passes: the stream contract, writes against a model, children.

Images are created through the public API (``create_image``) for every format and subformat
diskhandler writes, then checked against an in-memory model and against qemu's own reading of them
(``qemu-img check`` and ``qemu-img convert``). Format-specific behaviour lives in test_<format>.py.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import (
    DiskImage,
    ImageFormatError,
    ImageWarning,
    ReadOnlyImageError,
    create_image,
    open_image,
)
from tests.diskhandler.imagetools import compare_with_raw, qemu_check, qemu_flatten

MiB = 1 << 20

# (id, format, qemu's name for it or None when qemu cannot read it, options)
CASES: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("raw", "raw", "raw", {}),
    ("vdi-dynamic", "vdi", "vdi", {}),
    ("vdi-fixed", "vdi", "vdi", {"subformat": "fixed"}),
    ("vdi-qemu-header", "vdi", "vdi", {"header": "qemu"}),
    ("vhd-dynamic", "vhd", "vpc", {}),
    ("vhd-fixed", "vhd", "vpc", {"subformat": "fixed"}),
    ("vmdk-monolithicSparse", "vmdk", "vmdk", {}),
    ("vmdk-twoGbMaxExtentSparse", "vmdk", "vmdk", {"subformat": "twoGbMaxExtentSparse"}),
    ("vmdk-monolithicFlat", "vmdk", "vmdk", {"subformat": "monolithicFlat"}),
    ("vmdk-twoGbMaxExtentFlat", "vmdk", "vmdk", {"subformat": "twoGbMaxExtentFlat"}),
    ("qcow2-v3", "qcow2", "qcow2", {}),
    ("qcow2-v2", "qcow2", "qcow2", {"version": 2}),
    ("qcow2-4k-clusters", "qcow2", "qcow2", {"cluster_size": 4096}),
    ("vhdx-dynamic", "vhdx", "vhdx", {}),
    ("vhdx-fixed", "vhdx", "vhdx", {"subformat": "fixed"}),
    ("vhdx-1M-blocks", "vhdx", "vhdx", {"block_size": MiB}),
    # qemu opens only 512-byte logical sectors: this one is checked against the model alone
    ("vhdx-4k-sectors", "vhdx", None, {"block_size": 4 * MiB, "logical_sector_size": 4096}),
]
CHECKABLE = {"vdi", "vmdk", "qcow2", "vhdx"}  # formats `qemu-img check` knows
SIZE = 20 * MiB

case_params = [pytest.param(fmt, qfmt, opts, id=cid) for cid, fmt, qfmt, opts in CASES]
child_formats = ["vdi", "vhd", "vmdk", "qcow2", "vhdx"]


def _new(tmp_path: Path, fmt: str, opts: dict[str, Any], size: int = SIZE, name: str = "disk") -> DiskImage:
    return create_image(tmp_path / f"{name}.{fmt}", size, fmt, **opts)


def _random_writes(image: DiskImage, model: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        length = rng.choice([1, 511, 512, 4096, 65537, rng.randrange(1, 3 * MiB)])
        offset = rng.randrange(0, len(model) - length)
        data = rng.randbytes(length)
        image.seek(offset)
        assert image.write(data) == length
        model[offset : offset + length] = data


@pytest.mark.parametrize(("fmt", "qfmt", "opts"), case_params)
def test_new_image_reads_as_zeros(tmp_path: Path, fmt: str, qfmt: str | None, opts: dict[str, Any]) -> None:
    with _new(tmp_path, fmt, opts) as image:
        assert image.format == fmt
        assert image.size == SIZE
        assert image.writable()
        assert image.read_at(SIZE - 4096, 8192) == bytes(4096)
    with open_image(tmp_path / f"disk.{fmt}") as image:
        assert image.format == fmt
        assert image.size == SIZE
        assert not image.writable()
        assert image.read() == bytes(SIZE)


@pytest.mark.parametrize(("fmt", "qfmt", "opts"), case_params)
def test_random_writes_match_model_and_qemu(
    tmp_path: Path, fmt: str, qfmt: str | None, opts: dict[str, Any]
) -> None:
    rng = random.Random(f"conformance-{fmt}-{sorted(opts.items())}")
    model = bytearray(SIZE)
    with _new(tmp_path, fmt, opts) as image:
        _random_writes(image, model, rng, 40)
        image.seek(0)
        assert image.read() == model, "read-after-write in the same session differs"
    path = tmp_path / f"disk.{fmt}"
    with open_image(path, writable=True) as image:  # a second session appends to the first
        _random_writes(image, model, rng, 10)
    with open_image(path) as image:
        assert hashlib.sha256(image.read()).digest() == hashlib.sha256(model).digest()
    if qfmt is not None:
        if fmt in CHECKABLE:
            qemu_check(path, qfmt)
        flat = qemu_flatten(path, qfmt, tmp_path / "flat.raw")
        assert flat.read_bytes() == model, "qemu reads the image differently"
        compare_with_raw(path, flat)


@pytest.mark.parametrize(("fmt", "qfmt", "opts"), case_params)
def test_stream_contract(tmp_path: Path, fmt: str, qfmt: str | None, opts: dict[str, Any]) -> None:
    image = _new(tmp_path, fmt, opts)
    assert image.seekable()
    assert image.readable()
    assert image.seek(0, 2) == SIZE
    assert image.read(10) == b""  # at the end: nothing, like a file
    assert image.seek(-3, 1) == SIZE - 3
    assert image.write(b"xyz") == 3
    assert image.tell() == SIZE
    with pytest.raises(OSError, match="past the end") as excinfo:
        image.write(b"!")  # a disk does not grow
    assert excinfo.value.errno == errno.ENOSPC
    image.seek(SIZE - 5)
    assert image.read(100) == b"\0\0xyz"  # a short read at the end
    with pytest.raises(ValueError, match="negative"):
        image.seek(-1)
    buf = mmap.mmap(-1, MiB)  # page-aligned buffers, as fast readers use
    image.seek(SIZE - MiB)
    assert image.readinto(buf) == MiB
    assert buf[-3:] == b"xyz"
    assert image.chain == (tmp_path / f"disk.{fmt}",)
    assert fmt in repr(image)
    image.close()
    image.close()  # closing twice is harmless
    assert image.closed
    with pytest.raises(ValueError, match="closed"):
        image.read(1)

    with open_image(tmp_path / f"disk.{fmt}") as ro:
        assert ro.read_at(SIZE - 3, 3) == b"xyz"
        with pytest.raises(ReadOnlyImageError):
            ro.write_at(0, b"no")
        with pytest.raises(OSError, match="read-only"):  # an io.UnsupportedOperation, so an OSError
            ro.write(b"no")
    assert ro.closed


@pytest.mark.parametrize("fmt", child_formats)
def test_child_reads_through_and_leaves_parent_untouched(tmp_path: Path, fmt: str) -> None:
    rng = random.Random(f"child-{fmt}")
    model = bytearray(SIZE)
    base_path = tmp_path / f"base.{fmt}"
    with create_image(base_path, SIZE) as base:
        _random_writes(base, model, rng, 15)
    base_digest = hashlib.sha256(base_path.read_bytes()).hexdigest()

    child_path = tmp_path / f"child.{fmt}"
    with create_image(child_path, parent=base_path) as child:
        assert child.size == SIZE
        assert child.chain == (child_path, base_path)
        assert child.read() == model  # an empty child reads as its parent
        _random_writes(child, model, rng, 15)

    grandchild_path = tmp_path / f"grandchild.{fmt}"
    with create_image(grandchild_path, parent=child_path) as grandchild:
        _random_writes(grandchild, model, rng, 10)

    with open_image(grandchild_path) as image:
        assert image.chain == (grandchild_path, child_path, base_path)
        assert image.parent is not None
        assert not image.parent.writable()
        assert image.read() == model
    assert hashlib.sha256(base_path.read_bytes()).hexdigest() == base_digest


@pytest.mark.parametrize(("fmt", "qfmt", "opts"), case_params)
def test_create_refuses_to_overwrite(
    tmp_path: Path, fmt: str, qfmt: str | None, opts: dict[str, Any]
) -> None:
    path = tmp_path / f"disk.{fmt}"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        create_image(path, SIZE, fmt, **opts)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("fmt", ["raw", "vdi", "vhd", "vmdk", "qcow2", "vhdx"])
def test_concurrent_readers_and_writers_agree_with_a_model(tmp_path: Path, fmt: str) -> None:
    """FUSE calls readinto_at/write_at from several threads: disjoint writers, readers in between."""
    import threading

    size = 8 * MiB
    model = bytearray(size)
    errors: list[BaseException] = []
    with create_image(tmp_path / f"disk.{fmt}", size, fmt) as image:

        def writer(slot: int) -> None:
            rng = random.Random(slot)
            base = slot * MiB
            try:
                for _ in range(30):
                    off = base + rng.randrange(0, MiB - 70000)
                    data = rng.randbytes(rng.randrange(1, 70000))
                    image.write_at(off, data)
                    model[off : off + len(data)] = data
                    image.read_at(rng.randrange(0, size - 4096), 4096)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert image.read_at(0, size) == model
    with open_image(tmp_path / f"disk.{fmt}") as image:
        assert image.read() == model


def test_close_waits_for_a_read_in_another_thread(tmp_path: Path) -> None:
    import threading

    image = create_image(tmp_path / "disk.qcow2", 64 * MiB)
    image.write_at(0, b"x" * MiB)
    results: list[object] = []

    def reader() -> None:
        try:
            for _ in range(200):
                results.append(len(image.read_at(0, 4 * MiB)))
        except ValueError as exc:  # "I/O operation on closed image": the only acceptable failure
            results.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    image.close()
    t.join()
    assert all(r == 4 * MiB or (isinstance(r, ValueError) and "closed" in str(r)) for r in results)


@pytest.mark.parametrize("fmt", ["vdi", "vmdk"])  # the formats that warn about a stale parent link
def test_warning_raised_as_an_error_leaves_no_file_open(tmp_path: Path, fmt: str) -> None:
    import os
    import warnings

    from diskhandler import ImageWarning

    base, child = tmp_path / f"base.{fmt}", tmp_path / f"child.{fmt}"
    create_image(base, 4 * MiB).close()
    create_image(child, parent=base).close()
    with open_image(base, writable=True) as image:  # the child's parent link goes stale
        image.write_at(0, b"x")
    kept: list[ImageWarning] = []  # callers (and pytest.raises) keep the error and its frames
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageWarning)
        for _ in range(5):
            with pytest.raises(ImageWarning) as excinfo:
                open_image(child)
            kept.append(excinfo.value)
    assert len(os.listdir("/proc/self/fd")) == before


# -- header fuzzing: every format, the same rule -------------------------------------------------------

# where each format keeps the structures a reader trusts first (byte ranges of a fresh 4 MiB image)
FUZZ_CASES: list[tuple[str, dict[str, Any], list[tuple[int, int]]]] = [
    ("vdi", {}, [(0, 0x200)]),
    ("vhd", {}, [(0, 0x800)]),
    ("vmdk", {}, [(0, 0x1000)]),
    ("qcow2", {}, [(0, 0x200), (0x10000, 0x10040), (0x20000, 0x20040), (0x30000, 0x30040)]),
    ("vhdx", {"block_size": MiB}, [(0, 0x40), (0x10000, 0x10060), (0x30000, 0x30060), (0x200000, 0x200100)]),
]


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    seeds: dict[str, Path] = {}
    for fmt, opts, _ in FUZZ_CASES:
        path = tmp_path_factory.mktemp("fuzz-seed") / f"seed.{fmt}"
        with create_image(path, 4 * MiB, fmt, **opts) as image:
            image.write_at(MiB - 7, b"fuzz" * 1000)
        seeds[fmt] = path
    return seeds


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6
    )
)
@pytest.mark.parametrize("case", range(len(FUZZ_CASES)), ids=[c[0] for c in FUZZ_CASES])
def test_damaged_headers_give_typed_errors(
    tmp_path: Path, fuzz_seeds: dict[str, Path], case: int, edits: list[tuple[int, int, int]]
) -> None:
    """A damaged header or table opens (and reads) or raises ImageFormatError naming the file; nothing
    else escapes: no IndexError, struct.error, MemoryError, hang or huge allocation."""
    fmt, _opts, ranges = FUZZ_CASES[case]
    blob = bytearray(fuzz_seeds[fmt].read_bytes())
    for which, at, byte in edits:
        lo, hi = ranges[which % len(ranges)]
        blob[lo + at % (hi - lo)] = byte
    path = tmp_path / f"fuzz.{fmt}"
    path.write_bytes(bytes(blob))
    error: ImageFormatError | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageWarning)  # e.g. a stale VHD checksum: opened read-only
            with open_image(path, format=fmt) as image:
                image.read_at(0, 4096)
                image.read_at(max(0, image.size - 8192), 8192)
    except ImageFormatError as exc:
        error = exc
    finally:
        path.unlink()
    if error is not None:
        assert error.path is not None
