"""Build a tiny Linux guest (kernel + initramfs) from Debian packages.

The guest boots in a few seconds under QEMU's TCG and needs no disk image of its own::

    from pyti_core.guest.tinylinux import build_tiny_linux

    guest = build_tiny_linux(python=True)
    # qemu-system-x86_64 -kernel guest.kernel -initrd guest.initrd -append guest.cmdline ...

What goes in:

* the kernel (``vmlinuz``) of Debian's ``linux-image-cloud-amd64`` (resolved to its versioned package),
  and the few kernel modules the guest needs (virtio disks and console, FAT, the ACPI power button,
  vsock), loaded in dependency order by ``/init``;
* ``busybox-static`` as the whole userland (``/bin/sh``, ``mount``, ``insmod``, ``acpid``, ...);
* with ``python=True``: Debian's Python 3.11 (``python3.11-minimal``, ``libpython3.11-minimal``,
  ``libpython3.11-stdlib`` without its test suite and GUI modules, and the C libraries they load),
  byte-compiled ahead of time when the building Python is a 3.11 too.

Packages are fetched with ``apt-get download`` (the host must be Debian-like with package lists present:
``apt-get update`` once) and unpacked with ``dpkg-deb -x``. The initramfs is a gzip-compressed ``newc``
cpio archive written by :class:`CpioArchive` — no ``cpio`` tool is needed.

Builds are cached under ``cache_dir`` (default ``$XDG_CACHE_HOME/pyti/guest`` or ``~/.cache/pyti/guest``)
in a directory named after a hash of the package versions, the module list and the generated ``/init``,
so a new kernel, Python or init script makes a new build. A build is written to a temporary directory
and renamed into place; a lock file serialises concurrent builders, so readers never see a half-written
build.

The guest's ``/init`` (see :data:`INIT_SCRIPT`) mounts ``/proc``, ``/sys`` and ``/dev``, loads the
modules, mounts ``/dev/vda`` (or ``/dev/vda1``, or the devices named by ``pyti.disk=DEV[,DEV...]``) at
``/mnt/disk`` read-write when it holds an ext2/3/4 or FAT file system, starts ``acpid`` so an ACPI
power-button press syncs, unmounts and powers off, prints :data:`READY_MARKER` on the serial console,
then either runs the script named by ``pyti.run=PATH`` on the kernel command line and powers off when
it ends, or gives a root shell on the serial console (``pyti.echo=0``: without echo or line editing).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import py_compile
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Final, Protocol

import attrs

from pyti_core.errors import CpioEntryError, GuestImageError
from pyti_core.guest import protocol
from pyti_core.guest.protocol import READY_MARKER, RUN_EXIT_MARKER

__all__ = [
    "BUSYBOX_PACKAGE",
    "DEFAULT_CMDLINE",
    "DEFAULT_MODULES",
    "INIT_SCRIPT",
    "KERNEL_PACKAGE",
    "PYTHON_PACKAGES",
    "READY_MARKER",
    "RUN_EXIT_MARKER",
    "CpioArchive",
    "CpioEntryError",
    "GuestImageError",
    "TinyLinux",
    "build_tiny_linux",
    "default_cache_dir",
    "module_dependencies",
]

#: The kernel command line a guest needs: serial console, reboot on panic, few kernel messages.
DEFAULT_CMDLINE: Final = "console=ttyS0 panic=-1 quiet"
#: Debian's metapackage for the cloud kernel; it depends on exactly one versioned kernel package.
KERNEL_PACKAGE: Final = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE: Final = "busybox-static"
#: Debian packages that make a working ``python3`` with most of the standard library.
PYTHON_PACKAGES: Final = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libbz2-1.0",
    "liblzma5",
    "libffi8",
    "libuuid1",
    "libssl3",  # ssl, and hashlib's OpenSSL algorithms
    "libsqlite3-0",  # sqlite3 (coverage.py stores its data there)
    # the rest of what libpython3.11-stdlib's extension modules link against: a distribution's tests
    # may import any of the standard library (six's tests import dbm.ndbm, for one)
    "libdb5.3",  # _dbm
    "libncursesw6",  # _curses
    "libtinfo6",  # _curses, readline
    "libreadline8",  # readline
    "libcrypt1",  # _crypt
    "media-types",  # /etc/mime.types for mimetypes
)
#: Kernel modules loaded at boot (with everything they depend on). The cloud kernel has ext4, the
#: serial console and devtmpfs built in; these are modules in it.
DEFAULT_MODULES: Final = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "button",
    "evdev",
    "vmw_vsock_virtio_transport",
)

_GUEST_PYTHON = (3, 11)
# Parts of packages the guest never uses: documentation, locales, charset converters, the Python
# test suite and GUI/IDE modules.
_EXCLUDED_PREFIXES: Final = (
    "usr/share/",
    "usr/lib/x86_64-linux-gnu/gconv/",
    "usr/lib/binfmt.d/",
    "etc/",
    "usr/lib/python3.11/test/",
    "usr/lib/python3.11/idlelib/",
    "usr/lib/python3.11/tkinter/",
    "usr/lib/python3.11/turtledemo/",
    "usr/lib/python3.11/lib2to3/tests/",
    "usr/lib/python3.11/pydoc_data/",
    "usr/lib/python3.11/ctypes/test/",
    "usr/lib/python3.11/unittest/test/",
    "usr/lib/python3.11/distutils/tests/",
    "usr/lib/python3.11/sqlite3/test/",
)
_EXCLUDED_NAMES: Final = re.compile(r"_test[a-z_]*\.cpython-.*\.so$|^xxlimited.*\.so$")
_BUILD_FORMAT: Final = 2  # bump when the builder's output changes for the same inputs
_MODULES_DIR: Final = "lib/modules/pyti"
_APT_TIMEOUT: Final = 600.0


@attrs.frozen
class TinyLinux:
    """A built guest: boot it with ``-kernel kernel -initrd initrd -append cmdline``.

    ``packages`` maps each Debian package used to its version; ``modules`` lists the kernel modules
    loaded at boot in load order.
    """

    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE
    python: bool = False
    kernel_release: str = ""
    packages: Mapping[str, str] = attrs.field(factory=dict)
    modules: tuple[str, ...] = ()

    def cmdline_with(self, *, run: str | None = None, extra: Sequence[str] = ()) -> str:
        """The command line plus ``pyti.run=run`` (a script path in the guest) and ``extra`` words."""
        words = [self.cmdline]
        if run is not None:
            if not run or any(c.isspace() for c in run):
                raise ValueError(f"{protocol.CMDLINE_RUN} path must be non-empty without whitespace: {run!r}")
            words.append(f"{protocol.CMDLINE_RUN}={run}")
        words.extend(extra)
        return " ".join(words)


# --------------------------------------------------------------------------------------------------
# newc cpio writer
# --------------------------------------------------------------------------------------------------

_NEWC_MAGIC: Final = b"070701"
_NEWC_TRAILER: Final = "TRAILER!!!"
_NEWC_MAX_SIZE: Final = 0xFFFFFFFF


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


@attrs.frozen
class _Entry:
    mode: int
    data: bytes | Path
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioArchive:
    """An in-order ``newc`` (SVR4, ``070701``) cpio archive, as the Linux kernel unpacks an initramfs.

    Paths are relative POSIX paths (``"bin/busybox"``); missing parent directories are added
    automatically, before their children. Every entry is owned by root with mtime 0, so the same
    entries always give the same bytes. Regular files come from ``bytes`` or a host file read at
    :meth:`write` time.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._normalise(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _normalise(path: str) -> str:
        parts = path.lstrip("/").split("/")
        if any(p in ("", "..", ".") for p in parts) or "\0" in path:
            raise CpioEntryError(
                f"cpio entry name {path!r} must be a relative path without empty, '.' or '..' parts"
            )
        return "/".join(parts)

    def _add(self, path: str, entry: _Entry, *, replace: bool = False) -> None:
        name = self._normalise(path)
        parent = PurePosixPath(name).parent
        if str(parent) != ".":
            self._ensure_directory(str(parent))
        existing = self._entries.get(name)
        if existing is not None:
            if stat.S_ISDIR(existing.mode) and stat.S_ISDIR(entry.mode):
                return
            if not replace:
                raise CpioEntryError(f"cpio entry {name!r} added twice")
            del self._entries[name]
        self._entries[name] = entry

    def _ensure_directory(self, name: str) -> None:
        existing = self._entries.get(name)
        if existing is None:
            self._add(name, _Entry(stat.S_IFDIR | 0o755, b""))
        elif not stat.S_ISDIR(existing.mode):
            raise CpioEntryError(f"cpio entry {name!r} is used as a directory but is not one")

    def add_directory(self, path: str, mode: int = 0o755) -> None:
        """A directory (no error if it is already there)."""
        self._add(path, _Entry(stat.S_IFDIR | (mode & 0o7777), b""))

    def add_file(self, path: str, data: bytes | Path, mode: int = 0o644, *, replace: bool = False) -> None:
        """A regular file with ``data`` (bytes, or a host file whose contents are read when writing)."""
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if size > _NEWC_MAX_SIZE:
            raise CpioEntryError(f"cpio entry {path!r} is {size} bytes; newc holds at most 4 GiB - 1")
        self._add(path, _Entry(stat.S_IFREG | (mode & 0o7777), data), replace=replace)

    def add_symlink(self, path: str, target: str, *, replace: bool = False) -> None:
        """A symbolic link to ``target`` (stored verbatim)."""
        if not target or "\0" in target:
            raise CpioEntryError(f"cpio symlink {path!r} needs a non-empty target")
        self._add(path, _Entry(stat.S_IFLNK | 0o777, target.encode()), replace=replace)

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node (e.g. ``dev/console`` 5:1, which the kernel opens before ``/init``)."""
        self._add(path, _Entry(stat.S_IFCHR | (mode & 0o7777), b"", (major, minor)))

    def names(self) -> list[str]:
        """Entry names in archive order."""
        return list(self._entries)

    def write(self, out: _Writable) -> int:
        """Write the archive (entries, then the trailer) to ``out``; return the bytes written."""
        written = 0
        for ino, (name, entry) in enumerate(self._entries.items(), start=1):
            written += self._write_entry(out, ino, name, entry)
        written += self._write_entry(out, 0, _NEWC_TRAILER, _Entry(0, b""), nlink=1)
        return written

    @staticmethod
    def _write_entry(out: _Writable, ino: int, name: str, entry: _Entry, *, nlink: int | None = None) -> int:
        data = entry.data.read_bytes() if isinstance(entry.data, Path) else entry.data
        if len(data) > _NEWC_MAX_SIZE:
            raise CpioEntryError(f"cpio entry {name!r} grew beyond 4 GiB - 1 while the archive was written")
        encoded = name.encode() + b"\0"
        if nlink is None:
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(data), 0, 0, entry.rdev[0], entry.rdev[1])
        header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + b"%08X%08X" % (len(encoded), 0)
        head = header + encoded
        chunk = head + b"\0" * _pad4(len(head)) + data + b"\0" * _pad4(len(data))
        out.write(chunk)
        return len(chunk)


# --------------------------------------------------------------------------------------------------
# kernel modules: dependencies from each module's .modinfo ELF section
# --------------------------------------------------------------------------------------------------

_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")
_MAX_MODULE_SIZE: Final = 256 * 1024 * 1024


def _module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes, decompressing ``.ko.xz`` / ``.ko.gz``."""
    if path.stat().st_size > _MAX_MODULE_SIZE:
        raise GuestImageError(f"{path}: kernel module larger than {_MAX_MODULE_SIZE} bytes; refusing it")
    raw = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise GuestImageError(f"{path}: cannot decompress kernel module: {exc}") from exc
    if path.name.endswith(".ko"):
        return raw
    raise GuestImageError(f"{path}: unsupported kernel module compression (only .ko, .ko.xz, .ko.gz)")


def _modinfo(elf: bytes, path: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 little-endian module's ``.modinfo`` section."""

    def bad(what: str) -> GuestImageError:
        return GuestImageError(f"{path}: not a usable x86-64 kernel module: {what}")

    if len(elf) < _ELF64_HEADER.size or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise bad("no ELF64 little-endian header")
    header = _ELF64_HEADER.unpack_from(elf)
    shoff, shentsize, shnum, shstrndx = header[6], header[11], header[12], header[13]
    if shentsize != _ELF64_SECTION.size or shnum == 0 or shstrndx >= shnum:
        raise bad("bad section header table")
    if shoff + shnum * shentsize > len(elf):
        raise bad("section header table beyond the end of the file")
    sections = [_ELF64_SECTION.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]

    def contents(section: tuple[int, ...]) -> bytes:
        offset, size = section[4], section[5]
        if offset + size > len(elf):
            raise bad("section beyond the end of the file")
        return elf[offset : offset + size]

    names = contents(sections[shstrndx])
    for section in sections:
        start = section[0]
        end = names.find(b"\0", start)
        if start < len(names) and names[start:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in contents(section).split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise bad("no .modinfo section")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def module_dependencies(modules_root: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """Modules ``wanted`` and everything they depend on, in load order (dependencies first).

    ``modules_root`` is a kernel's ``lib/modules/<release>`` directory. Dependencies come from each
    module's ``depends=`` modinfo field, so no ``modules.dep`` (which Debian creates only on install)
    is needed. Names may use ``-`` or ``_``. Unknown names raise :class:`GuestImageError`.
    """
    index: dict[str, Path] = {}
    for path in sorted(modules_root.rglob("*.ko*")):
        index.setdefault(_module_name(path), path)
    if not index:
        raise GuestImageError(f"{modules_root}: no kernel modules found")
    order: list[tuple[str, Path]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise GuestImageError(f"{modules_root}: module dependency loop {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise GuestImageError(f"{modules_root}: no kernel module named {name!r}{via}")
        state[name] = "visiting"
        info = _modinfo(_module_bytes(path), path)
        for field in info.get("depends", []):
            for dep in filter(None, field.split(",")):
                visit(dep.replace("-", "_"), (*chain, name))
        state[name] = "done"
        order.append((name, path))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


# --------------------------------------------------------------------------------------------------
# the guest's /init and helpers
# --------------------------------------------------------------------------------------------------

#: The guest's ``/init`` (busybox ``sh``). ``@MODULES@`` is replaced by the module load list.
INIT_SCRIPT: Final = r"""#!/bin/sh
# pyti tiny guest: PID 1.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=vt100 PS1='pyti# '
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /mnt/disk /root
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
exec 0</dev/console 1>/dev/console 2>&1
hostname pyti-guest
ip link set lo up 2>/dev/null

run="" disks="/dev/vda /dev/vda1" echo=1
for word in $(cat /proc/cmdline); do
    case "$word" in
        @RUN_KEY@=*) run="${word#@RUN_KEY@=}" ;;
        @DISK_KEY@=*) disks=$(echo "${word#@DISK_KEY@=}" | tr , ' ') ;;
        @ECHO_KEY@=0) echo=0 ;;
    esac
done

for m in @MODULES@; do
    insmod "/@MODULES_DIR@/$m.ko" || echo "pyti: cannot load kernel module $m"
done

# The first of $disks that holds ext2/3/4 or FAT is mounted read-write at /mnt/disk.
pyti_fstype() {
    if [ "$(od -An -tx1 -j1080 -N2 "$1" 2>/dev/null | tr -d ' ')" = 53ef ]; then
        echo ext4
    elif [ "$(od -An -tx1 -j510 -N2 "$1" 2>/dev/null | tr -d ' ')" = 55aa ] &&
         { [ "$(dd if="$1" bs=1 skip=54 count=3 2>/dev/null)" = FAT ] ||
           [ "$(dd if="$1" bs=1 skip=82 count=3 2>/dev/null)" = FAT ]; }; then
        echo vfat
    fi
}
for dev in $disks; do
    [ -b "$dev" ] || continue
    fstype=$(pyti_fstype "$dev")
    if [ -n "$fstype" ] && mount -t "$fstype" -o rw "$dev" /mnt/disk; then
        break
    fi
done

acpid -c /etc/acpi -l /dev/null
echo @READY@

# A wide terminal: typed commands come back on one line instead of being wrapped at 80 columns.
stty cols 1000 rows 50 2>/dev/null
[ "$echo" = 0 ] && stty -echo
if [ -n "$run" ]; then
    cd /mnt/disk 2>/dev/null || cd /
    setsid cttyhack sh "$run"
    echo "@RUN_EXIT@ $?"
    exec /sbin/pyti-poweroff
fi
while true; do
    cd /root
    setsid cttyhack sh -l
done
"""

_POWEROFF_SCRIPT: Final = r"""#!/bin/sh
# Stop everything, flush and unmount /mnt/disk, power off.
kill -TERM -1 2>/dev/null
sleep 0.2
kill -KILL -1 2>/dev/null
sync
umount /mnt/disk 2>/dev/null || mount -o remount,ro /mnt/disk 2>/dev/null
sync
poweroff -f
"""

_POWER_BUTTON_SCRIPT: Final = """#!/bin/sh
exec /sbin/pyti-poweroff
"""

_PROFILE: Final = """export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=vt100 PS1='pyti# '
"""


def _render_init(modules: Sequence[str]) -> str:
    return (
        INIT_SCRIPT.replace("@MODULES@", " ".join(modules))
        .replace("@MODULES_DIR@", _MODULES_DIR)
        .replace("@READY@", READY_MARKER)
        .replace("@RUN_EXIT@", RUN_EXIT_MARKER)
        .replace("@RUN_KEY@", protocol.CMDLINE_RUN)
        .replace("@DISK_KEY@", protocol.CMDLINE_DISK)
        .replace("@ECHO_KEY@", protocol.CMDLINE_ECHO)
    )


# --------------------------------------------------------------------------------------------------
# apt
# --------------------------------------------------------------------------------------------------

_APT_HINT = "(are the package lists there? run `apt-get update` once as root)"


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise GuestImageError(
            f"{what}: {argv[0]} not found; building the guest needs a Debian-like host with apt and dpkg",
            command=argv,
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestImageError(f"{what}: timed out after {_APT_TIMEOUT:.0f} s", command=argv) from exc
    if proc.returncode != 0:
        raise GuestImageError(
            f"{what}: `{' '.join(argv)}` failed with exit status {proc.returncode}",
            command=argv,
            output=proc.stderr + proc.stdout,
        )
    return proc.stdout


def _parse_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _candidates(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """The candidate version's ``apt-cache show`` stanza for each package."""
    out = _run(
        ["apt-cache", "show", "--no-all-versions", *packages],
        what=f"looking up {', '.join(packages)} {_APT_HINT}",
    )
    found = {s["Package"]: s for s in _parse_stanzas(out) if "Package" in s and "Version" in s}
    missing = [p for p in packages if p not in found]
    if missing:
        raise GuestImageError(f"apt knows no package {', '.join(missing)} {_APT_HINT}")
    return found


def _resolve_packages(python: bool) -> dict[str, str]:
    """Package name -> version for everything the guest is built from.

    One ``apt-cache`` call when the metapackage pins its kernel with ``(= version)``, as Debian's do
    (each call costs a second or two where apt keeps no binary cache).
    """
    others = [BUSYBOX_PACKAGE, *(PYTHON_PACKAGES if python else ())]
    stanzas = _candidates([KERNEL_PACKAGE, *others])
    meta = stanzas[KERNEL_PACKAGE]
    kernel, pinned = "", ""
    for alternative in re.split(r"[,|]", meta.get("Depends", "")):
        match = re.fullmatch(r"\s*(linux-image-\S+)\s*(?:\(\s*=\s*(\S+)\s*\))?.*", alternative, re.DOTALL)
        if match and match.group(1) != KERNEL_PACKAGE:
            kernel, pinned = match.group(1), match.group(2) or ""
            break
    if not kernel:
        raise GuestImageError(
            f"{KERNEL_PACKAGE} {meta.get('Version', '?')} depends on no linux-image-<version> package: "
            f"Depends: {meta.get('Depends', '')!r}"
        )
    versions = {name: stanzas[name]["Version"] for name in others}
    versions[kernel] = pinned or _candidates([kernel])[kernel]["Version"]
    return {kernel: versions[kernel], **{name: versions[name] for name in others}}


def _deb_name(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}.deb"


def _download(packages: Mapping[str, str], deb_dir: Path) -> dict[str, Path]:
    """Each package's ``.deb`` in ``deb_dir``, fetching the missing ones with ``apt-get download``."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: deb_dir / _deb_name(name, version) for name, version in packages.items()}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        with tempfile.TemporaryDirectory(dir=deb_dir, prefix=".download-") as tmp:
            os.chmod(tmp, 0o755)
            specs = [f"{name}={packages[name]}" for name in missing]
            _run(["apt-get", "download", "-q", *specs], cwd=Path(tmp), what=f"downloading {_APT_HINT}")
            got = {p.name.split("_", 1)[0]: p for p in Path(tmp).glob("*.deb")}
            for name in missing:
                if name not in got:
                    raise GuestImageError(f"apt-get download printed no error but fetched no {name} .deb")
                os.replace(got[name], paths[name])
    return paths


# --------------------------------------------------------------------------------------------------
# assembling the initramfs
# --------------------------------------------------------------------------------------------------


def _excluded(rel: str) -> bool:
    return rel.startswith(_EXCLUDED_PREFIXES) or bool(_EXCLUDED_NAMES.search(rel.rsplit("/", 1)[-1]))


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            yield path.relative_to(root).as_posix(), path


def _add_tree(archive: CpioArchive, root: Path) -> None:
    for rel, path in _walk(root):
        if _excluded(rel):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            archive.add_symlink(rel, os.readlink(path), replace=True)
        elif stat.S_ISREG(st.st_mode):
            archive.add_file(rel, path, stat.S_IMODE(st.st_mode), replace=True)


def _precompile_python(root: Path) -> int:
    """Byte-compile the guest's stdlib with this Python when it is the guest's version; return count.

    Hash-based unchecked ``.pyc`` files are used regardless of the sources' mtimes, which the
    initramfs does not keep. A guest without them still works, only imports are slower.
    """
    if sys.version_info[:2] != _GUEST_PYTHON:
        return 0
    stdlib = root / "usr/lib/python3.11"
    count = 0
    for source in sorted(stdlib.rglob("*.py")):
        rel = source.relative_to(root).as_posix()
        if _excluded(rel) or "lib2to3/tests" in rel:
            continue
        target = source.parent / "__pycache__" / f"{source.stem}.cpython-311.pyc"
        try:
            py_compile.compile(
                str(source),
                cfile=str(target),
                dfile="/" + rel,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError:
            continue  # a few files are Python-2 examples or deliberately invalid; the guest skips them too
        count += 1
    return count


def _busybox_applets(busybox: Path) -> list[str]:
    out = _run([str(busybox), "--list-full"], what="listing busybox applets")
    return [line.strip() for line in out.splitlines() if line.strip()]


def _assemble(
    staging: Path,
    packages: Mapping[str, str],
    modules: Sequence[tuple[str, Path]],
    init: str,
    python: bool,
) -> CpioArchive:
    archive = CpioArchive()
    for directory in ("dev", "proc", "sys", "run", "tmp", "root", "mnt/disk", "etc/acpi/PWRF"):
        archive.add_directory(directory)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    for name in ("lib", "lib64", "bin", "sbin"):
        with contextlib.suppress(CpioEntryError):
            archive.add_directory(name)
    if python:
        _add_tree(archive, staging / "python")
        archive.add_symlink("usr/bin/python3", "python3.11")
        archive.add_symlink("usr/bin/python", "python3.11")
    busybox = staging / "busybox" / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestImageError(f"{BUSYBOX_PACKAGE} {packages[BUSYBOX_PACKAGE]} has no bin/busybox")
    archive.add_file("bin/busybox", busybox, 0o755, replace=True)
    for applet in _busybox_applets(busybox):
        rel = applet.lstrip("/")
        if rel != "bin/busybox" and rel not in archive:
            archive.add_symlink(rel, "/bin/busybox")
    for name, path in modules:
        archive.add_file(f"{_MODULES_DIR}/{name}.ko", _module_bytes(path), 0o644)
    archive.add_file("init", init.encode(), 0o755)
    archive.add_file("sbin/pyti-poweroff", _POWEROFF_SCRIPT.encode(), 0o755)
    archive.add_file("etc/acpi/PWRF/00000080", _POWER_BUTTON_SCRIPT.encode(), 0o755)
    archive.add_file("etc/profile", _PROFILE.encode(), 0o644)
    archive.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    archive.add_file("etc/group", b"root:x:0:\n", 0o644)
    archive.add_file("etc/hostname", b"pyti-guest\n", 0o644)
    info = {"packages": dict(packages), "modules": [name for name, _ in modules], "python": python}
    archive.add_file("etc/pyti-guest.json", json.dumps(info, indent=1, sort_keys=True).encode(), 0o644)
    return archive


# --------------------------------------------------------------------------------------------------
# the cache and the public entry point
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyti/guest``, or ``~/.cache/pyti/guest`` (read when called, not at import)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyti" / "guest"


def _cache_key(packages: Mapping[str, str], modules: Sequence[str], init: str, python: bool) -> str:
    material = {
        "format": _BUILD_FORMAT,
        "packages": dict(sorted(packages.items())),
        "modules": list(modules),
        "python": python,
        "pyc": list(sys.version_info[:2]) == list(_GUEST_PYTHON) and python,
        "init": hashlib.sha256(init.encode()).hexdigest(),
        "helpers": hashlib.sha256((_POWEROFF_SCRIPT + _POWER_BUTTON_SCRIPT + _PROFILE).encode()).hexdigest(),
        "excluded": list(_EXCLUDED_PREFIXES),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def _load(build_dir: Path) -> TinyLinux | None:
    try:
        info = json.loads((build_dir / "build.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = build_dir / "vmlinuz", build_dir / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return TinyLinux(
        kernel=kernel,
        initrd=initrd,
        cmdline=DEFAULT_CMDLINE,
        python=bool(info["python"]),
        kernel_release=str(info["kernel_release"]),
        packages={str(k): str(v) for k, v in info["packages"].items()},
        modules=tuple(str(m) for m in info["modules"]),
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fingerprint(python: bool, wanted: Sequence[str]) -> str:
    """What a build is asked for, apart from package versions: used to find it again offline."""
    material = {
        "python": python,
        "modules": list(wanted),
        "init": _render_init(wanted),
        "format": _BUILD_FORMAT,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def _newest_cached(cache: Path, fingerprint: str) -> TinyLinux | None:
    """The newest complete build in ``cache`` made for ``fingerprint``, whatever its package versions."""
    best: tuple[float, TinyLinux] | None = None
    for info_path in cache.glob("*/build.json"):
        try:
            info = json.loads(info_path.read_text())
            mtime = info_path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("fingerprint") != fingerprint:
            continue
        guest = _load(info_path.parent)
        if guest is not None and (best is None or mtime > best[0]):
            best = (mtime, guest)
    return best[1] if best is not None else None


def _remove_stale(cache: Path) -> None:
    """Remove temporary directories left by builders that died (only called with the lock held)."""
    for stale in [*cache.glob(".build-*"), *cache.glob("debs/.download-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def build_tiny_linux(
    cache_dir: Path | None = None,
    *,
    python: bool = False,
    modules: Sequence[str] = DEFAULT_MODULES,
) -> TinyLinux:
    """Build (or reuse from ``cache_dir``) a tiny Linux guest; see the module docstring.

    ``python=True`` adds Debian's Python 3.11 as ``/usr/bin/python3``. ``modules`` names the kernel
    modules to load at boot (their dependencies are added).

    The candidate versions of the packages are looked up with ``apt-cache`` on every call; a build made
    from exactly those versions is reused. When the lookup fails (no apt, no package lists) the newest
    cached build made with the same options is returned instead, and the lookup's
    :class:`GuestImageError` is raised only when there is none. It is also raised when apt cannot
    fetch a package, or a package is not what the builder expects.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wanted = tuple(dict.fromkeys(m.replace("-", "_") for m in modules))
    fingerprint = _fingerprint(python, wanted)
    try:
        packages = _resolve_packages(python)
    except GuestImageError:
        fallback = _newest_cached(cache, fingerprint) if cache.is_dir() else None
        if fallback is None:
            raise
        return fallback
    key = _cache_key(packages, wanted, _render_init(wanted), python)
    kernel_package = next(p for p in packages if p.startswith("linux-image-"))
    release = kernel_package.removeprefix("linux-image-")
    build_dir = cache / f"{release}-{'python' if python else 'busybox'}-{key}"
    cached = _load(build_dir)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        cached = _load(build_dir)
        if cached is not None:
            return cached
        _remove_stale(cache)
        debs = _download(packages, cache / "debs")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            out = _build(
                Path(tmp), debs, packages, kernel_package=kernel_package, wanted=wanted, python=python
            )
            info = json.loads((out / "build.json").read_text())
            info["fingerprint"] = fingerprint
            (out / "build.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            for path in out.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            if build_dir.exists():  # a broken earlier build (no build.json): replace it
                shutil.rmtree(build_dir)
            os.replace(out, build_dir)
            dir_fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a crash
            finally:
                os.close(dir_fd)
    result = _load(build_dir)
    if result is None:
        raise GuestImageError(f"{build_dir}: build finished but its files are not readable")
    return result


def _build(
    work: Path,
    debs: Mapping[str, Path],
    packages: Mapping[str, str],
    *,
    kernel_package: str,
    wanted: Sequence[str],
    python: bool,
) -> Path:
    """Unpack ``debs`` under ``work`` and write ``work/out/{vmlinuz,initrd.img,build.json}``."""
    release = kernel_package.removeprefix("linux-image-")
    staging = work / "staging"
    groups = {kernel_package: "kernel", BUSYBOX_PACKAGE: "busybox"}
    for name, deb in debs.items():
        target = staging / groups.get(name, "python")
        target.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(target)], what=f"unpacking {deb.name}")
    kernel_root = staging / "kernel"
    vmlinuz = kernel_root / "boot" / f"vmlinuz-{release}"
    modules_root = kernel_root / "lib" / "modules" / release
    if not vmlinuz.is_file() or not modules_root.is_dir():
        raise GuestImageError(
            f"{kernel_package} {packages[kernel_package]} has no boot/vmlinuz-{release} "
            f"or lib/modules/{release}"
        )
    ordered = module_dependencies(modules_root, wanted)
    init = _render_init([name for name, _ in ordered])
    if python:
        _precompile_python(staging / "python")
    archive = _assemble(staging, packages, ordered, init, python)
    out = work / "out"
    out.mkdir()
    with open(out / "initrd.img", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        archive.write(gz)
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    info = {
        "kernel_release": release,
        "packages": dict(packages),
        "modules": [name for name, _ in ordered],
        "python": python,
        "entries": len(archive),
    }
    (out / "build.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    return out
