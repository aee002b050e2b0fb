"""qcow2 images (qemu's copy-on-write format), versions 2 and 3.

Read: standard and extended L2 entries (subclusters), the zero flag, compressed clusters (deflate, and
zstd when the ``zstandard`` module is installed), backing chains of any format, internal snapshots
(:meth:`QCOW2Image.snapshots`, :meth:`QCOW2Image.open_snapshot`).

Write: data goes to clusters allocated at the end of the file; refcounts, the copied flag (bit 63) and
copy-on-write of clusters shared with snapshots are kept the way ``qemu-img check`` expects. Every write
reaches the file in the order data, refcounts, L2 tables, L1 table, header, so a killed process leaves a
valid image (at worst with leaked clusters).

Refused: encryption, external data files, unknown incompatible feature bits; writing to an image marked
corrupt or left dirty by lazy refcounts (repair it with ``qemu-img check -r all`` first).

Specification: qemu ``docs/interop/qcow2.txt``.
"""

from __future__ import annotations

import os
import sys
import zlib
from array import array
from pathlib import Path
from typing import Any, ClassVar, Self

from typing_extensions import override

from diskhandler.errors import (
    ImageFormatError,
    MissingDependencyError,
    SnapshotNotFoundError,
    UnsupportedImageError,
)
from diskhandler.formats._blockmap import DATA, OTHER, PARENT, ZERO, BlockMappedImage, closing_on_error
from diskhandler.formats._qcow2_layout import (
    AUTOCLEAR_OFFSET,
    EXT_BACKING_FORMAT,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTENDED_L2,
    L1_OFFSET_FIELD,
    MAGIC,
    MAX_L1_BYTES,
    MAX_VIRTUAL_SIZE,
    REFTABLE_OFFSET_FIELD,
    HeaderExtension,
    QCow2Header,
    QCow2HeaderV2,
    QCow2HeaderV3,
    SnapshotInfo,
    parse_header,
    parse_snapshots,
)
from diskhandler.formats._qcow2_refcount import Refcounts
from diskhandler.formats._stream import DiskImage, pread_exact, pwrite_all
from diskhandler.formats.chain import ChainGuard

__all__ = ["QCOW2Image", "SnapshotInfo", "SnapshotNotFoundError"]

_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9..55 of L1 and standard L2 entries
_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_ZERO = 1
_L2_RESERVED = 0x1FE  # bits 1..8 of a standard L2 entry
_ALL_SUBCLUSTERS = 0xFFFF_FFFF
_L2_CACHE_BYTES = 64 << 20
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_IOV_MAX = 1024

# qemu's names for backing formats -> ours.
_BACKING_FORMATS = {"qcow2": "qcow2", "raw": "raw", "file": "raw", "vmdk": "vmdk", "vdi": "vdi", "vpc": "vhd"}
_QEMU_FORMAT_NAMES = {"vhd": "vpc"}


def _native_u64(data: bytes) -> array[int]:
    table = array("Q", data)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def _disk_u64(values: array[int]) -> bytes:
    if _BIG_ENDIAN_HOST:
        return values.tobytes()
    copy = array("Q", values)
    copy.byteswap()
    return copy.tobytes()


def _pwrite_runs(fd: int, pieces: list[tuple[int, memoryview | bytes | bytearray]]) -> None:
    """Write (host offset, data) pieces, host-contiguous neighbours in one ``pwritev``."""
    i = 0
    while i < len(pieces):
        start, first = pieces[i]
        bufs = [first]
        end = start + len(first)
        j = i + 1
        while j < len(pieces) and pieces[j][0] == end and len(bufs) < _IOV_MAX:
            bufs.append(pieces[j][1])
            end += len(pieces[j][1])
            j += 1
        total = end - start
        done = os.pwritev(fd, bufs, start) if len(bufs) > 1 else os.pwrite(fd, first, start)
        if done < total:  # rare: finish piece by piece
            pos = start
            for buf in bufs:
                view = memoryview(buf)
                skip = max(0, min(len(view), start + done - pos))
                if skip < len(view):
                    pwrite_all(fd, view[skip:], pos + skip)
                pos += len(view)
        i = j


