"""The VHDX metadata log ([MS-VHDX] 2.3): finding the active sequence, replaying it, writing entries.

The log is a ring buffer of entries, each a run of 4 KiB sectors: descriptor sectors (the first starts
with a 64-byte entry header), then one data sector per data descriptor. Every sector repeats the entry's
sequence number and the whole entry carries a CRC-32C, so torn or stale entries are recognised.

Replay finds the newest valid and complete sequence (2.3.3) and yields the writes it describes, in
order. Every size the log declares is checked against the log's own length, and the whole log is
held in memory only up to :data:`MAX_LOG_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs

from diskhandler.errors import ImageFormatError, UnsupportedImageError
from diskhandler.formats._vhdx_layout import (
    DATA_DESC_SIGNATURE,
    DATA_SECTOR_SIGNATURE,
    LOG_ENTRY_SIGNATURE,
    LOG_SECTOR,
    ZERO_DESC_SIGNATURE,
    LogDataDescriptor,
    LogEntryHeader,
    checksum,
)

__all__ = ["MAX_LOG_BYTES", "LogWrite", "build_entry", "find_replay"]

MAX_LOG_BYTES = 64 << 20
MAX_ZERO_LENGTH = 256 << 20
_DESC_SIZE = 32
_DESCS_PER_SECTOR = LOG_SECTOR // _DESC_SIZE  # 128; the first sector has room for 126 after the header
_HEADER_SLOTS = LogEntryHeader.SIZE // _DESC_SIZE  # 2


@attrs.frozen
class LogWrite:
    """One update a log entry describes: ``data`` at ``offset``, or ``length`` zeros when ``data`` is None."""

    offset: int
    length: int
    data: bytes | None


@attrs.frozen
class _Entry:
    start: int
    header: LogEntryHeader
    writes: tuple[LogWrite, ...]


def _descriptor_sectors(count: int) -> int:
    return -(-(count + _HEADER_SLOTS) // _DESCS_PER_SECTOR)


class _Log:
    def __init__(self, data: bytes, log_guid: bytes, path: Path) -> None:
        self.data = data
        self.length = len(data)
        self.guid = log_guid
        self.path = path
        self.seen: dict[int, _Entry | None] = {}
        # checksumming is the costly part of a scan: a hostile log of entries that are valid but for
        # their checksum could make it quadratic; this bounds it (a real log needs about one pass)
        self.budget = 4 * self.length + (256 << 20)

    def sectors(self, start: int, count: int) -> bytes:
        """``count`` sectors from ``start``, wrapping around the end of the ring."""
        end = start + count * LOG_SECTOR
        if end <= self.length:
            return self.data[start:end]
        return self.data[start:] + self.data[: end - self.length]

    def entry(self, start: int) -> _Entry | None:
        """The valid entry at ``start``, or None (each place is examined once)."""
        if start not in self.seen:
            self.seen[start] = self._entry(start)
        return self.seen[start]

    def _entry(self, start: int) -> _Entry | None:
        """2.3.1: every field checked, the checksum last."""
        first = self.data[start : start + LOG_SECTOR]
        if first[:4] != LOG_ENTRY_SIGNATURE:
            return None
        head = LogEntryHeader.from_bytes(first, self.path)
        length = head.entry_length
        if (
            length < LOG_SECTOR
            or length % LOG_SECTOR
            or length > self.length
            or head.tail % LOG_SECTOR
            or head.tail >= self.length
            or head.sequence_number == 0
            or head.log_guid != self.guid
            or head.flushed_file_offset % (1 << 20)
            or head.last_file_offset % (1 << 20)
        ):
            return None
        nsect = length // LOG_SECTOR
        count = head.descriptor_count
        dsect = _descriptor_sectors(count)
        if dsect > nsect:
            return None
        self.budget -= length
        if self.budget < 0:
            raise ImageFormatError(
                self.path, "log", "the log is too damaged to find its active sequence in bounded time"
            )
        raw = self.sectors(start, nsect)
        if checksum(raw) != head.checksum:
            return None
        writes: list[LogWrite] = []
        data_index = dsect
        seq = head.sequence_number
        for i in range(count):
            at = (i + _HEADER_SLOTS) * _DESC_SIZE
            desc = LogDataDescriptor.from_bytes(raw[at : at + _DESC_SIZE], self.path)
            if desc.sequence_number != seq or desc.file_offset % LOG_SECTOR:
                return None
            if desc.signature == ZERO_DESC_SIGNATURE:
                if desc.leading % LOG_SECTOR or desc.leading > MAX_ZERO_LENGTH:
                    return None
                writes.append(LogWrite(desc.file_offset, desc.leading, None))
            elif desc.signature == DATA_DESC_SIGNATURE:
                if data_index >= nsect:
                    return None
                sector = raw[data_index * LOG_SECTOR : (data_index + 1) * LOG_SECTOR]
                data_index += 1
                if (
                    sector[:4] != DATA_SECTOR_SIGNATURE
                    or int.from_bytes(sector[4:8], "little") != seq >> 32
                    or int.from_bytes(sector[-4:], "little") != seq & 0xFFFFFFFF
                ):
                    return None
                update = (
                    desc.leading.to_bytes(8, "little") + sector[8:-4] + desc.trailing.to_bytes(4, "little")
                )
                writes.append(LogWrite(desc.file_offset, LOG_SECTOR, update))
            else:
                return None
        return _Entry(start, head, tuple(writes))


def find_replay(
    read: Callable[[int, int], bytes],
    *,
    log_offset: int,
    log_length: int,
    log_guid: bytes,
    file_size: int,
    path: Path,
) -> tuple[list[LogWrite], int]:
    """The writes of the active log sequence, in replay order, and the size the file must grow to.

    Raises:
        ImageFormatError: the header says the log has entries but no valid sequence is there, or the
            file is shorter than the log says it was (truncated).
        UnsupportedImageError: a log larger than :data:`MAX_LOG_BYTES`.
    """
    if log_length > MAX_LOG_BYTES:
        raise UnsupportedImageError(
            path,
            "log length",
            f"a {log_length}-byte log needs replaying; diskhandler replays logs up to 64 MiB",
        )
    data = read(log_offset, log_length)
    log = _Log(data, log_guid, path)
    best: list[_Entry] = []
    best_seq = 0
    tail = 0
    old_tail = 0
    while True:
        seq_entries: list[_Entry] = []
        head = tail
        while len(seq_entries) * LOG_SECTOR < log_length:  # a sequence cannot hold more entries than sectors
            entry = log.entry(head)
            if entry is None:
                break
            if seq_entries and entry.header.sequence_number != seq_entries[-1].header.sequence_number + 1:
                break
            seq_entries.append(entry)
            head = (head + entry.header.entry_length) % log_length
        valid = False
        if seq_entries:
            want = seq_entries[-1].header.tail
            for i, entry in enumerate(seq_entries):
                if entry.start == want:
                    seq_entries = seq_entries[i:]
                    valid = True
                    break
        if valid and seq_entries[-1].header.sequence_number > best_seq:
            best, best_seq = seq_entries, seq_entries[-1].header.sequence_number
        tail = head if valid else (tail + LOG_SECTOR) % log_length
        if tail <= old_tail:
            break
        old_tail = tail
    if not best:
        raise ImageFormatError(
            path,
            "log",
            "the header says the log holds updates, but no valid log sequence is there (damaged image);"
            " Hyper-V's Repair-VHD or `qemu-img check -r all` may recover it",
        )
    last = best[-1].header
    if file_size < last.flushed_file_offset:
        raise ImageFormatError(
            path,
            "log",
            f"the file is {file_size} bytes but the log says it was at least {last.flushed_file_offset}"
            " (truncated image?)",
        )
    writes = [w for entry in best for w in entry.writes]
    return writes, last.last_file_offset


def build_entry(
    updates: list[tuple[int, bytes]],
    *,
    sequence_number: int,
    log_guid: bytes,
    tail: int,
    file_size: int,
) -> bytes:
    """One log entry (2.3.1) carrying 4 KiB ``updates`` ``(file offset, data)``, tail pointing at ``tail``."""
    count = len(updates)
    dsect = _descriptor_sectors(count)
    nsect = dsect + count
    raw = bytearray(nsect * LOG_SECTOR)
    head = LogEntryHeader(
        signature=LOG_ENTRY_SIGNATURE,
        checksum=0,
        entry_length=nsect * LOG_SECTOR,
        tail=tail,
        sequence_number=sequence_number,
        descriptor_count=count,
        reserved=0,
        log_guid=log_guid,
        flushed_file_offset=file_size,
        last_file_offset=file_size,
    )
    raw[: LogEntryHeader.SIZE] = head.to_bytes()
    for i, (offset, data) in enumerate(updates):
        if len(data) != LOG_SECTOR or offset % LOG_SECTOR:
            raise ValueError("log updates are whole, aligned 4 KiB sectors")
        desc = LogDataDescriptor(
            signature=DATA_DESC_SIGNATURE,
            trailing=int.from_bytes(data[-4:], "little"),
            leading=int.from_bytes(data[:8], "little"),
            file_offset=offset,
            sequence_number=sequence_number,
        )
        at = (i + _HEADER_SLOTS) * _DESC_SIZE
        raw[at : at + _DESC_SIZE] = desc.to_bytes()
        s = (dsect + i) * LOG_SECTOR
        raw[s : s + 4] = DATA_SECTOR_SIGNATURE
        raw[s + 4 : s + 8] = (sequence_number >> 32).to_bytes(4, "little")
        raw[s + 8 : s + LOG_SECTOR - 4] = data[8:-4]
        raw[s + LOG_SECTOR - 4 : s + LOG_SECTOR] = (sequence_number & 0xFFFFFFFF).to_bytes(4, "little")
    raw[4:8] = checksum(raw).to_bytes(4, "little")
    return bytes(raw)
