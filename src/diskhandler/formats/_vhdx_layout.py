"""VHDX on-disk structures, declared once, from Microsoft's [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File
Format" specification (section numbers below are that document's). All integers are little-endian;
GUIDs are stored in Microsoft's binary form (``uuid.UUID(bytes_le=...)``).

Checksums are CRC-32C (Castagnoli) over a whole structure with its checksum field zeroed (section 2).
"""

from __future__ import annotations

import uuid

import crc32c

from diskhandler.formats._layout import Layout, binary_layout, ffield

__all__ = [
    "BAT_GUID",
    "FILE_PARAMETERS_GUID",
    "LOGICAL_SECTOR_SIZE_GUID",
    "METADATA_GUID",
    "PARENT_LOCATOR_GUID",
    "PHYSICAL_SECTOR_SIZE_GUID",
    "VHDX_LOCATOR_TYPE",
    "VIRTUAL_DISK_ID_GUID",
    "VIRTUAL_DISK_SIZE_GUID",
    "FileParameters",
    "Header",
    "LogDataDescriptor",
    "LogEntryHeader",
    "MetadataEntry",
    "MetadataTableHeader",
    "ParentLocatorEntry",
    "ParentLocatorHeader",
    "RegionEntry",
    "RegionTableHeader",
    "checksum",
    "guid",
    "sealed",
]

KiB = 1 << 10
MiB = 1 << 20

FILE_SIGNATURE = b"vhdxfile"  # 2.2.1
HEADER_SIGNATURE = b"head"  # 2.2.2
REGION_SIGNATURE = b"regi"  # 2.2.3.1
LOG_ENTRY_SIGNATURE = b"loge"  # 2.3.1.1
ZERO_DESC_SIGNATURE = b"zero"  # 2.3.1.2
DATA_DESC_SIGNATURE = b"desc"  # 2.3.1.3
DATA_SECTOR_SIGNATURE = b"data"  # 2.3.1.4
METADATA_SIGNATURE = b"metadata"  # 2.6.1.1

HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION1_OFFSET = 192 * KiB
REGION2_OFFSET = 256 * KiB
HEADER_SECTION_SIZE = MiB
HEADER_SIZE = 4 * KiB  # the checksummed part of each header (2.2.2)
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
LOG_SECTOR = 4 * KiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_METADATA_ITEM = MiB
SECTORS_PER_BITMAP_BLOCK = 1 << 23  # 2.4: one 1 MiB sector bitmap block covers 2^23 sectors
MAX_DISK_SIZE = 64 << 40  # 2.6.2.2
MIN_BLOCK_SIZE = MiB  # 2.6.2.1
MAX_BLOCK_SIZE = 256 * MiB

# 2.5.1.1 payload block states, 2.5.1.2 sector bitmap block states
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5  # "unmapped" in the 0.95 draft; qemu's headers still use it
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
BAT_STATE_MASK = 0x7
BAT_OFFSET_SHIFT = 20  # FileOffsetMB: bits 20..63

# 2.6.1.2 metadata entry flags
META_IS_USER = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4

# 2.6.2.1 file parameter flags
PARAM_LEAVE_BLOCKS_ALLOCATED = 1
PARAM_HAS_PARENT = 2


def guid(text: str) -> bytes:
    """The on-disk (Microsoft binary) bytes of a GUID written as text."""
    return uuid.UUID(text).bytes_le


# 2.2.3.2 known regions
BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
# 2.6.2 known metadata items
FILE_PARAMETERS_GUID = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID_GUID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
# 2.6.2.6.3 the VHDX parent locator type
VHDX_LOCATOR_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

KNOWN_METADATA = {
    FILE_PARAMETERS_GUID: "file parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
    VIRTUAL_DISK_ID_GUID: "virtual disk id",
    LOGICAL_SECTOR_SIZE_GUID: "logical sector size",
    PHYSICAL_SECTOR_SIZE_GUID: "physical sector size",
    PARENT_LOCATOR_GUID: "parent locator",
}