class QCOW2Image(BlockMappedImage):
    """A qcow2 image (v2 or v3) with its backing chain, as a seekable stream.

    Attributes:
        header: the parsed header (version, cluster size, features, backing file).
        snapshot: the name of the internal snapshot this read-only view shows, else ``None``.
    """

    format: ClassVar[str] = "qcow2"

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        header: QCow2Header,
        l1: array[int],
        writable: bool,
        parent: DiskImage | None,
        size: int | None = None,
        snapshot: str | None = None,
    ) -> None:
        super().__init__(
            path, fd, size=header.size if size is None else size, writable=writable, parent=parent
        )
        self.header = header
        self.snapshot = snapshot
        self._cbits = header.cluster_bits
        self._cs = 1 << header.cluster_bits
        self._ext = header.extended_l2
        self._l2_bits = header.cluster_bits - (4 if self._ext else 3)
        self._l1 = l1
        self._l1_offset = header.l1_table_offset
        self._l2_cache: dict[int, array[int]] = {}
        self._dirty_l2: dict[int, tuple[int, int]] = {}
        self._compressed_cache: tuple[int, bytes] = (-1, b"")
        self._refcounts: Refcounts | None = None
        self._clear_autoclear = False
        csize_bits = header.cluster_bits - 8
        self._csize_shift = 62 - csize_bits
        self._csize_mask = (1 << csize_bits) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1

    # -- detection, opening, creation -----------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes) -> bool:
        """A qcow2 image starts with ``QFI\\xfb``."""
        return head[:4] == MAGIC

    @classmethod
    @override
    def _from_fd(cls, path: Path, fd: int, *, writable: bool, guard: ChainGuard) -> Self:
        """Open ``path`` (read-write when ``writable``) and its backing chain (always read-only)."""
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, 4096, 0)
        if len(head) >= 24 and head[:4] == MAGIC:
            cluster_bits = int.from_bytes(head[20:24], "big")
            if 12 < cluster_bits <= 21:
                head = os.pread(fd, 1 << cluster_bits, 0)
        header = parse_header(head, file_size, path)
        if writable:
            cls._check_writable(header, path)
        l1 = _native_u64(pread_exact(fd, header.l1_table_offset, header.l1_size * 8, path, "L1 table"))
        parent = cls._open_backing(path, header, guard)
        with closing_on_error(parent):
            image = cls(path, fd, header=header, l1=l1, writable=writable, parent=parent)
            if writable:
                image._prepare_writing(file_size)
        return image

    @staticmethod
    def _check_writable(header: QCow2Header, path: Path) -> None:
        if header.incompatible_features & INCOMPAT_CORRUPT:
            raise ImageFormatError(
                path,
                "incompatible_features",
                "image is marked corrupt; it can only be opened read-only. Repair it with "
                "`qemu-img check -r all` (after a backup) before writing",
            )
        if header.incompatible_features & INCOMPAT_DIRTY:
            raise UnsupportedImageError(
                path,
                "incompatible_features",
                "image is dirty (lazy refcounts were not written back); it reads fine, but run "
                "`qemu-img check -r all` on it before opening it writable",
            )

    @staticmethod
    def _open_backing(path: Path, header: QCow2Header, guard: ChainGuard) -> DiskImage | None:
        name = header.backing_file
        if name is None:
            return None
        if name.startswith("file:"):
            name = name[len("file:") :]
        if name.startswith("json:"):
            raise UnsupportedImageError(
                path, "backing_file", f"backing file is a qemu JSON specification ({name[:60]}...)"
            )
        fmt: str | None = None
        if header.backing_format is not None:
            fmt = _BACKING_FORMATS.get(header.backing_format)
            if fmt is None:
                raise UnsupportedImageError(
                    path, "backing format", f"backing file format {header.backing_format!r} is not supported"
                )
        parent_path = Path(name) if os.path.isabs(name) else path.parent / name
        return guard.open_parent(path, parent_path, format=fmt, role="backing file")

    def _prepare_writing(self, file_size: int) -> None:
        header = self.header
        self._clear_autoclear = bool(header.autoclear_features)
        self._refcounts = Refcounts(
            self._fd,
            self.path,
            cluster_bits=header.cluster_bits,
            refcount_order=header.refcount_order,
            table_offset=header.refcount_table_offset,
            table_clusters=header.refcount_table_clusters,
            file_size=file_size,
            set_table=self._set_refcount_table,
        )

    def _set_refcount_table(self, offset: int, clusters: int) -> None:
        pwrite_all(self._fd, offset.to_bytes(8, "big") + clusters.to_bytes(4, "big"), REFTABLE_OFFSET_FIELD)

    @classmethod
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        """Create a qcow2 image; returns it open for writing.

        Options:
            cluster_size: bytes per cluster, a power of two from 512 to 2 MiB (default 65536).
            version: 3 (default) or 2; ``compat="1.1"`` / ``"0.10"`` says the same the qemu way.
            extended_l2: use subclusters (v3, clusters of at least 16 KiB; default False).
            refcount_bits: width of a refcount, 1..64, a power of two (default 16; v2 only 16).

        With ``parent``, the image is an overlay: the backing file name is stored relative to the new
        image's folder, its format in a backing-format extension, and the size defaults to the parent's.
        """
        cluster_size = int(options.pop("cluster_size", 65536))
        version = options.pop("version", None)
        compat = options.pop("compat", None)
        extended_l2 = bool(options.pop("extended_l2", False))
        refcount_bits = int(options.pop("refcount_bits", 16))
        if options:
            raise TypeError(
                f"unknown qcow2 options {sorted(options)}; known: cluster_size, version, "
                "compat, extended_l2, refcount_bits"
            )
        if compat is not None:
            compat_versions = {"0.10": 2, "1.1": 3, "v2": 2, "v3": 3}
            if str(compat) not in compat_versions:
                raise ValueError(f"compat must be '0.10' or '1.1', got {compat!r}")
            if version is not None and int(version) != compat_versions[str(compat)]:
                raise ValueError(f"version={version} contradicts compat={compat!r}")
            version = compat_versions[str(compat)]
        version = 3 if version is None else int(version)
        if version not in (2, 3):
            raise ValueError(f"qcow2 version must be 2 or 3, got {version}")
        if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster_size must be a power of two from 512 to 2 MiB, got {cluster_size}")
        cluster_bits = cluster_size.bit_length() - 1
        if extended_l2 and (version < 3 or cluster_size < 16384):
            raise ValueError("extended_l2 needs version 3 and a cluster_size of at least 16 KiB")
        if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (version == 2 and refcount_bits != 16):
            raise ValueError(
                f"refcount_bits must be a power of two up to 64 (16 for v2), got {refcount_bits}"
            )

        backing_name = b""
        backing_format = b""
        if parent is not None:
            base = guard.enter(path).open_parent(path, parent)
            try:
                parent_size = base.size
                backing_format = _QEMU_FORMAT_NAMES.get(base.format, base.format).encode()
            finally:
                base.close()
            if size is None:
                size = parent_size
            backing_name = os.fsencode(_relative_backing_name(path, parent))
            if len(backing_name) > 1023:
                raise ValueError(f"backing file name is longer than 1023 bytes: {parent}")
        if size is None or size <= 0:
            raise ValueError("a new qcow2 image needs a positive size (or a parent to take it from)")
        if size > MAX_VIRTUAL_SIZE:
            raise ValueError(f"size {size} is too big for qcow2")
        l2_entries = cluster_size // (16 if extended_l2 else 8)
        l1_size = -(-size // (cluster_size * l2_entries))
        if l1_size * 8 > MAX_L1_BYTES:
            raise ValueError(f"size {size} needs an L1 table over 32 MiB; use a bigger cluster_size")

        # Cluster 0: header, extensions, backing file name.  Cluster 1: refcount table.  Cluster 2: the
        # first refcount block.  The L1 table is then allocated like any other cluster.
        header_length = 112 if version == 3 else 72
        extensions = b""
        if backing_format:
            ext = HeaderExtension(type=EXT_BACKING_FORMAT, length=len(backing_format)).to_bytes()
            pad = -len(backing_format) % 8
            extensions += ext + backing_format + bytes(pad)
        extensions += bytes(HeaderExtension.SIZE)  # end of extensions
        backing_offset = header_length + len(extensions) if backing_name else 0
        if backing_offset + len(backing_name) > cluster_size:
            raise ValueError("the backing file name does not fit in one cluster; use a bigger cluster_size")
        base_header = QCow2HeaderV2(
            magic=MAGIC,
            version=version,
            backing_file_offset=backing_offset,
            backing_file_size=len(backing_name),
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=0,
            l1_size=0,
            l1_table_offset=0,
            refcount_table_offset=cluster_size,
            refcount_table_clusters=1,
            nb_snapshots=0,
            snapshots_offset=0,
        ).to_bytes()
        if version == 3:
            base_header += QCow2HeaderV3(
                incompatible_features=INCOMPAT_EXTENDED_L2 if extended_l2 else 0,
                compatible_features=0,
                autoclear_features=0,
                refcount_order=refcount_bits.bit_length() - 1,
                header_length=header_length,
            ).to_bytes()
            base_header += bytes(header_length - len(base_header))  # compression type 0 (deflate), padding
        cluster0 = bytearray(cluster_size)
        blob = base_header + extensions + backing_name
        cluster0[: len(blob)] = blob
        reftable = (2 * cluster_size).to_bytes(8, "big") + bytes(cluster_size - 8)

        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pwrite_all(fd, bytes(cluster0) + reftable + bytes(cluster_size), 0)
            refcounts = Refcounts(
                fd,
                path,
                cluster_bits=cluster_bits,
                refcount_order=refcount_bits.bit_length() - 1,
                table_offset=cluster_size,
                table_clusters=1,
                file_size=0,
                set_table=lambda off, n: pwrite_all(
                    fd, off.to_bytes(8, "big") + n.to_bytes(4, "big"), REFTABLE_OFFSET_FIELD
                ),
            )
            for _ in range(3):  # header, refcount table, first refcount block
                refcounts.allocate()
            l1_clusters = -(-l1_size * 8 // cluster_size)
            l1_offset = refcounts.allocate(l1_clusters)
            refcounts.flush()
            end = l1_offset + l1_clusters * cluster_size
            if os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
            pwrite_all(fd, l1_size.to_bytes(4, "big") + l1_offset.to_bytes(8, "big"), L1_OFFSET_FIELD)
            os.close(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls.open(path, writable=True, guard=guard.enter(path))

    # -- snapshots ------------------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        """The internal snapshots stored in this image, in table order."""
        self._check_open()
        return parse_snapshots(self._fd, self.header, self.path)

    def open_snapshot(self, name: str) -> QCOW2Image:
        """A read-only view of the disk as it was when snapshot ``name`` (or, failing that, id) was taken.

        The view has its own file descriptor and backing chain; close it when done.

        Raises:
            SnapshotNotFoundError: no snapshot has that name or id (the error lists the names).
            ImageFormatError: the snapshot's table entry is damaged.
        """
        snaps = self.snapshots()
        found = [s for s in snaps if s.name == name] or [s for s in snaps if s.id == name]
        if not found:
            raise SnapshotNotFoundError(self.path, name, [s.name for s in snaps])
        snap = found[0]
        field = f"snapshot {snap.name!r}"
        l2_entries = 1 << self._l2_bits
        if snap.disk_size > MAX_VIRTUAL_SIZE:
            raise ImageFormatError(self.path, field, f"disk size {snap.disk_size} is absurd")
        if snap.l1_size < -(-snap.disk_size // (self._cs * l2_entries)):
            raise ImageFormatError(
                self.path, field, f"L1 size {snap.l1_size} cannot map {snap.disk_size} bytes"
            )
        fd = os.dup(self._fd)
        try:
            l1 = _native_u64(
                pread_exact(fd, snap.l1_table_offset, snap.l1_size * 8, self.path, f"{field} L1")
            )
            parent = self._open_backing(
                self.path, self.header, ChainGuard(policy=self._parents).enter(self.path)
            )
        except BaseException:
            os.close(fd)
            raise
        return type(self)(
            self.path,
            fd,
            header=self.header,
            l1=l1,
            writable=False,
            parent=parent,
            size=snap.disk_size,
            snapshot=snap.name,
        )

    # -- metadata access ----------------------------------------------------------------------

    def _l2_table(self, l1_index: int, l2_offset: int) -> array[int]:
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            return table
        if l2_offset & (self._cs - 1):
            raise ImageFormatError(
                self.path, "L1 table", f"entry {l1_index} points at unaligned L2 table {l2_offset:#x}"
            )
        data = pread_exact(self._fd, l2_offset, self._cs, self.path, f"L2 table (L1 entry {l1_index})")
        if len(self._l2_cache) * self._cs >= _L2_CACHE_BYTES:  # drop the oldest table written out
            victim = next((k for k in self._l2_cache if k not in self._dirty_l2), None)
            if victim is not None:
                del self._l2_cache[victim]
        table = _native_u64(data)
        self._l2_cache[l2_offset] = table
        return table

    def _decompress(self, entry: int) -> bytes:
        if self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        offset = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        length = sectors * 512 - (offset & 511)
        data = os.pread(self._fd, length, offset)
        if not data:
            raise ImageFormatError(
                self.path, "L2 table", f"compressed cluster at {offset:#x} lies past the end of the file"
            )
        cs = self._cs
        try:
            if self.header.compression_type == 0:
                out = zlib.decompressobj(-15).decompress(data, cs)
            else:
                out = self._zstd_decompress(data)
        except zlib.error as exc:
            raise ImageFormatError(
                self.path, "compressed cluster", f"deflate data at {offset:#x} is damaged: {exc}"
            ) from exc
        if len(out) < cs:
            raise ImageFormatError(
                self.path,
                "compressed cluster",
                f"data at {offset:#x} decompresses to {len(out)} of {cs} B",
            )
        out = out[:cs]
        self._compressed_cache = (entry, out)
        return out

    def _zstd_decompress(self, data: bytes) -> bytes:
        try:
            import zstandard  # noqa: PLC0415  (optional dependency, needed only for zstd clusters)
        except ImportError as exc:
            raise MissingDependencyError(
                f"{self.path} has zstd-compressed clusters; install the zstandard module "
                "(`pip install zstandard`, or the `pyti[zstd]` extra)"
            ) from exc
        try:
            out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as exc:
            raise ImageFormatError(self.path, "compressed cluster", f"zstd data is damaged: {exc}") from exc
        return out

    # -- reading --------------------------------------------------------------------------------

    @override
    def _lookup(self, offset: int, remaining: int) -> tuple[int, int, int]:
        cbits = self._cbits
        cmask = self._cs - 1
        l2_bits = self._l2_bits
        l2_mask = (1 << l2_bits) - 1
        cluster = offset >> cbits
        within = offset & cmask
        l1_index = cluster >> l2_bits
        l1 = self._l1
        l1_entry = l1[l1_index] if l1_index < len(l1) else 0
        l2_offset = l1_entry & _OFFSET_MASK
        if not l2_offset:  # no L2 table: its whole range is unallocated
            return PARENT, 0, (((l1_index + 1) << l2_bits) << cbits) - offset
        table = self._l2_cache.get(l2_offset)
        if table is None:
            table = self._l2_table(l1_index, l2_offset)
        index = cluster & l2_mask
        if self._ext:
            entry = table[2 * index]
            if entry & _COMPRESSED:
                return OTHER, entry, self._cs - within
            kind, span, host = self._subcluster_run(
                cluster, entry, entry & _OFFSET_MASK, table[2 * index + 1], within
            )
            return kind, host, span
        entry = table[index]
        if entry & _COMPRESSED:
            return OTHER, entry, self._cs - within
        if entry & _L2_RESERVED:
            raise ImageFormatError(
                self.path, "L2 table", f"entry for cluster {cluster} has reserved bits set"
            )
        span = self._cs - within
        count = min((remaining + within - 1) >> cbits, l2_mask - index)
        base = entry & _OFFSET_MASK
        if entry & _ZERO:
            kind = ZERO
        elif base:
            # Fast path: the following entries continue the run on the host (checked in C).
            if count > 0:
                step = self._cs
                run = array("Q", range(entry + step, entry + (count + 1) * step, step))
                if table[index + 1 : index + 1 + count] == run:
                    span += count * step
            return DATA, base + within, span
        else:
            kind = PARENT
        # a run of unallocated or plain zero entries
        if (
            entry <= _ZERO
            and count > 0
            and table[index + 1 : index + 1 + count] == array("Q", [entry]) * count
        ):
            span += count << cbits
        return kind, 0, span

    @override
    def _fill_other(self, offset: int, view: memoryview, host: int) -> None:
        within = offset & (self._cs - 1)
        view[:] = memoryview(self._decompress(host))[within : within + len(view)]

    def _subcluster_run(
        self, cluster: int, entry: int, base: int, bitmap: int, within: int
    ) -> tuple[int, int, int]:
        """(kind, bytes, host offset) of the run of like subclusters starting at ``within``."""
        alloc = bitmap & _ALL_SUBCLUSTERS
        zero = bitmap >> 32
        if alloc & zero or (alloc and not base) or entry & (_L2_RESERVED | _ZERO):
            raise ImageFormatError(
                self.path, "L2 table", f"extended entry for cluster {cluster} is inconsistent"
            )
        sc_bits = self._cbits - 5
        sc = within >> sc_bits
        bit = 1 << sc
        if alloc & bit:
            kind, same, host = DATA, alloc, base + within
        elif zero & bit:
            kind, same, host = ZERO, zero, 0
        else:
            kind, same, host = PARENT, ~(alloc | zero), 0
        end = sc + 1
        while end < 32 and (same >> end) & 1:
            end += 1
        return kind, (end << sc_bits) - within, host

    @override
    def _fill(self, kind: int, offset: int, view: memoryview, host: int) -> None:
        if kind != DATA:
            super()._fill(kind, offset, view, host)
            return
        done = 0
        total = len(view)
        while done < total:
            got = os.preadv(self._fd, [view[done:]], host + done)
            if got == 0:
                raise ImageFormatError(
                    self.path,
                    "L2 table",
                    f"data cluster at {host + done:#x} lies past the end of the file (truncated image?)",
                )
            done += got

    # -- writing --------------------------------------------------------------------------------

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        rc = self._refcounts
        assert rc is not None
        if self._clear_autoclear:  # we maintain no autoclear feature (e.g. bitmaps): clear them all
            pwrite_all(self._fd, bytes(8), AUTOCLEAR_OFFSET)
            self._clear_autoclear = False
        cbits = self._cbits
        cs = self._cs
        pieces: list[tuple[int, memoryview | bytes | bytearray]] = []
        n = len(data)
        pos = 0
        try:
            while pos < n:
                voff = offset + pos
                cluster = voff >> cbits
                within = voff & (cs - 1)
                span = min(cs - within, n - pos)
                self._write_cluster(rc, cluster, within, data[pos : pos + span], pieces)
                pos += span
        except BaseException:
            # Nothing of this write reached the tables on disk: forget its changes in memory (the
            # clusters it allocated stay counted, so at worst they leak).
            for l2_offset in self._dirty_l2:
                self._l2_cache.pop(l2_offset, None)
            self._dirty_l2.clear()
            rc.discard_frees()
            raise
        _pwrite_runs(self._fd, pieces)  # 1. data
        rc.flush()  # 2. refcounts of new clusters
        for l2_offset, (lo, hi) in self._dirty_l2.items():  # 3. L2 entries
            table = self._l2_cache[l2_offset]
            pwrite_all(self._fd, _disk_u64(table[lo:hi]), l2_offset + 8 * lo)
        self._dirty_l2.clear()
        rc.apply_frees()  # 4. clusters nothing points at any more

    def _l2_for_write(self, rc: Refcounts, l1_index: int) -> tuple[int, array[int]]:
        """The L2 table for ``l1_index``, allocated or copied (when shared) so it can be written."""
        l1_entry = self._l1[l1_index]
        old = l1_entry & _OFFSET_MASK
        if old and rc.get(old >> self._cbits) == 1:
            table = self._l2_table(l1_index, old)
            if not l1_entry & _COPIED:
                self._set_l1(l1_index, old | _COPIED)
            return old, table
        table = array("Q", self._l2_table(l1_index, old)) if old else array("Q", bytes(self._cs))
        new = rc.allocate()
        pwrite_all(self._fd, _disk_u64(table), new)
        rc.flush()
        self._l2_cache[new] = table
        self._set_l1(l1_index, new | _COPIED)
        if old:
            rc.free_later(old, self._cs)
            self._l2_cache.pop(old, None)
        return new, table

    def _set_l1(self, index: int, value: int) -> None:
        self._l1[index] = value
        pwrite_all(self._fd, value.to_bytes(8, "big"), self._l1_offset + 8 * index)

    def _current(self, start: int, length: int) -> bytearray:
        """The disk's current bytes at ``[start, +length)``, zeros past its end."""
        content = bytearray(length)
        readable = min(length, self.size - start)
        if readable > 0:
            self._readinto_at(start, memoryview(content)[:readable])
        return content

    def _write_cluster(
        self,
        rc: Refcounts,
        cluster: int,
        within: int,
        chunk: memoryview,
        pieces: list[tuple[int, memoryview | bytes | bytearray]],
    ) -> None:
        cs = self._cs
        cbits = self._cbits
        if len(chunk) == cs and not self._ext and _all_zero(chunk) and self._write_zero_cluster(rc, cluster):
            return
        l1_index = cluster >> self._l2_bits
        l2_offset, table = self._l2_for_write(rc, l1_index)
        index = cluster & ((1 << self._l2_bits) - 1)
        slot = 2 * index if self._ext else index
        entry = table[slot]
        bitmap = table[slot + 1] if self._ext else 0
        vbase = cluster << cbits
        host = entry & _OFFSET_MASK
        past_end = host >> cbits >= rc.alloc_end
        if past_end and not entry & _COMPRESSED and (self._ext or not entry & _ZERO):
            raise ImageFormatError(
                self.path, "L2 table", f"cluster {cluster} points past the end of the file ({host:#x})"
            )
        if entry & _COMPRESSED:
            target = rc.allocate()
            offset = entry & self._coffset_mask
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            rc.free_later(offset & ~511, sectors * 512)
            lo, hi = 0, cs
            bitmap = _ALL_SUBCLUSTERS
        elif not self._ext:
            if host and not entry & _ZERO and rc.get(host >> cbits) == 1:
                pieces.append((host + within, chunk))
                if not entry & _COPIED:
                    table[slot] = host | _COPIED
                    self._mark_dirty(l2_offset, slot, slot + 1)
                return
            if host and entry & _ZERO and not past_end and rc.get(host >> cbits) == 1:
                target = host  # a preallocated zero cluster: reuse it
            else:
                target = rc.allocate()
                if host:
                    rc.free_later(host, cs)
            lo, hi = 0, cs
        else:
            sc_bits = cbits - 5
            first = within >> sc_bits
            last = (within + len(chunk) - 1) >> sc_bits
            units = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            if host and rc.get(host >> cbits) == 1:
                target = host
            else:
                target = rc.allocate()
                if host:
                    units |= bitmap & _ALL_SUBCLUSTERS  # copy what the shared cluster holds
                    rc.free_later(host, cs)
            low_unit = (units & -units).bit_length() - 1
            high_unit = units.bit_length() - 1
            lo, hi = low_unit << sc_bits, (high_unit + 1) << sc_bits
            span_bits = ((1 << (high_unit + 1)) - 1) & ~((1 << low_unit) - 1)
            bitmap = (bitmap | span_bits) & ~(span_bits << 32)
        if within == lo and within + len(chunk) == hi:
            pieces.append((target + lo, chunk))
        else:
            content = self._current(vbase + lo, hi - lo)
            content[within - lo : within - lo + len(chunk)] = chunk
            pieces.append((target + lo, content))
        new_entry = target | _COPIED
        table[slot] = new_entry
        if self._ext:
            table[slot + 1] = bitmap
        self._mark_dirty(l2_offset, slot, slot + (2 if self._ext else 1))

    def _write_zero_cluster(self, rc: Refcounts, cluster: int) -> bool:
        """Record a whole cluster of written zeros without storing data; False when it must be stored.

        Nothing changes where the disk already reads zeros; otherwise (version 3) the entry becomes a
        zero cluster and the clusters it used are released.
        """
        l1_index = cluster >> self._l2_bits
        index = cluster & ((1 << self._l2_bits) - 1)
        l2_offset = self._l1[l1_index] & _OFFSET_MASK
        current = self._l2_table(l1_index, l2_offset)[index] if l2_offset else 0
        if (current & _ZERO and not current & _COMPRESSED) or (current == 0 and self.parent is None):
            return True
        if self.header.version < 3:
            return False
        l2_offset, table = self._l2_for_write(rc, l1_index)
        entry = table[index]
        if entry & _COMPRESSED:
            offset = entry & self._coffset_mask
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            rc.free_later(offset & ~511, sectors * 512)
        elif entry & _OFFSET_MASK:
            rc.free_later(entry & _OFFSET_MASK, self._cs)
        table[index] = _ZERO
        self._mark_dirty(l2_offset, index, index + 1)
        return True

    def _mark_dirty(self, l2_offset: int, lo: int, hi: int) -> None:
        old = self._dirty_l2.get(l2_offset)
        if old is not None:
            lo, hi = min(lo, old[0]), max(hi, old[1])
        self._dirty_l2[l2_offset] = (lo, hi)


_zero_buffers: dict[int, bytes] = {}


def _all_zero(data: memoryview) -> bool:
    """Whether ``data`` holds only zero bytes (cheap for data that does not)."""
    if data[0] or data[-1]:
        return False
    zeros = _zero_buffers.get(len(data))
    if zeros is None:
        zeros = _zero_buffers.setdefault(len(data), bytes(len(data)))
    return bytes(data) == zeros


def _relative_backing_name(child: Path, parent: Path) -> str:
    """The parent's path as the child should store it: relative to the child's folder when possible."""
    # Resolve the folders (the child's may be reached through a symlink), not the parent file itself:
    # a parent that is a symlink stays one.
    child_dir = os.path.realpath(child.parent)
    target = os.path.join(os.path.realpath(parent.parent), parent.name)
    try:
        return os.path.relpath(target, child_dir)
    except ValueError:  # pragma: no cover (different drives; not on POSIX)
        return target
