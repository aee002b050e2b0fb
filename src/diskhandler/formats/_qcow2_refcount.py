"""qcow2 refcounts and cluster allocation for writable images.

Two levels: the refcount table (``refcount_table_clusters`` contiguous clusters of u64 pointers) and
refcount blocks (one cluster each, ``cluster_size * 8 / refcount_bits`` entries). A cluster's refcount
counts the L1 tables (active and snapshots) that reach it; 0 is free, more than 1 is shared and must be
copied before it is written.

New clusters are taken at the end of the file. When a refcount block (or a bigger refcount table) is
needed, the new metadata clusters are laid out so that they describe themselves, and are written before
anything points at them: a crash leaves, at worst, leaked clusters.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable
from pathlib import Path

from diskhandler.errors import ImageFormatError
from diskhandler.formats._stream import pread_exact, pwrite_all

__all__ = ["RefcountBlock", "Refcounts"]

_ARRAY_CODES = {8: "B", 16: "H", 32: "I", 64: "Q"}
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_MAX_OFFSET = 1 << 56  # host offsets have 56 bits in qcow2 tables
_MAX_TABLE_BYTES = 8 << 20  # qemu's limit on the refcount table
_BLOCK_CACHE_BYTES = 32 << 20


def _to_native(data: bytes, code: str) -> array[int]:
    arr = array(code, data)
    if not _BIG_ENDIAN_HOST and arr.itemsize > 1:
        arr.byteswap()
    return arr


def _to_disk(arr: array[int]) -> bytes:
    if _BIG_ENDIAN_HOST or arr.itemsize == 1:
        return arr.tobytes()
    copy = array(arr.typecode, arr)
    copy.byteswap()
    return copy.tobytes()


class RefcountBlock:
    """One refcount block in memory, with the byte range changed since the last write."""

    def __init__(self, offset: int, data: bytes, bits: int) -> None:
        self.offset = offset
        self.bits = bits
        self.entries = len(data) * 8 // bits
        self.max_value = (1 << bits) - 1
        self._array: array[int] | None = None
        self._bytes = bytearray()
        if bits >= 8:
            self._array = _to_native(data, _ARRAY_CODES[bits])
        else:
            self._bytes = bytearray(data)
        self.dirty_lo = self.entries
        self.dirty_hi = 0

    def get(self, index: int) -> int:
        if self._array is not None:
            return self._array[index]
        per_byte = 8 // self.bits
        shift = (index % per_byte) * self.bits
        return (self._bytes[index // per_byte] >> shift) & self.max_value

    def set(self, index: int, value: int) -> None:
        if self._array is not None:
            self._array[index] = value
        else:
            per_byte = 8 // self.bits
            shift = (index % per_byte) * self.bits
            byte = index // per_byte
            cleared = self._bytes[byte] & ~(self.max_value << shift)
            self._bytes[byte] = cleared | (value << shift)
        self.dirty_lo = min(self.dirty_lo, index)
        self.dirty_hi = max(self.dirty_hi, index + 1)

    def take_dirty(self) -> tuple[int, bytes] | None:
        """(byte offset in the block, bytes) covering the entries changed since the last call."""
        if self.dirty_lo >= self.dirty_hi:
            return None
        lo, hi = self.dirty_lo, self.dirty_hi
        self.dirty_lo, self.dirty_hi = self.entries, 0
        if self._array is not None:
            size = self._array.itemsize
            return lo * size, _to_disk(self._array[lo:hi])
        per_byte = 8 // self.bits
        blo, bhi = lo // per_byte, -(-hi // per_byte)
        return blo, bytes(self._bytes[blo:bhi])


class Refcounts:
    """The refcount structures of one writable image, cached in memory, and the cluster allocator.

    ``set_table`` is called with (offset, clusters) after a grown refcount table has been written, to
    point the header at it.
    """

    def __init__(
        self,
        fd: int,
        path: Path,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        file_size: int,
        set_table: Callable[[int, int], None],
    ) -> None:
        self._fd = fd
        self._path = path
        self._bits = cluster_bits
        self._cs = 1 << cluster_bits
        self.refcount_bits = 1 << refcount_order
        self._block_entries = self._cs * 8 // self.refcount_bits
        self._set_table = set_table
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = pread_exact(fd, table_offset, table_clusters * self._cs, path, "refcount table")
        self.table: list[int] = list(_to_native(raw, "Q"))
        for i, entry in enumerate(self.table):
            if entry & (self._cs - 1) or entry >= _MAX_OFFSET:
                raise ImageFormatError(
                    path, "refcount table", f"entry {i} ({entry:#x}) is not a valid cluster offset"
                )
        self._blocks: dict[int, RefcountBlock] = {}
        # Allocate past the end of the file and past every cluster that still has a refcount.
        self.alloc_end = -(-file_size // self._cs)
        self._pending_frees: list[int] = []

    # -- reading ---------------------------------------------------------------------------------

    def _block(self, table_index: int) -> RefcountBlock | None:
        if table_index >= len(self.table):
            return None
        offset = self.table[table_index]
        if not offset:
            return None
        block = self._blocks.get(offset)
        if block is None:
            if len(self._blocks) * self._cs >= _BLOCK_CACHE_BYTES:  # forget blocks already written
                for key in [k for k, b in self._blocks.items() if b.dirty_lo >= b.dirty_hi]:
                    del self._blocks[key]
            data = pread_exact(self._fd, offset, self._cs, self._path, "refcount block")
            block = RefcountBlock(offset, data, self.refcount_bits)
            self._blocks[offset] = block
        return block

    def get(self, cluster: int) -> int:
        """The refcount of host cluster number ``cluster``."""
        block = self._block(cluster // self._block_entries)
        return 0 if block is None else block.get(cluster % self._block_entries)

    # -- changing ------------------------------------------------------------------------------

    def change(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to a cluster's refcount (in memory until :meth:`flush`); return the new value."""
        index = cluster // self._block_entries
        block = self._block(index)
        if block is None:
            if delta < 0:
                raise ImageFormatError(
                    self._path, "refcount table", f"cluster {cluster} is in use but has no refcount"
                )
            self._ensure_blocks(index)
            block = self._block(index)
            assert block is not None
        entry = cluster % self._block_entries
        value = block.get(entry) + delta
        if value < 0:
            raise ImageFormatError(
                self._path, "refcount block", f"refcount of cluster {cluster} would drop below zero"
            )
        if value > block.max_value:
            raise ImageFormatError(
                self._path, "refcount block", f"refcount of cluster {cluster} would overflow"
            )
        block.set(entry, value)
        return value

    def allocate(self, count: int = 1) -> int:
        """Allocate ``count`` contiguous clusters at the end of the file; return the host offset.

        Their refcounts are set to 1 in memory; write the clusters' contents before :meth:`flush`.
        """
        while True:
            start = self.alloc_end
            if all(self.get(c) == 0 for c in range(start, start + count)):
                break
            self.alloc_end += 1  # a cluster past the file's end that is still counted: skip it
        self.alloc_end = start + count
        for c in range(start, start + count):
            self.change(c, 1)
        return start << self._bits

    def free_later(self, host_offset: int, length: int) -> None:
        """Decrement the clusters overlapping ``[host_offset, +length)`` after the next :meth:`flush`."""
        first = host_offset >> self._bits
        last = (host_offset + length - 1) >> self._bits
        self._pending_frees.extend(range(first, last + 1))

    def discard_frees(self) -> None:
        """Forget the clusters queued by :meth:`free_later` (the write that queued them failed)."""
        self._pending_frees.clear()

    def flush(self) -> None:
        """Write the refcount entries changed in memory."""
        self._write_dirty()

    def apply_frees(self) -> None:
        """Decrement the clusters queued by :meth:`free_later` and write the result.

        Call it only after the tables that no longer point at those clusters are on disk.
        """
        self._write_dirty()
        if self._pending_frees:
            frees, self._pending_frees = self._pending_frees, []
            for cluster in frees:
                self.change(cluster, -1)
            self._write_dirty()

    def _write_dirty(self) -> None:
        for block in self._blocks.values():
            dirty = block.take_dirty()
            if dirty is not None:
                pwrite_all(self._fd, dirty[1], block.offset + dirty[0])

    # -- growing -------------------------------------------------------------------------------

    def _ensure_blocks(self, index: int) -> None:
        """Create refcount block ``index`` (growing the refcount table when needed)."""
        be = self._block_entries
        capacity = self.table_clusters * self._cs // 8
        start = self.alloc_end
        n_blocks = 0
        n_table = 0
        while True:
            end = start + n_blocks + n_table
            needed = {index}
            needed.update(range(start // be, (end - 1) // be + 1) if end > start else ())
            missing = sorted(i for i in needed if i >= len(self.table) or not self.table[i])
            top = max(max(needed) + 1, len(self.table))
            grow = top > capacity
            table_clusters = -(-top * 8 // self._cs) if grow else 0
            if grow:  # leave room so that the next growth is not right away
                roomy = min(self.table_clusters * 2, _MAX_TABLE_BYTES // self._cs)
                table_clusters = max(table_clusters, roomy)
            if len(missing) == n_blocks and table_clusters == n_table:
                break
            n_blocks, n_table = len(missing), table_clusters
        if n_table * self._cs > _MAX_TABLE_BYTES:
            raise ImageFormatError(self._path, "refcount table", "would grow beyond 8 MiB; image is too big")
        new_blocks = dict(zip(missing, range(start, start + n_blocks), strict=True))
        self.alloc_end = start + n_blocks + n_table
        # Contents of the new blocks: zeros plus the refcounts of the region itself.
        for i, cluster in new_blocks.items():
            offset = cluster << self._bits
            fresh = RefcountBlock(offset, bytes(self._cs), self.refcount_bits)
            fresh.dirty_lo, fresh.dirty_hi = 0, fresh.entries  # written whole, and never evicted before
            self._blocks[offset] = fresh
            if i >= len(self.table):
                self.table.extend([0] * (i + 1 - len(self.table)))
        for i, cluster in new_blocks.items():
            self.table[i] = cluster << self._bits
        for c in range(start, start + n_blocks + n_table):
            covering = self._block(c // be)
            assert covering is not None
            covering.set(c % be, covering.get(c % be) + 1)
        # Write the blocks (new ones whole), while the on-disk table does not point at new ones yet.
        self._write_dirty()
        if n_table:
            table_offset = (start + n_blocks) << self._bits
            data = array("Q", self.table)
            data.extend([0] * (n_table * self._cs // 8 - len(data)))
            pwrite_all(self._fd, _to_disk(data), table_offset)
            old_offset, old_clusters = self.table_offset, self.table_clusters
            self._set_table(table_offset, n_table)
            self.table_offset, self.table_clusters = table_offset, n_table
            old_first = old_offset >> self._bits
            for cluster in range(old_first, old_first + old_clusters):  # nothing points there any more
                self.change(cluster, -1)
            self._write_dirty()
        else:
            for i in new_blocks:
                pwrite_all(self._fd, self.table[i].to_bytes(8, "big"), self.table_offset + 8 * i)
