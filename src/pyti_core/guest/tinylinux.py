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
* with ``python="3.9"`` (or ``"3.11"`` = ``True``, ``"3.13"``, ``"3.14"``, ``"pypy3"``: :data:`INTERPRETERS`):
  that interpreter from the Debian suite that ships it, with the suite's libc and every library it
  needs (the packages' dependency closure, resolved by apt), without test suites and GUI modules; pip
  and pytest preinstalled, and everything byte-compiled ahead of time by the guest's own Python.

Packages come from Debian's archive through a private apt state per suite
(:class:`pyti_core.guest.debian.Archive`; the host's apt configuration is never used) and are unpacked
with ``dpkg-deb -x`` into a merged-``/usr`` tree. The initramfs is an uncompressed ``newc`` cpio archive
written by :class:`CpioArchive` — no ``cpio`` tool is needed.

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

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Final, Literal, Protocol

import attrs

from pyti_core.errors import CpioEntryError, GuestImageError, PackageError
from pyti_core.guest import protocol
from pyti_core.guest._locking import locked
from pyti_core.guest.debian import DEFAULT_MIRROR, Archive
from pyti_core.guest.protocol import READY_MARKER, RUN_EXIT_MARKER
from pyti_core.packages import GuestTarget, download_wheels

__all__ = [
    "BUSYBOX_PACKAGE",
    "DEFAULT_CMDLINE",
    "DEFAULT_MODULES",
    "DEFAULT_PYTHON",
    "DEFAULT_TOOLING",
    "INIT_SCRIPT",
    "INTERPRETERS",
    "KERNEL_PACKAGE",
    "KERNEL_SUITE",
    "READY_MARKER",
    "RUN_EXIT_MARKER",
    "CpioArchive",
    "CpioEntryError",
    "GuestImageError",
    "Interpreter",
    "TinyLinux",
    "build_tiny_linux",
    "default_cache_dir",
    "interpreter_named",
    "module_dependencies",
]

#: The kernel command line a guest needs: serial console, reboot on panic, few kernel messages, and
#: no check that the emulated timer interrupt arrives in time: under TCG on a busy host it often does
#: not, and the kernel panics with "IO-APIC + timer doesn't work!" (libguestfs passes it for the same).
DEFAULT_CMDLINE: Final = "console=ttyS0 panic=-1 quiet no_timer_check"
#: Debian's metapackage for the cloud kernel; it depends on exactly one versioned kernel package.
KERNEL_PACKAGE: Final = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE: Final = "busybox-static"
#: The Debian suite the kernel and busybox come from (one kernel for every guest).
KERNEL_SUITE: Final = "bookworm"
#: What is preinstalled, byte-compiled, in every Python guest: pip and the default recipe's test tooling.
DEFAULT_TOOLING: Final = ("pip", "pytest")


@attrs.frozen
class Interpreter:
    """A Python a guest can have: its Debian suite, packages and command.

    ``name`` is what ``--python`` takes; ``packages`` are the roots whose dependency closure (resolved by
    apt in ``suite``) makes the guest's userland; ``command`` is the interpreter in ``/usr/bin`` (the
    guest's ``python3`` points to it); ``lib_dirs`` hold its standard library (byte-compiled, test
    suites left out); ``abi`` is its wheel ABI tag (``cp39``, ``pypy39_pp73``).
    """

    name: str
    suite: str
    implementation: Literal["cpython", "pypy"]
    version: tuple[int, int]
    packages: tuple[str, ...]
    command: str
    lib_dirs: tuple[str, ...]
    abi: str

    @property
    def wheel_implementation(self) -> Literal["cp", "pp"]:
        return "pp" if self.implementation == "pypy" else "cp"


def _cpython(version: tuple[int, int], suite: str, *extra: str) -> Interpreter:
    v = f"{version[0]}.{version[1]}"
    return Interpreter(
        name=v,
        suite=suite,
        implementation="cpython",
        version=version,
        packages=(f"python{v}-minimal", f"libpython{v}-stdlib", *extra),
        command=f"python{v}",
        lib_dirs=(f"usr/lib/python{v}",),
        abi=f"cp{version[0]}{version[1]}",
    )


#: The Pythons a guest can have, by ``--python`` name: each from the Debian suite that ships it.
INTERPRETERS: Final[Mapping[str, Interpreter]] = {
    # bullseye's pip needs distutils, which Debian ships apart from the standard library before 3.10
    "3.9": _cpython((3, 9), "bullseye", "python3-distutils"),
    "3.11": _cpython((3, 11), "bookworm"),
    "3.13": _cpython((3, 13), "trixie"),
    "3.14": _cpython((3, 14), "sid"),
    "pypy3": Interpreter(
        name="pypy3",
        suite="bookworm",
        implementation="pypy",
        version=(3, 9),
        packages=("pypy3",),
        command="pypy3",
        lib_dirs=("usr/lib/pypy3.9",),
        abi="pypy39_pp73",
    ),
}
#: The guest ``python=True`` (and ``pyti run`` without ``--python``) gets.
DEFAULT_PYTHON: Final = "3.11"
#: Packages every Python guest has besides its interpreter: os-release (base-files) and MIME types.
_BASE_PACKAGES: Final = ("base-files", "media-types")
#: Packages in a closure the guest never uses (package tools, shells, configuration): left out.
_UNUSED_PACKAGES: Final = frozenset(
    {"perl-base", "dpkg", "tar", "mawk", "debconf", "tzdata", "netbase", "readline-common", "sensible-utils"}
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

# Parts of packages the guest never uses: documentation, locales, charset converters, configuration.
_EXCLUDED_PREFIXES: Final = (
    "usr/share/",
    "usr/lib/x86_64-linux-gnu/gconv/",
    "usr/lib/binfmt.d/",
    "usr/lib/python3/dist-packages/lib2to3/tests/",
    "etc/",
)
# In a standard library: test suites, GUI and IDE modules.
_EXCLUDED_IN_STDLIB: Final = re.compile(
    r"^usr/lib/(?:python3\.\d+|pypy3\.\d+)/(?:.*/)?(?:test|tests|idle_test|idlelib|tkinter|turtledemo|pydoc_data)/"
)
_EXCLUDED_NAMES: Final = re.compile(r"_test[a-z_]*\.(?:cpython|pypy).*\.so$|^xxlimited.*\.so$")
_COMPILE_SKIP: Final = r"/(?:test|tests|idle_test|idlelib|tkinter|turtledemo|pydoc_data|lib2to3)/"
_BUILD_FORMAT: Final = 4  # bump when the builder's output changes for the same inputs
_MODULES_DIR: Final = "lib/modules/pyti"
_APT_TIMEOUT: Final = 600.0
_TOOL_TIMEOUT: Final = 900.0


@attrs.frozen
class TinyLinux:
    """A built guest: boot it with ``-kernel kernel -initrd initrd -append cmdline``.

    ``packages`` maps each Debian package used to its version; ``modules`` lists the kernel modules
    loaded at boot in load order. A Python guest also says which interpreter it has (``interpreter``,
    the :data:`INTERPRETERS` name; ``python_version``, the Debian package's version), the glibc version
    its wheels must fit (``glibc``), the Python distributions installed in it (``preinstalled``: name ->
    version) and whether its byte code was compiled ahead of time (``precompiled``).
    """

    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE
    python: bool = False
    kernel_release: str = ""
    packages: Mapping[str, str] = attrs.field(factory=dict)
    modules: tuple[str, ...] = ()
    interpreter: str = ""
    glibc: tuple[int, int] = (0, 0)
    preinstalled: Mapping[str, str] = attrs.field(factory=dict)
    precompiled: bool = False

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


def _run(
    argv: Sequence[str], *, cwd: Path | None = None, what: str, env: Mapping[str, str] | None = None
) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT,
            check=False,
            env=None if env is None else dict(env),
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


def _archive(cache: Path, suite: str) -> Archive:
    """``suite`` through the private apt state in ``cache/apt``; ``$PYTI_DEBIAN_MIRROR`` names another
    mirror (read at each call)."""
    return Archive(cache / "apt", suite, mirror=os.environ.get("PYTI_DEBIAN_MIRROR") or DEFAULT_MIRROR)


def _resolve_kernel(archive: Archive) -> dict[str, str]:
    """The versioned kernel package behind :data:`KERNEL_PACKAGE`, and busybox: name -> version."""
    found = archive.closure([KERNEL_PACKAGE, BUSYBOX_PACKAGE])
    kernels = [p for p in found if re.fullmatch(r"linux-image-\d\S*", p)]
    if len(kernels) != 1:
        raise GuestImageError(
            f"{KERNEL_PACKAGE} in Debian {archive.suite} does not lead to exactly one linux-image-<version> "
            f"package: {sorted(found)}"
        )
    return {kernels[0]: found[kernels[0]], BUSYBOX_PACKAGE: found[BUSYBOX_PACKAGE]}


def _resolve_python(archive: Archive, interpreter: Interpreter) -> dict[str, str]:
    """Everything the interpreter needs from its suite (its packages' dependency closure)."""
    return archive.closure([*interpreter.packages, *_BASE_PACKAGES], exclude=sorted(_UNUSED_PACKAGES))


def _resolve_packages(
    cache: Path, interpreter: Interpreter | None, *, refresh: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """``(kernel and busybox, the interpreter's packages)``: name -> version, each from its suite."""
    kernel_archive = _archive(cache, KERNEL_SUITE)
    kernel_archive.update(force=refresh)
    base = _resolve_kernel(kernel_archive)
    if interpreter is None:
        return base, {}
    python_archive = _archive(cache, interpreter.suite)
    if interpreter.suite != KERNEL_SUITE:
        python_archive.update(force=refresh)
    return base, _resolve_python(python_archive, interpreter)


def _glibc(packages: Mapping[str, str]) -> tuple[int, int]:
    """The glibc version of a package set, from its ``libc6`` (``2.36-9+deb12u4`` -> ``(2, 36)``)."""
    match = re.match(r"(?:\d+:)?(\d+)\.(\d+)", packages.get("libc6", ""))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# --------------------------------------------------------------------------------------------------
# assembling the initramfs
# --------------------------------------------------------------------------------------------------


def _excluded(rel: str) -> bool:
    return (
        rel.startswith(_EXCLUDED_PREFIXES)
        or bool(_EXCLUDED_IN_STDLIB.match(rel))
        or bool(_EXCLUDED_NAMES.search(rel.rsplit("/", 1)[-1]))
    )


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            yield path.relative_to(root).as_posix(), path


#: The merged-/usr layout every guest has (Debian's since bookworm): these are links into /usr.
_MERGED: Final = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def _usr(rel: str) -> str:
    """``rel`` in the merged-/usr layout: ``bin/sh`` -> ``usr/bin/sh``."""
    top, sep, rest = rel.partition("/")
    return f"{_MERGED[top]}/{rest}" if sep and top in _MERGED else rel


def _unpack_merged(debs: Sequence[Path], root: Path, scratch: Path) -> None:
    """Unpack ``debs`` into ``root`` with /bin, /sbin, /lib and /lib64 merged into /usr.

    Each package is unpacked on its own and then moved in, so a suite whose packages still ship
    ``/lib`` (bullseye) and one whose base-files ships the ``/lib -> usr/lib`` link (trixie) give the
    same tree; later packages win where two ship the same file.
    """
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        unpacked = scratch / deb.name
        unpacked.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], what=f"unpacking {deb.name}")
        for rel, path in list(_walk(unpacked)):
            if rel in _MERGED:  # the package's own /lib -> usr/lib link
                continue
            target = root / _usr(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(path, target)
        shutil.rmtree(unpacked)
    for name, link in _MERGED.items():
        (root / link).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(link)


def _in_root(root: Path, command: str) -> list[str] | None:
    """The command prefix that runs a program with ``root`` as ``/``: chroot (as root), else chroot in a
    user namespace; None when neither works here (``command`` is the program it is tried with)."""
    chroot, unshare = shutil.which("chroot"), shutil.which("unshare")
    candidates = []
    if chroot is not None and os.geteuid() == 0:
        candidates.append([chroot, str(root)])
    if chroot is not None and unshare is not None:
        candidates.append([unshare, "--user", "--map-root-user", chroot, str(root)])
    for prefix in candidates:
        try:
            probe = subprocess.run(
                [*prefix, command, "-c", "pass"], capture_output=True, timeout=120, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def _guest_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def guest_target(interpreter: Interpreter, packages: Mapping[str, str]) -> GuestTarget:
    """What wheels a guest of ``interpreter`` built from ``packages`` takes (version, ABI, glibc)."""
    full = ""
    if interpreter.implementation == "cpython":
        match = re.match(r"(?:\d+:)?(\d+\.\d+\.\d+)", packages.get(f"python{interpreter.name}-minimal", ""))
        full = match.group(1) if match else ""
    return GuestTarget(
        python_version=interpreter.version,
        glibc=_glibc(packages),
        implementation=interpreter.wheel_implementation,
        abi=interpreter.abi,
        full_version=full,
    )


def _download_tooling(tooling: Sequence[str], target: GuestTarget, dest: Path) -> list[Path]:
    """Wheels of ``tooling`` and their dependencies for ``target``, from PyPI (through pip's cache)."""
    try:
        return download_wheels(tooling, dest, target)
    except PackageError as exc:
        raise GuestImageError(f"cannot fetch {', '.join(tooling)} for the guest: {exc}") from exc


def _preinstall(
    root: Path, interpreter: Interpreter, wheels: Sequence[Path], prefix: list[str]
) -> dict[str, str]:
    """Install ``wheels`` (pip among them) into the guest tree with the guest's own Python; return
    name -> version of what was installed."""
    inbox = root / "tmp" / "pyti-tooling"
    inbox.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        shutil.copyfile(wheel, inbox / wheel.name)
    pip = next((w.name for w in wheels if w.name.startswith("pip-")), None)
    if pip is None:
        raise GuestImageError("the tooling for the guest has no pip wheel")
    names = sorted({w.name.split("-")[0] for w in wheels})
    python = f"/usr/bin/{interpreter.command}"
    _run(
        [*prefix, python, f"/tmp/pyti-tooling/{pip}/pip", "install", "--no-index", "--no-compile",
         "--no-cache-dir", "--find-links", "/tmp/pyti-tooling", *names],
        what=f"installing {', '.join(names)} into the {interpreter.name} guest",
        env=_guest_env(),
    )  # fmt: skip
    shutil.rmtree(inbox)
    return {w.name.split("-")[0].lower().replace("_", "-"): w.name.split("-")[1] for w in wheels}


def _precompile(root: Path, interpreter: Interpreter, prefix: list[str]) -> None:
    """Byte-compile the guest's standard library and site packages with the guest's own Python.

    Unchecked hash-based ``.pyc`` files (PEP 552) are used regardless of the sources' mtimes, which the
    initramfs does not keep; test suites are skipped (they are left out of the guest).
    """
    dirs = [f"/{d}" for d in interpreter.lib_dirs if (root / d).is_dir()]
    dirs += [
        f"/usr/local/lib/{Path(d).name}"
        for d in interpreter.lib_dirs
        if (root / "usr/local/lib" / Path(d).name).is_dir()
    ]
    _run(
        [*prefix, f"/usr/bin/{interpreter.command}", "-m", "compileall", "-q", "-x", _COMPILE_SKIP,
         "--invalidation-mode", "unchecked-hash", *dirs],
        what=f"byte-compiling the {interpreter.name} guest's Python",
        env={k: v for k, v in _guest_env().items() if k != "PYTHONDONTWRITEBYTECODE"},
    )  # fmt: skip


def _busybox_applets(busybox: Path) -> list[str]:
    out = _run([str(busybox), "--list-full"], what="listing busybox applets")
    return [line.strip() for line in out.splitlines() if line.strip()]


def _assemble(
    staging: Path,
    packages: Mapping[str, str],
    modules: Sequence[tuple[str, Path]],
    init: str,
    interpreter: Interpreter | None,
) -> CpioArchive:
    archive = CpioArchive()
    for name, target in _MERGED.items():
        archive.add_directory(target)
        archive.add_symlink(name, target)
    for directory in ("dev", "proc", "sys", "run", "tmp", "root", "mnt/disk", "etc/acpi/PWRF"):
        archive.add_directory(directory)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    if interpreter is not None:
        tree = staging / "python"
        for rel, path in _walk(tree):
            if rel in _MERGED or _excluded(rel):
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                archive.add_symlink(rel, os.readlink(path), replace=True)
            elif stat.S_ISREG(st.st_mode):
                archive.add_file(rel, path, stat.S_IMODE(st.st_mode), replace=True)
        archive.add_symlink("usr/bin/python3", interpreter.command, replace=True)
        archive.add_symlink("usr/bin/python", interpreter.command, replace=True)
        if (tree / "usr/lib/os-release").is_file():
            archive.add_symlink("etc/os-release", "../usr/lib/os-release")
    busybox = staging / "busybox" / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestImageError(f"{BUSYBOX_PACKAGE} {packages[BUSYBOX_PACKAGE]} has no bin/busybox")
    archive.add_file("usr/bin/busybox", busybox, 0o755, replace=True)
    for applet in _busybox_applets(busybox):
        rel = _usr(applet.lstrip("/"))
        if rel != "usr/bin/busybox" and rel not in archive:
            archive.add_symlink(rel, "/bin/busybox")
    for name, path in modules:
        archive.add_file(_usr(f"{_MODULES_DIR}/{name}.ko"), _module_bytes(path), 0o644)
    archive.add_file("init", init.encode(), 0o755)
    archive.add_file("usr/sbin/pyti-poweroff", _POWEROFF_SCRIPT.encode(), 0o755)
    archive.add_file("etc/acpi/PWRF/00000080", _POWER_BUTTON_SCRIPT.encode(), 0o755)
    archive.add_file("etc/profile", _PROFILE.encode(), 0o644)
    archive.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    archive.add_file("etc/group", b"root:x:0:\n", 0o644)
    archive.add_file("etc/hostname", b"pyti-guest\n", 0o644)
    info = {
        "packages": dict(packages),
        "modules": [name for name, _ in modules],
        "python": interpreter is not None,
        "interpreter": interpreter.name if interpreter is not None else "",
    }
    archive.add_file("etc/pyti-guest.json", json.dumps(info, indent=1, sort_keys=True).encode(), 0o644)
    return archive


# --------------------------------------------------------------------------------------------------
# the cache and the public entry point
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyti/guest``, or ``~/.cache/pyti/guest`` (read when called, not at import)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyti" / "guest"


def _cache_key(
    packages: Mapping[str, str], modules: Sequence[str], init: str, interpreter: Interpreter | None,
    tooling: Sequence[str],
) -> str:  # fmt: skip
    material = {
        "format": _BUILD_FORMAT,
        "packages": dict(sorted(packages.items())),
        "modules": list(modules),
        "interpreter": attrs.asdict(interpreter) if interpreter is not None else None,
        "tooling": list(tooling),
        "init": hashlib.sha256(init.encode()).hexdigest(),
        "helpers": hashlib.sha256((_POWEROFF_SCRIPT + _POWER_BUTTON_SCRIPT + _PROFILE).encode()).hexdigest(),
        "excluded": [*_EXCLUDED_PREFIXES, _EXCLUDED_IN_STDLIB.pattern, _EXCLUDED_NAMES.pattern],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def _load(build_dir: Path) -> TinyLinux | None:
    try:
        info = json.loads((build_dir / "build.json").read_text())
        kernel, initrd = build_dir / "vmlinuz", build_dir / "initrd.img"
        if not (kernel.is_file() and initrd.is_file()):
            return None
        glibc = info.get("glibc", [0, 0])
        return TinyLinux(
            kernel=kernel,
            initrd=initrd,
            cmdline=DEFAULT_CMDLINE,
            python=bool(info["python"]),
            kernel_release=str(info["kernel_release"]),
            packages={str(k): str(v) for k, v in info["packages"].items()},
            modules=tuple(str(m) for m in info["modules"]),
            interpreter=str(info.get("interpreter", "")),
            glibc=(int(glibc[0]), int(glibc[1])),
            preinstalled={str(k): str(v) for k, v in info.get("preinstalled", {}).items()},
            precompiled=bool(info.get("precompiled", False)),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _fingerprint(interpreter: Interpreter | None, wanted: Sequence[str], tooling: Sequence[str]) -> str:
    """What a build is asked for, apart from package versions: used to find it again offline."""
    material = {
        "interpreter": attrs.asdict(interpreter) if interpreter is not None else None,
        "modules": list(wanted),
        "init": _render_init(wanted),
        "tooling": list(tooling),
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


def interpreter_named(name: str) -> Interpreter:
    """The :data:`INTERPRETERS` entry called ``name``; ``ValueError`` lists the choices."""
    try:
        return INTERPRETERS[name]
    except KeyError:
        raise ValueError(f"no guest Python {name!r}; choose from {', '.join(INTERPRETERS)}") from None


def build_tiny_linux(
    cache_dir: Path | None = None,
    *,
    python: bool | str = False,
    modules: Sequence[str] = DEFAULT_MODULES,
    tooling: Sequence[str] = DEFAULT_TOOLING,
    refresh: bool = False,
) -> TinyLinux:
    """Build (or reuse from ``cache_dir``) a tiny Linux guest; see the module docstring.

    ``python`` names the guest's Python (an :data:`INTERPRETERS` key: ``"3.9"``, ``"3.11"``, ``"3.13"``,
    ``"3.14"``, ``"pypy3"``); ``True`` is :data:`DEFAULT_PYTHON`, ``False`` a guest without Python.
    ``tooling`` is what is preinstalled in a Python guest, byte-compiled (pip and pytest by default).
    ``modules`` names the kernel modules to load at boot (their dependencies are added).

    Packages come from Debian's archive through a private apt state in ``cache_dir/apt`` (the host's
    own apt configuration is never used); their lists are fetched when missing or a week old, or with
    ``refresh``. A build made from exactly the packages the lists name is reused. When a suite cannot
    be reached and no lists were ever fetched, the newest cached build made with the same options is
    returned instead; :class:`GuestImageError` (naming the suite) is raised only when there is none.
    ``ValueError`` names the choices for an unknown ``python``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    interpreter = None
    if python is not False:
        interpreter = interpreter_named(DEFAULT_PYTHON if python is True else str(python))
    tooling = tuple(tooling) if interpreter is not None else ()
    wanted = tuple(dict.fromkeys(m.replace("-", "_") for m in modules))
    fingerprint = _fingerprint(interpreter, wanted, tooling)
    try:
        base, userland = _resolve_packages(cache, interpreter, refresh=refresh)
    except GuestImageError:
        fallback = _newest_cached(cache, fingerprint) if cache.is_dir() else None
        if fallback is None:
            raise
        return fallback
    packages = {**base, **userland}
    key = _cache_key(packages, wanted, _render_init(wanted), interpreter, tooling)
    kernel_package = next(p for p in base if p.startswith("linux-image-"))
    release = kernel_package.removeprefix("linux-image-")
    flavour = f"python{interpreter.name}" if interpreter is not None else "busybox"
    build_dir = cache / f"{release}-{flavour}-{key}"
    cached = _load(build_dir)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".lock"):
        cached = _load(build_dir)
        if cached is not None:
            return cached
        _remove_stale(cache)
        debs = _archive(cache, KERNEL_SUITE).download(base, cache / "debs")
        if interpreter is not None:
            debs.update(_archive(cache, interpreter.suite).download(userland, cache / "debs"))
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            out = _build(
                Path(tmp), debs, packages, kernel_package=kernel_package, wanted=wanted,
                interpreter=interpreter, tooling=tooling,
            )  # fmt: skip
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
    interpreter: Interpreter | None,
    tooling: Sequence[str],
) -> Path:
    """Unpack ``debs`` under ``work`` and write ``work/out/{vmlinuz,initrd.img,build.json}``."""
    release = kernel_package.removeprefix("linux-image-")
    staging = work / "staging"
    for name, group in ((kernel_package, "kernel"), (BUSYBOX_PACKAGE, "busybox")):
        (staging / group).mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(debs[name]), str(staging / group)], what=f"unpacking {debs[name].name}")
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
    info: dict[str, object] = {"kernel_release": release, "python": interpreter is not None}
    if interpreter is not None:
        tree = staging / "python"
        userland = [debs[n] for n in packages if n not in (kernel_package, BUSYBOX_PACKAGE)]
        _unpack_merged(userland, tree, work / "unpack")
        (tree / "tmp").mkdir(exist_ok=True)
        glibc = _glibc(packages)
        info.update(interpreter=interpreter.name, glibc=list(glibc), preinstalled={}, precompiled=False)
        prefix = _in_root(tree, f"/usr/bin/{interpreter.command}")
        if prefix is not None:
            if tooling:
                wheels = _download_tooling(tooling, guest_target(interpreter, packages), work / "tooling")
                info["preinstalled"] = _preinstall(tree, interpreter, wheels, prefix)
            _precompile(tree, interpreter, prefix)
            info["precompiled"] = True
    archive = _assemble(staging, packages, ordered, init, interpreter)
    out = work / "out"
    out.mkdir()
    # Not compressed: under TCG the kernel inflating a 25-35 MB gzip initramfs (its Python, pip, pytest)
    # costs more of the boot than reading the 75-125 MB it unpacks to (measured on a loaded 2-core host,
    # QEMU start to ready marker, Python 3.11 guest: gzip 30 s, uncompressed 17-19 s, zstd 20-32 s)
    with open(out / "initrd.img", "wb") as raw:
        archive.write(raw)
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    info.update(packages=dict(packages), modules=[name for name, _ in ordered], entries=len(archive))
    (out / "build.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    return out