def checksum(data: bytes | bytearray | memoryview, at: int = 4) -> int:
    """CRC-32C of ``data`` with the 4-byte checksum field at ``at`` taken as zero."""
    view = memoryview(data)
    crc = crc32c.crc32c(view[:at])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    return crc32c.crc32c(view[at + 4 :], crc)


def sealed(data: bytes | bytearray, at: int = 4) -> bytes:
    """``data`` with its checksum field (at ``at``) filled in."""
    out = bytearray(data)
    out[at : at + 4] = checksum(out, at).to_bytes(4, "little")
    return bytes(out)


@binary_layout("<", "VHDX header")
class Header(Layout):
    """2.2.2 (the first 80 bytes of the 4 KiB checksummed structure)."""

    signature: bytes = ffield("4s")
    checksum: int = ffield("I")
    sequence_number: int = ffield("Q")
    file_write_guid: bytes = ffield("16s")
    data_write_guid: bytes = ffield("16s")
    log_guid: bytes = ffield("16s")
    log_version: int = ffield("H")
    version: int = ffield("H")
    log_length: int = ffield("I")
    log_offset: int = ffield("Q")


@binary_layout("<", "VHDX region table header")
class RegionTableHeader(Layout):
    """2.2.3.1."""

    signature: bytes = ffield("4s")
    checksum: int = ffield("I")
    entry_count: int = ffield("I")
    reserved: int = ffield("I")


@binary_layout("<", "VHDX region table entry")
class RegionEntry(Layout):
    """2.2.3.2."""

    guid: bytes = ffield("16s")
    file_offset: int = ffield("Q")
    length: int = ffield("I")
    required: int = ffield("I")


@binary_layout("<", "VHDX log entry header")
class LogEntryHeader(Layout):
    """2.3.1.1."""

    signature: bytes = ffield("4s")
    checksum: int = ffield("I")
    entry_length: int = ffield("I")
    tail: int = ffield("I")
    sequence_number: int = ffield("Q")
    descriptor_count: int = ffield("I")
    reserved: int = ffield("I")
    log_guid: bytes = ffield("16s")
    flushed_file_offset: int = ffield("Q")
    last_file_offset: int = ffield("Q")


@binary_layout("<", "VHDX log descriptor")
class LogDataDescriptor(Layout):
    """2.3.1.2 and 2.3.1.3: a zero descriptor has ``zero`` as signature and the length in ``leading``."""

    signature: bytes = ffield("4s")
    trailing: int = ffield("I")
    leading: int = ffield("Q")
    file_offset: int = ffield("Q")
    sequence_number: int = ffield("Q")


@binary_layout("<", "VHDX metadata table header")
class MetadataTableHeader(Layout):
    """2.6.1.1."""

    signature: bytes = ffield("8s")
    reserved: int = ffield("H")
    entry_count: int = ffield("H")
    reserved2: bytes = ffield("20s")


@binary_layout("<", "VHDX metadata table entry")
class MetadataEntry(Layout):
    """2.6.1.2."""

    item_id: bytes = ffield("16s")
    offset: int = ffield("I")
    length: int = ffield("I")
    flags: int = ffield("I")
    reserved2: int = ffield("I")


@binary_layout("<", "VHDX file parameters")
class FileParameters(Layout):
    """2.6.2.1."""

    block_size: int = ffield("I")
    flags: int = ffield("I")


@binary_layout("<", "VHDX parent locator header")
class ParentLocatorHeader(Layout):
    """2.6.2.6.1."""

    locator_type: bytes = ffield("16s")
    reserved: int = ffield("H")
    key_value_count: int = ffield("H")


@binary_layout("<", "VHDX parent locator entry")
class ParentLocatorEntry(Layout):
    """2.6.2.6.2."""

    key_offset: int = ffield("I")
    value_offset: int = ffield("I")
    key_length: int = ffield("H")
    value_length: int = ffield("H")
