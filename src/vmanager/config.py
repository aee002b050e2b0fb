"""VMConfig: what a virtual machine is made of, independent of the hypervisor.

``VMConfig.from_dict`` takes the dictionary of the original PyTI example::

    VMConfig.from_dict({"name": "test123", "memory": "123",
                        "disk_location": "dsl-4.4.10.iso", "hd_location": "disk.vdi"})

``memory`` is MiB (an int or a numeric string). ``disk_location`` is a CD-ROM ISO, ``hd_location`` the
system disk; ``disks`` adds more (an IO disk that is never snapshotted is ``Disk(path, snapshot=False)``).
:func:`vmanager.domain_xml` renders libvirt domain XML from a config for one hypervisor family.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from ._diskformat import DiskFormat
from .errors import ConfigError

__all__ = ["Channel", "Disk", "RollbackMode", "VMConfig", "check_text"]

RollbackMode = Literal["snapshot", "overlay"]
_FORMATS = frozenset({"qcow2", "vdi", "vmdk", "vpc", "raw"})
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_NETWORK_RE = re.compile(r"user|(network|bridge):[A-Za-z0-9._-]{1,64}")
_MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: anything above is a typo, not a VM
_MAX_VCPUS = 1024


# C0 and C1 controls, and U+FFFE/U+FFFF, which XML 1.0 cannot hold at all (its Char stops at U+FFFD)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffe\uffff]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PATH_MAX = 4096  # Linux PATH_MAX, bytes with the terminating NUL
_NAME_MAX = 255  # Linux NAME_MAX, bytes per path component
_CMDLINE_MAX = 2047  # x86 COMMAND_LINE_SIZE (2048) with its NUL


def check_text(field: str, value: str, *, lines: bool = False, limit: int | None = None) -> str:
    """``value`` unchanged, or :class:`ConfigError` naming ``field`` when libvirt's XML cannot hold it.

    Refused: NUL and other control characters (``lines`` allows tab and newlines, for descriptions),
    U+FFFE and U+FFFF (no XML can hold them), lone surrogates (a file name that is not UTF-8 cannot be
    named in libvirt's UTF-8 XML), and more than ``limit`` UTF-8 bytes.
    """
    bad = (_CONTROL_BUT_LINES if lines else _CONTROL).search(value)
    if bad is not None:
        raise ConfigError(
            field,
            f"contains the control character or non-character {bad.group()!r} at position {bad.start()}; "
            "remove it (libvirt's XML cannot carry it)",
        )
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise ConfigError(
            field,
            f"contains the lone surrogate {bad.group()!r} at position {bad.start()} (bytes that are not "
            "UTF-8, e.g. from a file name); libvirt's XML needs UTF-8: rename it",
        )
    if limit is not None and len(value.encode()) > limit:
        raise ConfigError(field, f"is {len(value.encode())} bytes long; the limit is {limit}")
    return value


def check_path(field: str, value: object) -> Path:
    """A path a VM may name: text libvirt's XML can hold, within the system's length limits."""
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(field, f"expected a path, got {type(value).__name__} {value!r}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ConfigError(field, f"expected a text path, got bytes {text!r}")
    if not text:
        raise ConfigError(field, "is an empty path")
    check_text(field, text)
    absolute = os.path.abspath(text)
    if len(absolute.encode()) >= _PATH_MAX:
        raise ConfigError(
            field, f"the path is {len(absolute.encode())} bytes; the system allows {_PATH_MAX - 1}"
        )
    for part in absolute.split("/"):
        if len(part.encode()) > _NAME_MAX:
            raise ConfigError(
                field,
                f"the name {part[:40]!r}... is {len(part.encode())} bytes; the system allows {_NAME_MAX}",
            )
    return Path(text)


def _opt_path(field: str, value: object) -> Path | None:
    if value is None or value == "":
        return None
    return check_path(field, value)


def _disk_path(value: object) -> Path:
    return check_path("path", value)


def _disk_location(value: object) -> Path | None:
    return _opt_path("disk_location", value)


def _hd_location(value: object) -> Path | None:
    return _opt_path("hd_location", value)


def _kernel(value: object) -> Path | None:
    return _opt_path("kernel", value)


def _initrd(value: object) -> Path | None:
    return _opt_path("initrd", value)


def _serial_log(value: object) -> Path | None:
    return _opt_path("serial_log", value)


def _overlay_dir(value: object) -> Path | None:
    return _opt_path("overlay_dir", value)


def _channel_path(value: object) -> Path:
    return check_path("channels", value)


def _memory(value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError("memory", f"expected MiB as an int or numeric string, got {value!r}")
    if isinstance(value, str):
        text = value.strip(" \t")  # str.strip() would also take control characters such as \x1f
        if not (text.isascii() and text.isdigit()):
            raise ConfigError("memory", f"expected MiB as an int or numeric string, got {value!r}")
        value = int(text)
    if not isinstance(value, int):
        raise ConfigError("memory", f"expected MiB as an int or numeric string, got {value!r}")
    if not 1 <= value <= _MAX_MEMORY_MIB:
        raise ConfigError("memory", f"{value} MiB is out of range (1 .. {_MAX_MEMORY_MIB})")
    return value


def _vcpus(value: object) -> int:
    if isinstance(value, str) and value.strip(" \t").isascii() and value.strip(" \t").isdigit():
        value = int(value.strip(" \t"))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_VCPUS:
        raise ConfigError("vcpus", f"expected an int 1 .. {_MAX_VCPUS}, got {value!r}")
    return value


@attrs.frozen
class Disk:
    """One extra disk.

    ``snapshot=False`` keeps the disk out of every snapshot (``snapshot="no"`` in the domain XML): the
    IO disk that carries data in and out of a test VM. ``format`` is read from the image's magic numbers
    when ``None``, unless the image would then name other files (a qcow2 backing file, VMDK extents, a
    differencing VDI or VHD): such a disk needs an explicit ``format``, and so does any disk a guest has
    written. ``readonly`` attaches it read-only.
    """

    path: Path = attrs.field(converter=_disk_path)
    snapshot: bool = True
    readonly: bool = False
    format: DiskFormat | None = None

    def __attrs_post_init__(self) -> None:
        if self.format is not None and (type(self.format) is not str or self.format not in _FORMATS):
            raise ConfigError("format", f"unknown format {self.format!r}; use one of {sorted(_FORMATS)}")
        for field in ("snapshot", "readonly"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(field, f"expected True or False, got {getattr(self, field)!r}")

    @classmethod
    def coerce(cls, value: object) -> Disk:
        """A :class:`Disk` from a Disk, a path, or a dict of Disk fields."""
        if isinstance(value, Disk):
            return value
        if isinstance(value, str | Path):
            return cls(Path(value))
        if isinstance(value, Mapping):
            unknown = set(value) - {"path", "snapshot", "readonly", "format"}
            if unknown or "path" not in value:
                raise ConfigError(None, f"a disk needs 'path' and only Disk fields, got {sorted(value)}")
            return cls(**dict(value))
        raise ConfigError(None, f"expected a Disk, a path or a dict, got {type(value).__name__}")


def _disks(value: object) -> tuple[Disk, ...]:
    if value is None:
        return ()
    if isinstance(value, str | Path | Disk | Mapping):
        return (Disk.coerce(value),)
    if not isinstance(value, list | tuple):
        raise ConfigError("disks", f"expected a list of disks, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(Disk.coerce(item))
        except ConfigError as exc:  # name the disk: disks[1].path
            field = f"disks[{i}].{exc.field}" if exc.field and exc.field != "disks" else f"disks[{i}]"
            raise ConfigError(field, exc.message) from None
    return tuple(out)


_CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: ``sun_path`` holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107


@attrs.frozen
class Channel:
    """A virtio-serial port whose host end is a unix socket (libvirt ``<channel type='unix'>``).

    The guest sees the port named ``name`` (``/dev/virtio-ports/<name>`` with udev, else a
    ``/dev/vportNpM`` whose ``/sys/class/virtio-ports/vportNpM/name`` is ``name``); QEMU listens on the
    unix socket ``path`` and the host connects to it. No network device and no vsock CID: it works with
    the embedded driver and without privileges. QEMU (and the test driver) only.
    """

    name: str
    path: Path = attrs.field(converter=_channel_path)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not _CHANNEL_NAME_RE.fullmatch(self.name):
            why = f"{self.name!r} is not a port name (1-64 of letters, digits, '._-')"
            raise ConfigError("channels", why)
        size = len(os.fsencode(self.path.absolute()))
        if size > _MAX_SOCKET_PATH:
            raise ConfigError(
                "channels",
                f"the socket path {str(self.path)!r} is {size} bytes; a unix socket path has at most "
                f"{_MAX_SOCKET_PATH}: choose a shorter folder",
            )

    @classmethod
    def coerce(cls, value: object) -> Channel:
        """A :class:`Channel` from a Channel or a dict with ``name`` and ``path``."""
        if isinstance(value, Channel):
            return value
        if isinstance(value, Mapping) and set(value) == {"name", "path"}:
            return cls(**dict(value))
        raise ConfigError("channels", f"expected a Channel or a dict with 'name' and 'path', got {value!r}")


def _channels(value: object) -> tuple[Channel, ...]:
    if value is None:
        return ()
    if isinstance(value, Channel | Mapping):
        return (Channel.coerce(value),)
    if not isinstance(value, list | tuple):
        raise ConfigError("channels", f"expected a list of channels, got {type(value).__name__}")
    channels = tuple(Channel.coerce(v) for v in value)
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise ConfigError("channels", f"two channels with the same name: {names}")
    return channels


@attrs.frozen
class VMConfig:
    """A virtual machine's hardware, frozen.

    * ``name``: a name for the VM. :class:`~vmanager.VirtualMachine`'s first argument is the libvirt
      domain name and wins; ``name`` then becomes the domain's ``<title>``.
    * ``memory``: MiB (int or numeric string); ``vcpus``: count.
    * ``disk_location``: a CD-ROM ISO; ``hd_location``: the system disk (snapshotted / overlaid);
      ``hd_format``: its format (``None``: sniffed, with the rule of :class:`Disk`'s ``format``);
      ``disks``: extra disks (see :class:`Disk`).
    * ``kernel``, ``initrd``, ``cmdline``: direct kernel boot (QEMU, Xen and the test driver).
    * ``serial_log``: a file that receives everything the guest writes to its serial console.
    * ``network``: ``None`` (default: no network interface at all), ``"user"`` (QEMU user-mode NAT),
      ``"network:<libvirt network>"`` or ``"bridge:<host bridge>"``.
    * ``channels``: virtio-serial ports whose host ends are unix sockets (see :class:`Channel`).
    * ``rollback``: ``"snapshot"`` (libvirt snapshots) or ``"overlay"`` (a throwaway qcow2 overlay over a
      read-only system disk, QEMU only); ``overlay_dir`` is where overlays go (default: the user cache).
    * ``accel``: ``"auto"`` (KVM when it demonstrably works, else TCG), ``"kvm"`` or ``"tcg"`` (QEMU).
    * ``validate_paths``: check that files exist before defining the VM; ``None`` means yes for local
      non-test hypervisors (the test driver never opens files; a remote host has its own files).
    """

    name: str = attrs.field()
    memory: int = attrs.field(default=256, converter=_memory)
    vcpus: int = attrs.field(default=1, converter=_vcpus)
    disk_location: Path | None = attrs.field(default=None, converter=_disk_location)
    hd_location: Path | None = attrs.field(default=None, converter=_hd_location)
    hd_format: DiskFormat | None = None
    disks: tuple[Disk, ...] = attrs.field(default=(), converter=_disks)
    kernel: Path | None = attrs.field(default=None, converter=_kernel)
    initrd: Path | None = attrs.field(default=None, converter=_initrd)
    cmdline: str | None = None
    serial_log: Path | None = attrs.field(default=None, converter=_serial_log)
    network: str | None = None
    channels: tuple[Channel, ...] = attrs.field(default=(), converter=_channels)
    rollback: RollbackMode = "snapshot"
    overlay_dir: Path | None = attrs.field(default=None, converter=_overlay_dir)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    validate_paths: bool | None = None

    @name.validator
    def _check_name(self, _attr: object, value: object) -> None:
        if type(value) is not str or not _NAME_RE.fullmatch(value):
            raise ConfigError(
                "name", f"{value!r} is not a valid VM name (1-64 of letters, digits, '._+-', no spaces)"
            )

    def __attrs_post_init__(self) -> None:
        if self.network is not None and (
            type(self.network) is not str or not _NETWORK_RE.fullmatch(self.network)
        ):
            raise ConfigError(
                "network", f"{self.network!r}: use None, 'user', 'network:<name>' or 'bridge:<name>'"
            )
        if self.rollback not in ("snapshot", "overlay"):
            raise ConfigError("rollback", f"{self.rollback!r}: use 'snapshot' or 'overlay'")
        if self.rollback == "overlay" and self.hd_location is None:
            raise ConfigError("rollback", "overlay rollback needs a system disk (hd_location)")
        if self.hd_format is not None and (type(self.hd_format) is not str or self.hd_format not in _FORMATS):
            raise ConfigError(
                "hd_format", f"unknown format {self.hd_format!r}; use one of {sorted(_FORMATS)}"
            )
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError("accel", f"{self.accel!r}: use 'auto', 'kvm' or 'tcg'")
        if self.validate_paths is not None and not isinstance(self.validate_paths, bool):
            raise ConfigError("validate_paths", f"expected None, True or False, got {self.validate_paths!r}")
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise ConfigError("kernel", "initrd and cmdline need a kernel (direct kernel boot)")
        if self.cmdline is not None:
            if not isinstance(self.cmdline, str):
                raise ConfigError("cmdline", f"expected a string, got {type(self.cmdline).__name__}")
            check_text("cmdline", self.cmdline, limit=_CMDLINE_MAX)
        if self.hd_location is None and self.disk_location is None and self.kernel is None and not self.disks:
            raise ConfigError(None, "nothing to boot: give hd_location, disk_location, disks or kernel")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMConfig:
        """Build a config from a dict such as the original PyTI example's; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(None, f"expected a dict, got {type(data).__name__}")
        fields = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(unknown[0], f"unknown config key(s) {unknown}; known: {sorted(fields)}")
        if "name" not in data:
            raise ConfigError("name", "the config needs a name")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values (paths as strings), accepted back by :meth:`from_dict`."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, Disk | Channel):
                return {k: plain(v) for k, v in attrs.asdict(value, recurse=False).items()}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {k: plain(v) for k, v in attrs.asdict(self, recurse=False).items()}

    def files(self) -> list[tuple[str, Path]]:
        """Every host file the VM reads, as ``(config field, path)``."""
        out: list[tuple[str, Path]] = []
        for field in ("hd_location", "disk_location", "kernel", "initrd"):
            value = getattr(self, field)
            if value is not None:
                out.append((field, value))
        out.extend((f"disks[{i}]", d.path) for i, d in enumerate(self.disks))
        return out
