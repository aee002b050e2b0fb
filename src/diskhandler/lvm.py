"""LVM2: physical volumes on a partition or a whole disk, and their logical volumes as disk views.

On-disk format (LVM2's ``lib/format_text/layout.h`` and ``lib/label/label.h``; verified on volumes
made by the lvm2 tools)::

    one of sectors 0-3:  label header  "LABELONE", its sector, CRC, offset of the PV header, "LVM2 001"
                         PV header     32-character PV UUID, device size, data areas {offset, size}...,
                                       {0, 0}, metadata areas {offset, size}..., {0, 0}
    metadata area:       512-byte header: CRC, magic " LVM2 x[5A%r0N*>", version 1, start, size,
                                       raw locations {offset, size, CRC, flags}... ({0,...} ends them)
                         then a circular buffer holding the volume group's metadata as text

The first raw location is the committed metadata: text at ``offset`` (from the area's start), which
wraps to just after the 512-byte header when it runs past the area's end. Checksums are LVM's CRC-32
(the IEEE polynomial, initial value 0xf597a6cf, no final inversion).

The text is LVM's configuration syntax (``name = value``, ``name { ... }``, lists in ``[ ]``); the
volume group section lists ``physical_volumes`` (``pe_start``, ``pe_count``) and ``logical_volumes``
with ``segmentN`` sections (``start_extent``, ``extent_count``, ``type``, ``stripes = ["pv0", pe]``).
Sizes are in 512-byte sectors; ``extent_size`` is sectors per extent.

Linear volumes (every segment ``striped`` with one stripe) are read and written. Striped volumes are
read-only. Other layouts (mirror, raid, thin, snapshots, cache, vdo, ...) are listed but refuse to
open, naming their layout. Every number the metadata holds is checked before it is used, and the
metadata text is read only up to :data:`MAX_METADATA_TEXT` bytes.
"""

from __future__ import annotations

import bisect
import html
import re
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import attrs
from typing_extensions import override

from diskhandler.errors import LvmMetadataError, ReadOnlyImageError, UnsupportedImageError
from diskhandler.formats._stream import DiskImage, DiskView

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "LogicalVolume",
    "LvmMetadataError",
    "PhysicalVolume",
    "find_physical_volumes",
    "list_logical_volumes",
    "lvm_crc",
    "parse_config",
]

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SCAN_SECTORS = 4
MDA_MAGIC = b"\x20LVM2\x20x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
MAX_METADATA_TEXT = 4 << 20
MAX_DEPTH = 32
_MAX_NUMBER_DIGITS = 20  # 2**64 has 20 digits
MAX_AREAS = 16
MAX_SEGMENTS = 65536
_LINEAR = "linear"
_STRIPED = "striped"


