"""The VMDK text descriptor: parsing, rendering and the in-place CID update.

The descriptor (VMware "Virtual Disk Format 1.1", section "The Descriptor File") is plain text of
``key=value`` lines, ``#`` comments and *extent lines*::

    # Disk DescriptorFile
    version=1
    encoding="windows-1252"
    CID=fffffffe
    parentCID=ffffffff
    createType="twoGbMaxExtentSparse"
    parentFileNameHint="base.vmdk"
    # Extent description
    RW 4194304 SPARSE "disk-s001.vmdk"
    RW 16384 FLAT "disk-flat.vmdk" 0
    RDONLY 2048 ZERO
    # The Disk Data Base
    ddb.adapterType = "ide"

Keys are matched case-insensitively, values may be quoted, and the text is UTF-8 or windows-1252 (the
``encoding`` key says which; without it UTF-8 is tried first).
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from diskhandler.errors import ImageFormatError

__all__ = [
    "MAX_DESCRIPTOR_BYTES",
    "MAX_EXTENTS",
    "MAX_EXTENT_SECTORS",
    "NO_PARENT_CID",
    "Descriptor",
    "ExtentLine",
    "looks_like_descriptor",
    "parse_descriptor",
    "render_descriptor",
]

#: A descriptor longer than this is not a descriptor (real ones are well under 64 KiB).
MAX_DESCRIPTOR_BYTES = 1 << 20
#: At most this many extent lines (a 64 TiB twoGbMaxExtent disk has 32768).
MAX_EXTENTS = 65536
#: Largest extent size or start sector accepted (2 EiB): byte offsets then stay far from 2^63.
MAX_EXTENT_SECTORS = 1 << 52
#: The parentCID of an image without a parent.
NO_PARENT_CID = 0xFFFFFFFF

_ACCESS = {"RW", "RDONLY", "NOACCESS"}
_BOM = b"\xef\xbb\xbf"
_EXTENT_RE = re.compile(
    r"""^(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d+)\s+(?P<type>[A-Za-z]+)
        (?:\s+(?:"(?P<qname>[^"]*)"|(?P<name>\S+))(?:\s+(?P<offset>\d+))?)?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
_KEY_RE = re.compile(r"^(?P<key>[^=\s]+)\s*=\s*(?P<value>.*?)\s*$")
_CID_LINE_RE = re.compile(r"^(\s*CID\s*=\s*)\"?[0-9A-Fa-f]*\"?", re.IGNORECASE | re.MULTILINE)


@attrs.frozen
class ExtentLine:
    """One extent line: ``access sectors type ["file name" [offset]]``."""

    access: str
    sectors: int
    type: str
    filename: str | None
    offset: int = 0


@attrs.frozen
class Descriptor:
    """A parsed descriptor. ``fields`` maps lower-case keys to unquoted values; ``bom`` says whether the
    stored text starts with a UTF-8 byte order mark (kept when the descriptor is rewritten)."""

    text: str
    encoding: str
    fields: dict[str, str]
    extents: tuple[ExtentLine, ...]
    bom: bool = False

    def get(self, key: str) -> str | None:
        """The value of ``key`` (case-insensitive), or ``None``."""
        return self.fields.get(key.lower())

    @property
    def create_type(self) -> str:
        return self.get("createType") or ""

    def cid(self, path: Path, key: str = "CID") -> int:
        """The content id named ``key`` (``CID`` or ``parentCID``) as an integer."""
        value = self.get(key)
        if value is None:
            if key.lower() == "parentcid":
                return NO_PARENT_CID
            raise ImageFormatError(path, key, "the descriptor has no content id (CID=...) line")
        try:
            cid = int(value, 16)
        except ValueError:
            raise ImageFormatError(path, key, f"{value!r} is not a hexadecimal content id") from None
        if not 0 <= cid <= 0xFFFFFFFF:
            raise ImageFormatError(path, key, f"{value!r} does not fit in 32 bits")
        return cid

    @property
    def parent_hint(self) -> str | None:
        hint = self.get("parentFileNameHint")
        return hint if hint else None

    def with_cid(self, cid: int) -> Descriptor:
        """The same descriptor text with ``CID`` replaced (nothing else changes)."""
        text, count = _CID_LINE_RE.subn(lambda m: f"{m.group(1)}{cid:08x}", self.text, count=1)
        if count == 0:
            text = self.text.rstrip("\n") + f"\nCID={cid:08x}\n"
        fields = dict(self.fields)
        fields["cid"] = f"{cid:08x}"
        return attrs.evolve(self, text=text, fields=fields)

    def encoded(self) -> bytes:
        """The descriptor's bytes as stored (byte order mark included)."""
        return (_BOM if self.bom else b"") + self.text.encode(self.encoding, errors="strict")


