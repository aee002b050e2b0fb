"""The base of every block-mapped format: the run-coalescing read walk, per-block writes, open/cleanup.

VDI, VHD, VHDX, VMDK and qcow2 all map a virtual offset onto one of a few answers: *these host bytes*,
*zeros*, *the parent's bytes*, or (compressed qcow2 clusters) *something the format must compute*.
A format answers one question::

    _lookup(offset, remaining) -> (kind, host, span)

the kind of the bytes at virtual ``offset``, where they are in the image file (``host``, for
:data:`DATA`), and for how many bytes from ``offset`` that answer holds (``span``; at least 1, the
walk clips it to ``remaining``). :func:`walk` calls it until the request is covered and merges
neighbouring answers into as few ``pread``/zero-fill/parent reads as it can: data runs that continue
on the host, and runs of zeros or of parent bytes, each become one call.

Writing goes block by block: :meth:`BlockMappedImage._write_at` cuts a request at ``_block_shift``
boundaries and hands each piece to ``_write_block(index, within, chunk)``.

Opening: :meth:`BlockMappedImage.open` opens the file and calls ``_from_fd``; if that raises, the
descriptor is closed. :func:`closing_on_error` does the same for parents and other descriptors a
format opened on the way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self

from typing_extensions import override

from diskhandler.formats._files import open_image_file
from diskhandler.formats._stream import DiskImage, preadinto_exact, zero_fill

if TYPE_CHECKING:
    from diskhandler.formats.chain import ChainGuard

__all__ = ["DATA", "OTHER", "PARENT", "ZERO", "BlockMappedImage", "closing_on_error", "walk"]

DATA = 0
"""Bytes stored in this image file at ``host``."""
ZERO = 1
"""Bytes that read as zeros (unallocated in a base image, or explicitly zeroed)."""
PARENT = 2
"""Bytes that come from the parent image (zeros past its end or without one)."""
OTHER = 3
"""Bytes the format computes itself (compressed data); never merged with a neighbour."""

Lookup = Callable[[int, int], tuple[int, int, int]]
Fill = Callable[[int, int, memoryview, int], None]


def walk(offset: int, buf: memoryview, lookup: Lookup, fill: Fill) -> None:
    """Fill ``buf`` with the virtual bytes at ``offset``, asking ``lookup`` where each piece lives.

    ``fill(kind, virtual offset, view, host)`` is called once per merged run.
    """
    total = len(buf)
    pos = 0
    run_kind = -1
    run_start = 0
    run_host = 0
    while pos < total:
        kind, host, span = lookup(offset + pos, total - pos)
        span = min(span, total - pos)
        if kind == run_kind and kind != OTHER and (kind != DATA or host == run_host + (pos - run_start)):
            pos += span
            continue
        if run_kind >= 0:
            fill(run_kind, offset + run_start, buf[run_start:pos], run_host)
        run_kind, run_start, run_host = kind, pos, host
        pos += span
    if run_kind >= 0:
        fill(run_kind, offset + run_start, buf[run_start:pos], run_host)


@contextmanager
def closing_on_error(*resources: DiskImage | int | None) -> Iterator[None]:
    """Close ``resources`` (images or file descriptors; ``None`` is skipped) if the block raises."""
    try:
        yield
    except BaseException:
        for resource in resources:
            if resource is None:
                continue
            if isinstance(resource, int):
                os.close(resource)
            else:
                resource.close()
        raise


class BlockMappedImage(DiskImage):
    """A format whose virtual disk is a map of blocks onto its file (and its parent).

    Subclasses implement ``_from_fd`` (parse an open file), ``_lookup`` and, when writable,
    ``_write_block``; they set ``_block_shift`` (log2 of the block size) before the first write.
    """

    _block_shift: int = 0
    _data_what: str = "block data"

    @classmethod
    @override
    def open(cls, path: Path, *, writable: bool, guard: ChainGuard) -> Self:
        fd = open_image_file(path, writable=writable)
        with closing_on_error(fd):
            return cls._from_fd(path, fd, writable=writable, guard=guard)

    @classmethod
    def _from_fd(cls, path: Path, fd: int, *, writable: bool, guard: ChainGuard) -> Self:
        """Parse the image open on ``fd`` (the caller closes ``fd`` if this raises)."""
        raise NotImplementedError

    def _lookup(self, offset: int, remaining: int) -> tuple[int, int, int]:
        """``(kind, host offset, span)`` of the virtual bytes at ``offset``; see the module docstring."""
        raise NotImplementedError

    def _fill_other(self, offset: int, view: memoryview, host: int) -> None:
        """Fill ``view`` for an :data:`OTHER` answer (``host`` is whatever ``_lookup`` returned)."""
        raise NotImplementedError

    def _write_block(self, index: int, within: int, chunk: memoryview) -> None:
        """Store ``chunk`` at byte ``within`` of block ``index`` (never crossing the block's end)."""
        raise NotImplementedError

    @override
    def _readinto_at(self, offset: int, buf: memoryview) -> None:
        walk(offset, buf, self._lookup, self._fill)

    def _fill(self, kind: int, offset: int, view: memoryview, host: int) -> None:
        if kind == DATA:
            preadinto_exact(self._fd, view, host, self.path, self._data_what)
        elif kind == ZERO:
            zero_fill(view)
        elif kind == PARENT:
            self._read_parent(offset, view)
        else:
            self._fill_other(offset, view, host)

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        shift = self._block_shift
        bs = 1 << shift
        mask = bs - 1
        total = len(data)
        pos = 0
        while pos < total:
            virt = offset + pos
            within = virt & mask
            take = min(bs - within, total - pos)
            self._write_block(virt >> shift, within, data[pos : pos + take])
            pos += take
