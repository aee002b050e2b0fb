"""VirtualBox machine files (``.vbox``): the media registry and the disks a machine uses.

A ``.vbox`` file is XML in the ``http://www.virtualbox.org/`` namespace. Its ``MediaRegistry/HardDisks``
holds nested ``<HardDisk uuid="{...}" location="..." format="VDI">`` elements, a differencing image
nested inside its parent; locations are relative to the ``.vbox`` file's folder. The machine's own
``StorageControllers`` (not those saved inside ``<Snapshot>`` elements) attach the *current* image of
each disk, i.e. the leaf of its snapshot chain.

VirtualBox's disk encryption keeps its key store here too, as ``<Property name="CRYPT/KeyStore">`` on
the medium; diskhandler refuses such media (their sectors are ciphertext).
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import attrs

from diskhandler.errors import ImageFormatError, ImageWarning
from diskhandler.formats._files import read_small_file

__all__ = [
    "VBoxMedium",
    "current_disks",
    "machine_state_file",
    "media_near",
    "read_media_registry",
    "registries_near",
]

# A machine file holding megabytes of XML is already unusual; refuse to parse anything absurd.
MAX_VBOX_FILE = 16 << 20
_ENCRYPTION_PROPERTIES = frozenset({"CRYPT/KeyStore", "CRYPT/KeyId"})


@attrs.frozen
class VBoxMedium:
    """One hard-disk medium of a machine's media registry.

    Attributes:
        uuid: the medium's UUID (a VDI's ``uuidCreate``).
        location: the image file, made absolute against the ``.vbox`` file's folder.
        format: VirtualBox's format name (``VDI``, ``VMDK``, ``VHD``, ...), upper case.
        parent: the UUID of the image this one is a differencing child of, or ``None``.
        children: UUIDs of the differencing images based directly on this one.
        encrypted: the medium, or one it is based on, carries VirtualBox disk-encryption properties.
    """

    uuid: UUID
    location: Path
    format: str
    parent: UUID | None
    children: tuple[UUID, ...]
    encrypted: bool


def _local(tag: str) -> str:
    """An element's tag without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in element if _local(child.tag) == name)


def _parse_uuid(text: str | None, vbox: Path, what: str) -> UUID:
    try:
        return UUID((text or "").strip().strip("{}"))
    except ValueError:
        raise ImageFormatError(vbox, what, f"{text!r} is not a UUID") from None


def _load(vbox: Path) -> ET.Element:
    data = read_small_file(vbox, limit=MAX_VBOX_FILE, role="VirtualBox machine file")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as exc:  # also unknown or multi-byte encodings
        raise ImageFormatError(vbox, None, f"not a readable VirtualBox machine file: {exc}") from exc
    if _local(root.tag) != "VirtualBox":
        raise ImageFormatError(vbox, None, f"root element is <{_local(root.tag)}>, not <VirtualBox>")
    return root


def _location(text: str | None, vbox: Path, what: str) -> Path:
    if not text:
        raise ImageFormatError(vbox, what, "medium has no location")
    if "\\" in text and "/" not in text:  # written on Windows
        text = text.replace("\\", "/")
    return Path(os.path.normpath(vbox.parent / text))


def read_media_registry(vbox_path: str | os.PathLike[str]) -> dict[UUID, VBoxMedium]:
    """Every hard disk in the media registry of a ``.vbox`` file (or VirtualBox.xml), by UUID.

    Raises:
        ImageFormatError: the file is not well-formed VirtualBox XML (naming the file and element).
    """
    vbox = Path(vbox_path)
    root = _load(vbox)
    found: dict[UUID, VBoxMedium] = {}

    # (element, its parent medium, whether that parent is encrypted): a work list, not recursion, as a
    # differencing image nests inside its parent and a chain can be deeper than Python's stack
    pending: list[tuple[ET.Element, UUID | None, bool]] = []
    for registry in root.iter():
        if _local(registry.tag) == "MediaRegistry":
            pending.extend((disks, None, False) for disks in _children(registry, "HardDisks"))
    while pending:
        element, parent, parent_encrypted = pending.pop()
        for disk in _children(element, "HardDisk"):
            disk_uuid = _parse_uuid(disk.get("uuid"), vbox, "HardDisk uuid")
            props = {p.get("name") for p in _children(disk, "Property")}
            encrypted = parent_encrypted or bool(props & _ENCRYPTION_PROPERTIES)
            kids = tuple(
                _parse_uuid(kid.get("uuid"), vbox, "HardDisk uuid") for kid in _children(disk, "HardDisk")
            )
            found[disk_uuid] = VBoxMedium(
                uuid=disk_uuid,
                location=_location(disk.get("location"), vbox, f"HardDisk {disk_uuid} location"),
                format=(disk.get("format") or "VDI").upper(),
                parent=parent,
                children=kids,
                encrypted=encrypted,
            )
            pending.append((disk, disk_uuid, encrypted))
    return found