def lvm_crc(data: bytes | memoryview, initial: int = INITIAL_CRC) -> int:
    """LVM2's ``calc_crc``: CRC-32 over ``data`` from ``initial``, without zlib's pre/post inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


# -- the configuration text ---------------------------------------------------------------------------

Value = int | str | list["Value"] | dict[str, "Value"]

_TOKEN = re.compile(
    rb"""
    (?P<space>[ \t\r\n]+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?)(?![A-Za-z_.+-])
  | (?P<name>[A-Za-z0-9_.+\-]+)
  | (?P<punct>[={}\[\],])
    """,
    re.VERBOSE | re.DOTALL,
)


def parse_config(text: bytes, path: Path | None = None) -> dict[str, Value]:
    """Parse LVM's configuration syntax into nested dicts, lists, ints and strings.

    Raises:
        LvmMetadataError: a syntax error, too deep a nesting, or text over the size limit.
    """
    if len(text) > MAX_METADATA_TEXT:
        raise LvmMetadataError(path, "LVM metadata", f"{len(text)} bytes of text is over the limit")
    tokens: list[tuple[str, bytes]] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise LvmMetadataError(path, "LVM metadata", f"unexpected byte {text[pos : pos + 1]!r} at {pos}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, m.group()))
        pos = m.end()
    index = 0

    def fail(why: str) -> LvmMetadataError:
        return LvmMetadataError(path, "LVM metadata", f"{why} (token {index})")

    def value(depth: int) -> Value:
        nonlocal index
        if index >= len(tokens):
            raise fail("a value is missing at the end")
        kind, raw = tokens[index]
        index += 1
        if kind == "string":
            return re.sub(rb"\\(.)", rb"\1", raw[1:-1]).decode("utf-8", "replace")
        if kind == "number":
            whole = raw.split(b".", 1)[0].lstrip(b"-")
            if len(whole) > _MAX_NUMBER_DIGITS:  # LVM's numbers are 64-bit; a guest may write any text
                raise fail(f"a number of {len(whole)} digits (at most {_MAX_NUMBER_DIGITS})")
            return int(raw.split(b".", 1)[0]) if b"." in raw else int(raw)
        if raw == b"[":
            if depth > MAX_DEPTH:
                raise fail("lists nest too deep")
            items: list[Value] = []
            while True:
                if index >= len(tokens):
                    raise fail("a list is not closed")
                if tokens[index][1] == b"]":
                    index += 1
                    return items
                items.append(value(depth + 1))
                if index < len(tokens) and tokens[index][1] == b",":
                    index += 1
        raise fail(f"unexpected {raw!r}")

    def section(depth: int, closing: bool) -> dict[str, Value]:
        nonlocal index
        if depth > MAX_DEPTH:
            raise fail("sections nest too deep")
        out: dict[str, Value] = {}
        while index < len(tokens):
            kind, raw = tokens[index]
            if raw == b"}":
                if not closing:
                    raise fail("a '}' without its '{'")
                index += 1
                return out
            if kind not in ("name", "number"):
                raise fail(f"a name was expected, not {raw!r}")
            key = raw.decode("utf-8", "replace")
            index += 1
            if index >= len(tokens):
                raise fail(f"{key} has no value")
            op = tokens[index][1]
            index += 1
            if op == b"=":
                out[key] = value(depth)
            elif op == b"{":
                out[key] = section(depth + 1, True)
            else:
                raise fail(f"'=' or '{{' expected after {key}")
        if closing:
            raise fail("a section is not closed")
        return out

    return section(0, False)


# -- physical volumes -----------------------------------------------------------------------------------


@attrs.frozen
class PhysicalVolume:
    """An LVM2 physical volume found on a disk.

    Attributes:
        uuid: the PV UUID (32 characters, shown by LVM with dashes).
        start: byte offset of the PV in the disk (a partition's start, or 0 for a whole disk).
        size: bytes of the PV's device (the partition or the disk).
        where: ``"disk"`` or ``"partition N"``.
        metadata: the committed metadata text of its first metadata area, or ``b""`` when it has none.
    """

    uuid: str
    start: int
    size: int
    where: str
    metadata: bytes


def _read(disk: DiskImage, offset: int, length: int) -> bytes:
    if offset < 0 or length < 0 or offset + length > disk.size:
        return b""
    return disk.read_at(offset, length)


def _pv_at(disk: DiskImage, start: int, size: int, where: str) -> PhysicalVolume | None:
    """The PV whose label is in one of the first four sectors at ``start``, or None."""
    head = _read(disk, start, LABEL_SCAN_SECTORS * SECTOR)
    path = disk.path
    for sector in range(LABEL_SCAN_SECTORS):
        label = head[sector * SECTOR : (sector + 1) * SECTOR]
        if label[:8] != LABEL_ID:
            continue
        if len(label) < SECTOR:
            return None
        if int.from_bytes(label[8:16], "little") != sector:
            continue  # a label copied from elsewhere
        if lvm_crc(label[20:]) != int.from_bytes(label[16:20], "little"):
            raise LvmMetadataError(path, f"LVM label ({where})", "label checksum is wrong")
        if label[24:32] != LABEL_TYPE:
            raise UnsupportedImageError(
                path, f"LVM label ({where})", f"label type {label[24:32]!r} is not LVM2 001"
            )
        offset = int.from_bytes(label[20:24], "little")
        if not 32 <= offset <= SECTOR - 40:
            raise LvmMetadataError(
                path, f"LVM label ({where})", f"PV header offset {offset} is outside the label"
            )
        pvh = label[offset:]
        pv_uuid = pvh[:32].decode("ascii", "replace")
        areas: list[list[tuple[int, int]]] = [[], []]
        pos = 40
        for which in (0, 1):
            while True:
                if pos + 16 > len(pvh):
                    raise LvmMetadataError(path, f"LVM PV header ({where})", "area lists run past the label")
                a_off = int.from_bytes(pvh[pos : pos + 8], "little")
                a_size = int.from_bytes(pvh[pos + 8 : pos + 16], "little")
                pos += 16
                if a_off == 0 and a_size == 0:
                    break
                if len(areas[which]) >= MAX_AREAS:
                    raise LvmMetadataError(path, f"LVM PV header ({where})", "too many areas")
                areas[which].append((a_off, a_size))
        text = b""
        for mda_offset, mda_size in areas[1]:
            text = _committed_text(disk, start, size, mda_offset, mda_size, where)
            if text:
                break
        return PhysicalVolume(uuid=pv_uuid, start=start, size=size, where=where, metadata=text)
    return None


def _committed_text(  # noqa: PLR0917  (private; one caller)
    disk: DiskImage, start: int, size: int, offset: int, area: int, where: str
) -> bytes:
    path = disk.path
    what = f"LVM metadata area ({where})"
    if offset < SECTOR or area < 2 * MDA_HEADER_SIZE or offset + area > size:
        raise LvmMetadataError(path, what, f"area at {offset} of {area} bytes is outside the volume")
    header = _read(disk, start + offset, MDA_HEADER_SIZE)
    if len(header) < MDA_HEADER_SIZE:
        raise LvmMetadataError(path, what, "lies past the end of the disk")
    if header[4:20] != MDA_MAGIC:
        raise LvmMetadataError(path, what, "no metadata area magic")
    if lvm_crc(header[4:]) != int.from_bytes(header[:4], "little"):
        raise LvmMetadataError(path, what, "header checksum is wrong")
    version = int.from_bytes(header[20:24], "little")
    if version != 1:
        raise UnsupportedImageError(path, what, f"metadata area version {version} is not 1")
    raw_off = int.from_bytes(header[40:48], "little")
    raw_size = int.from_bytes(header[48:56], "little")
    raw_crc = int.from_bytes(header[56:60], "little")
    if raw_off == 0 and raw_size == 0:
        return b""
    ring = area - MDA_HEADER_SIZE
    if not MDA_HEADER_SIZE <= raw_off < area or raw_size > min(ring, MAX_METADATA_TEXT):
        raise LvmMetadataError(path, what, f"metadata text at {raw_off} of {raw_size} bytes does not fit")
    first = min(raw_size, area - raw_off)
    text = _read(disk, start + offset + raw_off, first)
    if first < raw_size:  # the circular buffer wraps to just after the header
        text += _read(disk, start + offset + MDA_HEADER_SIZE, raw_size - first)
    if len(text) != raw_size or lvm_crc(text) != raw_crc:
        raise LvmMetadataError(path, what, "metadata text checksum is wrong")
    return text.rstrip(b"\0")


def find_physical_volumes(disk: DiskImage, partitions: Sequence[DiskImage] = ()) -> list[PhysicalVolume]:
    """The PVs on ``disk``: on each of ``partitions`` (views with ``start``/``number``), or on the whole
    disk when it has none."""
    found: list[PhysicalVolume] = []
    if not partitions:
        pv = _pv_at(disk, 0, disk.size, "disk")
        if pv is not None:
            found.append(pv)
    for part in partitions:
        if getattr(part, "is_extended", False):
            continue
        start = int(getattr(part, "start", 0))
        pv = _pv_at(disk, start, part.size, f"partition {getattr(part, 'number', '?')}")
        if pv is not None:
            found.append(pv)
    return found


# -- logical volumes ------------------------------------------------------------------------------------


def _dashed(pv_uuid: str) -> str:
    """LVM prints the 32 PV UUID characters as 6-4-4-4-4-4-6."""
    if len(pv_uuid) != 32:
        return pv_uuid
    cuts = (6, 4, 4, 4, 4, 4, 6)
    parts: list[str] = []
    pos = 0
    for c in cuts:
        parts.append(pv_uuid[pos : pos + c])
        pos += c
    return "-".join(parts)


@attrs.frozen
class _Run:
    lv_offset: int
    disk_offset: int
    length: int


class LogicalVolume(DiskView):
    """A logical volume as a ``DiskImage`` over the extents it occupies on the disk.

    Reads and writes go to the disk (writable iff the disk is and the layout is linear). Closing a
    volume does not close the disk.

    Attributes:
        name: ``"VG/LV"``, as ``lvs`` shows it; ``vg`` and ``lv`` separately.
        layout: ``"linear"``, ``"striped"`` or the LVM segment type that makes it unusable here
            (``"mirror"``, ``"raid1"``, ``"thin"``, ``"snapshot"``, ...).
        supported: whether diskhandler can read it (linear and striped volumes).
        reason: why it cannot be opened or written (``""`` when it can).
        extent_map: ``(volume offset, disk offset, length)`` runs covering the volume (linear volumes;
            empty otherwise).
        view_name: the file name of this volume in a vdfuse view (``VG-LV``, dashes in names doubled,
            as device-mapper names them).
    """

    format: ClassVar[str] = "lvm"
    scheme: ClassVar[str] = "lvm"
    is_extended: ClassVar[bool] = False

    def __init__(
        self,
        disk: DiskImage,
        *,
        vg: str,
        lv: str,
        size: int,
        layout: str,
        runs: Sequence[_Run],
        stripes: Sequence[tuple[int, int, int, int, Sequence[int]]] = (),
        reason: str = "",
        read_only_reason: str = "",
    ) -> None:
        writable = disk.writable() and layout == _LINEAR and not reason and not read_only_reason
        super().__init__(disk, size=size, writable=writable)
        self.vg = vg
        self.lv = lv
        self.name = f"{vg}/{lv}"
        self.layout = layout
        self.reason = reason or read_only_reason
        self.supported = not reason
        self._runs = list(runs)
        self._starts = [r.lv_offset for r in self._runs]
        self._stripes = list(stripes)  # (lv start, lv length, stripe bytes, count, disk starts)
        self._stripe_starts = [s[0] for s in self._stripes]
        self.view_name = f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"

    @property
    def key(self) -> str:
        """How to ask for it (``DiskOperations(image, partition="VG/LV")``): ``"VG/LV"``."""
        return self.name

    @property
    def extent_map(self) -> tuple[tuple[int, int, int], ...]:
        """``(volume offset, disk offset, length)`` of each run of a linear volume, in order."""
        return tuple((r.lv_offset, r.disk_offset, r.length) for r in self._runs)

    def check_usable(self) -> None:
        """Raise :class:`UnsupportedImageError` naming the layout when the volume cannot be read."""
        if not self.supported:
            raise UnsupportedImageError(self.path, f"logical volume {self.name}", self.reason)

    @override
    def _readinto_at(self, offset: int, buf: memoryview) -> None:
        self.check_usable()
        if self._stripes:
            self._read_striped(offset, buf)
            return
        index = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        total = len(buf)
        while pos < total:
            run = self._runs[index]
            within = offset + pos - run.lv_offset
            take = min(run.length - within, total - pos)
            self.disk.readinto_at(run.disk_offset + within, buf[pos : pos + take])
            pos += take
            index += 1

    def _read_striped(self, offset: int, buf: memoryview) -> None:
        pos = 0
        total = len(buf)
        while pos < total:
            here = offset + pos
            index = bisect.bisect_right(self._stripe_starts, here) - 1
            seg_start, seg_len, stripe_bytes, count, starts = self._stripes[index]
            within = here - seg_start
            chunk, inside = divmod(within, stripe_bytes)
            row, column = divmod(chunk, count)
            take = min(stripe_bytes - inside, total - pos, seg_start + seg_len - here)
            self.disk.readinto_at(starts[column] + row * stripe_bytes + inside, buf[pos : pos + take])
            pos += take

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        if self.layout != _LINEAR or self.reason:  # pragma: no cover - write_at checks writable() first
            raise ReadOnlyImageError(f"{self.path}: logical volume {self.name} is read-only: {self.reason}")
        index = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        total = len(data)
        while pos < total:
            run = self._runs[index]
            within = offset + pos - run.lv_offset
            take = min(run.length - within, total - pos)
            self.disk.write_at(run.disk_offset + within, data[pos : pos + take])
            pos += take
            index += 1

    @override
    def _view_label(self) -> str:
        return f"logical volume {self.name}"

    def _summary(self) -> str:
        note = f" ({self.reason})" if self.reason else ""
        return f"lvm {self.name} size={self.size} layout={self.layout}{note}"

    @override
    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<LogicalVolume {self._summary()} of {str(self.path)!r}{state}>"

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(repr(self))}</code>"


def _int(
    section: dict[str, Value], key: str, where: str, path: Path, *, low: int = 0, high: int = 1 << 62
) -> int:
    value = section.get(key)
    if not isinstance(value, int) or not low <= value <= high:
        raise LvmMetadataError(path, where, f"{key} = {value!r} is not a number from {low} to {high}")
    return value


def _dict(section: dict[str, Value], key: str, where: str, path: Path) -> dict[str, Value]:
    value = section.get(key, {})
    if not isinstance(value, dict):
        raise LvmMetadataError(path, where, f"{key} is not a section")
    return value


def _volume_group(
    disk: DiskImage, vg_name: str, vg: dict[str, Value], pvs_by_uuid: dict[str, PhysicalVolume]
) -> list[LogicalVolume]:
    path = disk.path
    where = f"volume group {vg_name}"
    extent = _int(vg, "extent_size", where, path, low=1, high=1 << 32) * SECTOR
    pv_place: dict[str, tuple[int, int] | None] = {}  # pv name -> (data start in disk, extents) or missing
    for pv_name, pv in _dict(vg, "physical_volumes", where, path).items():
        if not isinstance(pv, dict):
            raise LvmMetadataError(path, where, f"physical volume {pv_name} is not a section")
        pv_id = str(pv.get("id", "")).replace("-", "")
        found = pvs_by_uuid.get(pv_id)
        pe_start = _int(pv, "pe_start", f"{where}, {pv_name}", path) * SECTOR
        pe_count = _int(pv, "pe_count", f"{where}, {pv_name}", path)
        if found is None:
            pv_place[pv_name] = None
            continue
        if pe_start + pe_count * extent > found.size:
            raise LvmMetadataError(
                path,
                f"{where}, {pv_name}",
                f"{pe_count} extents from {pe_start} do not fit in the {found.size}-byte PV",
            )
        pv_place[pv_name] = (found.start + pe_start, pe_count)
    lvs = _dict(vg, "logical_volumes", where, path)
    origins_with_snapshots: set[str] = set()
    for lv in lvs.values():
        if isinstance(lv, dict):
            for item in lv.values():
                if (
                    isinstance(item, dict)
                    and item.get("type") == "snapshot"
                    and isinstance(item.get("origin"), str)
                ):
                    origins_with_snapshots.add(str(item["origin"]))
    volumes: list[LogicalVolume] = []
    for lv_name, lv in lvs.items():
        if not isinstance(lv, dict):
            raise LvmMetadataError(path, where, f"logical volume {lv_name} is not a section")
        status = lv.get("status", [])
        if not isinstance(status, list) or "VISIBLE" not in status:
            continue  # internal volumes (raid images, pool metadata, snapshot COW stores)
        lv_where = f"{where}, logical volume {lv_name}"
        count = _int(lv, "segment_count", lv_where, path, low=1, high=MAX_SEGMENTS)
        runs: list[_Run] = []
        stripes: list[tuple[int, int, int, int, list[int]]] = []
        layouts: list[str] = []
        reason = ""
        next_extent = 0
        for number in range(1, count + 1):
            seg = lv.get(f"segment{number}")
            if not isinstance(seg, dict):
                raise LvmMetadataError(path, lv_where, f"segment{number} is missing")
            seg_where = f"{lv_where}, segment{number}"
            start_extent = _int(seg, "start_extent", seg_where, path, high=1 << 40)
            extents = _int(seg, "extent_count", seg_where, path, low=1, high=1 << 40)
            if start_extent != next_extent:
                raise LvmMetadataError(path, seg_where, f"starts at extent {start_extent}, not {next_extent}")
            next_extent += extents
            seg_type = str(seg.get("type", "?"))
            if seg_type != "striped":
                layouts.append(seg_type)
                reason = (
                    reason
                    or f"its {seg_type!r} segments are not supported; only linear and striped volumes are"
                )
                continue
            nstripes = _int(seg, "stripe_count", seg_where, path, low=1, high=128)
            pairs = seg.get("stripes")
            if not isinstance(pairs, list) or len(pairs) != 2 * nstripes:
                raise LvmMetadataError(
                    path, seg_where, "stripes does not list one (PV, extent) pair per stripe"
                )
            if extents % nstripes:
                raise LvmMetadataError(
                    path, seg_where, f"{extents} extents do not divide into {nstripes} stripes"
                )
            per_stripe = extents // nstripes
            disk_starts: list[int] = []
            for i in range(nstripes):
                stripe_pv, pe = pairs[2 * i], pairs[2 * i + 1]
                if not isinstance(stripe_pv, str) or not isinstance(pe, int) or stripe_pv not in pv_place:
                    raise LvmMetadataError(path, seg_where, f"stripe {i} names no known PV")
                place = pv_place[stripe_pv]
                if place is None:
                    reason = reason or f"physical volume {stripe_pv} is not on this disk"
                    disk_starts.append(0)
                    continue
                if pe < 0 or pe + per_stripe > place[1]:
                    raise LvmMetadataError(
                        path, seg_where, f"extents {pe}+{per_stripe} run past {stripe_pv}'s end"
                    )
                disk_starts.append(place[0] + pe * extent)
            lv_start = start_extent * extent
            if nstripes == 1:
                layouts.append(_LINEAR)
                if runs and runs[-1].disk_offset + runs[-1].length == disk_starts[0]:
                    last = runs.pop()
                    runs.append(_Run(last.lv_offset, last.disk_offset, last.length + extents * extent))
                else:
                    runs.append(_Run(lv_start, disk_starts[0], extents * extent))
            else:
                layouts.append(_STRIPED)
                stripe_bytes = _int(seg, "stripe_size", seg_where, path, low=1, high=1 << 32) * SECTOR
                if extent % stripe_bytes:
                    raise LvmMetadataError(path, seg_where, "the stripe size does not divide the extent size")
                stripes.append((lv_start, extents * extent, stripe_bytes, nstripes, disk_starts))
        layout = (
            _LINEAR
            if set(layouts) == {_LINEAR}
            else _STRIPED
            if set(layouts) <= {_LINEAR, _STRIPED}
            else next(lt for lt in layouts if lt not in (_LINEAR, _STRIPED))
        )
        if layout == _STRIPED:
            # one table for reading: linear runs become single-stripe entries
            stripes.extend((r.lv_offset, r.length, r.length, 1, [r.disk_offset]) for r in runs)
            stripes.sort(key=lambda s: s[0])
            runs = []
        read_only = ""
        if layout == _STRIPED:
            read_only = "striped volumes are read-only here"
        elif lv_name in origins_with_snapshots:
            read_only = "it has snapshots, which writing it directly would corrupt"
        elif "WRITE" not in status:
            read_only = "LVM marks it read-only"
        volumes.append(
            LogicalVolume(
                disk,
                vg=vg_name,
                lv=lv_name,
                size=next_extent * extent,
                layout=layout,
                runs=runs if not reason else [],
                stripes=stripes if not reason else [],
                reason=reason,
                read_only_reason=read_only,
            )
        )
    return volumes


def list_logical_volumes(disk: DiskImage, partitions: Sequence[DiskImage] = ()) -> list[LogicalVolume]:
    """The visible logical volumes of the volume groups whose PVs are on ``disk``, sorted by name.

    For each volume group the metadata with the highest ``seqno`` among its PVs is used.

    Raises:
        LvmMetadataError: a PV label, metadata area header, checksum or the metadata text is damaged.
        UnsupportedImageError: an LVM label or metadata version other than LVM2's.
    """
    pvs = find_physical_volumes(disk, partitions)
    if not pvs:
        return []
    by_uuid = {pv.uuid: pv for pv in pvs}
    groups: dict[str, tuple[int, str, dict[str, Value]]] = {}
    for pv in pvs:
        if not pv.metadata:
            continue
        config = parse_config(pv.metadata, disk.path)
        for name, vg in config.items():
            if not isinstance(vg, dict) or "physical_volumes" not in vg:
                continue
            vg_id = str(vg.get("id", name))
            seqno = vg.get("seqno", 0)
            seq = seqno if isinstance(seqno, int) else 0
            if vg_id not in groups or groups[vg_id][0] < seq:
                groups[vg_id] = (seq, name, vg)
    volumes: list[LogicalVolume] = []
    for _seq, name, vg in groups.values():
        volumes.extend(_volume_group(disk, name, vg, by_uuid))
    return sorted(volumes, key=lambda v: v.name)