def looks_like_descriptor(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) is a VMDK text descriptor.

    Strict on purpose, so a raw disk is never mistaken for one: only text (no control characters
    besides whitespace; NUL padding at the end) whose leading comment block holds
    ``# Disk DescriptorFile`` and which sets ``createType``.
    """
    text, _, padding = head.removeprefix(_BOM).partition(b"\0")
    if padding.strip(b"\0"):  # qemu pads descriptors with NULs; nothing may follow them
        return False
    if not text.lstrip().startswith(b"#"):
        return False
    if any(b < 0x20 and b not in (0x09, 0x0A, 0x0D) for b in text):
        return False
    seen_marker = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if not line.startswith(b"#"):
            break
        if line.lstrip(b"# \t").lower().startswith(b"disk descriptorfile"):
            seen_marker = True
    return seen_marker and re.search(rb"(?im)^\s*createType\s*=", text) is not None


def _decode(data: bytes, path: Path) -> tuple[str, str]:
    data = data.removeprefix(_BOM)
    declared = re.search(rb'(?im)^\s*encoding\s*=\s*"?([A-Za-z0-9_-]+)"?', data)
    candidates: list[str] = []
    if declared is not None:
        name = declared.group(1).decode("ascii").lower()
        candidates.append({"windows-1252": "cp1252", "utf8": "utf-8"}.get(name, name))
    candidates += ["utf-8", "cp1252", "latin-1"]
    for encoding in candidates:
        try:
            text = data.decode(encoding)
            if text.encode(encoding) == data:  # the CID update writes the text back in this encoding
                return text, encoding
        except (ValueError, LookupError):  # undecodable, or not a text codec at all
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def parse_descriptor(data: bytes, path: Path, *, extents_matter: bool = True) -> Descriptor:
    """Parse descriptor text (NUL padding after it is ignored). Errors name ``path``.

    With ``extents_matter=False`` (a descriptor embedded in a single-file image, whose extent is the
    file itself) malformed extent lines are skipped instead of refused.
    """
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise ImageFormatError(
            path, "descriptor", f"{len(data)} bytes is far larger than any VMDK descriptor"
        )
    data = data.split(b"\0", 1)[0]
    bom = data.startswith(_BOM)
    text, encoding = _decode(data, path)
    fields: dict[str, str] = {}
    extents: list[ExtentLine] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split(None, 1)[0].upper()
        if first in _ACCESS:
            match = _EXTENT_RE.match(line)
            if match is None and not extents_matter:
                continue
            if match is None:
                raise ImageFormatError(path, f"descriptor line {number}", f"bad extent line {line!r}")
            if len(extents) >= MAX_EXTENTS:
                raise ImageFormatError(path, "extents", f"more than {MAX_EXTENTS} extent lines")
            sectors = _bounded(match["sectors"])
            offset = _bounded(match["offset"] or "0")
            if sectors is None or offset is None:
                if not extents_matter:
                    continue
                what = (
                    f"an extent of {_shorten(match['sectors'])} sectors"
                    if sectors is None
                    else f"an extent starting at sector {_shorten(match['offset'])}"
                )
                raise ImageFormatError(
                    path,
                    f"descriptor line {number}",
                    f"{what} is absurd (at most {MAX_EXTENT_SECTORS} sectors); the descriptor is damaged",
                )
            name = match["qname"] if match["qname"] is not None else match["name"]
            extents.append(
                ExtentLine(
                    access=match["access"].upper(),
                    sectors=sectors,
                    type=match["type"].upper(),
                    filename=name,
                    offset=offset,
                )
            )
            continue
        kv = _KEY_RE.match(line)
        if kv is None:  # VMware ignores lines it does not understand; so do we
            continue
        value = kv["value"]
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        fields.setdefault(kv["key"].lower(), value)
    return Descriptor(text=text, encoding=encoding, fields=fields, extents=tuple(extents), bom=bom)


def _bounded(digits: str) -> int | None:
    """A sector count or offset of an extent line, or ``None`` when it is absurdly large."""
    if len(digits) > 20:  # also keeps int() clear of its 4300-digit limit
        return None
    value = int(digits)
    return value if value <= MAX_EXTENT_SECTORS else None


def _shorten(digits: str) -> str:
    return digits if len(digits) <= 20 else digits[:20] + "..."


def render_descriptor(
    *,
    cid: int,
    parent_cid: int,
    create_type: str,
    extents: list[ExtentLine],
    sectors: int,
    adapter_type: str,
    parent_hint: str | None = None,
) -> str:
    """A new descriptor in the layout VMware and qemu write."""
    heads = 16 if adapter_type == "ide" else 255
    cylinders = max(1, min(sectors // (heads * 63), 16383))
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description"]
    for ext in extents:
        line = f'{ext.access} {ext.sectors} {ext.type} "{ext.filename}"'
        if ext.type == "FLAT":
            line += f" {ext.offset}"
        lines.append(line)
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        f'ddb.geometry.cylinders = "{cylinders}"',
        f'ddb.geometry.heads = "{heads}"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{adapter_type}"',
    ]
    return "\n".join(lines) + "\n"