def current_disks(vbox_path: str | os.PathLike[str]) -> list[Path]:
    """The image file each hard disk of the machine uses now: the leaf of its snapshot chain.

    In controller order, then port and device. Open these (not the base images): once a machine has
    snapshots, VirtualBox writes to the differencing image.

    Raises:
        ImageFormatError: the file is not a machine file, or attaches a disk its registry lacks.
    """
    vbox = Path(vbox_path)
    root = _load(vbox)
    media = read_media_registry(vbox)
    machines = list(_children(root, "Machine"))
    if not machines:
        raise ImageFormatError(vbox, "Machine", "no <Machine> element: not a VirtualBox machine file")
    disks: list[Path] = []
    for machine in machines:
        # VirtualBox >= 4 keeps StorageControllers beside Hardware; older versions inside it.
        holders = [machine, *_children(machine, "Hardware")]
        for holder in holders:
            for controllers in _children(holder, "StorageControllers"):
                for controller in _children(controllers, "StorageController"):
                    attached = [
                        d for d in _children(controller, "AttachedDevice") if d.get("type") == "HardDisk"
                    ]
                    attached.sort(key=lambda d: (_int(d.get("port")), _int(d.get("device"))))
                    for device in attached:
                        for image in _children(device, "Image"):
                            disk_uuid = _parse_uuid(image.get("uuid"), vbox, "AttachedDevice Image uuid")
                            medium = media.get(disk_uuid)
                            if medium is None:
                                raise ImageFormatError(
                                    vbox,
                                    "AttachedDevice",
                                    f"disk {{{disk_uuid}}} is attached but not in this file's media registry"
                                    " (it may be registered in VirtualBox.xml instead)",
                                )
                            disks.append(medium.location)
    return disks


def machine_state_file(vbox_path: str | os.PathLike[str]) -> Path | None:
    """The saved-state file (``.sav``) of a machine that was saved rather than shut down, else ``None``.

    While a machine has a saved state its disks must not change: the saved RAM holds the guest's view
    of them (caches, filesystem state), and resuming over modified disks corrupts them.
    """
    vbox = Path(vbox_path)
    root = _load(vbox)
    for machine in _children(root, "Machine"):
        state = machine.get("stateFile")
        if state:
            return _location(state, vbox, "Machine stateFile")
    return None


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def registries_near(image: Path) -> list[Path]:
    """The ``.vbox`` files of the machine folder an image may belong to.

    VirtualBox keeps a machine's base disks in its folder and snapshot diffs in ``Snapshots/`` below
    it, so the image's folder and the one above are searched.
    """
    found: list[Path] = []
    folder = image.resolve().parent
    for directory in (folder, folder.parent):
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        found.extend(e for e in entries if e.suffix.lower() == ".vbox" and e.is_file())
    return found


def media_near(image: Path) -> list[tuple[Path, dict[UUID, VBoxMedium]]]:
    """The media registries of the ``.vbox`` files near ``image``; an unreadable one is skipped
    with an :class:`ImageWarning` (it must not stop an unrelated image from opening)."""
    result: list[tuple[Path, dict[UUID, VBoxMedium]]] = []
    for vbox in registries_near(image):
        try:
            result.append((vbox, read_media_registry(vbox)))
        except (ImageFormatError, OSError) as exc:
            warnings.warn(f"ignoring VirtualBox machine file: {exc}", ImageWarning, stacklevel=3)
    return result
