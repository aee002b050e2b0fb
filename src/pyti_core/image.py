"""System images for pyti: build the default one, or prepare your own disk to run pyti's agent.

``pyti image build`` makes the default system: the tiny Python guest (kernel + initramfs, see
``docs/guest-image.md``) that the embedded QEMU driver boots. ``pyti image prepare DISK`` installs the
agent and a boot hook into a disk image of your own (any format diskhandler reads: qcow2, VDI, VMDK,
VHD, raw), through :class:`diskhandler.DiskOperations` — the image is never booted::

    from pyti_core.image import prepare_image

    prepared = prepare_image("debian12.qcow2")
    prepared.init            # "systemd" or "sysv"
    prepared.files           # the guest paths written

What goes into the guest:

``/opt/pyti/agent.py``           the agent (the one on the IO disk is preferred when present)
``/opt/pyti/run-agent``          the hook: find the IO disk, mount it, run the agent, power off
``/etc/systemd/system/pyti-agent.service`` + its ``multi-user.target.wants`` link (systemd guests), or
``/etc/init.d/pyti-agent`` + ``S99pyti-agent`` links in the ``rc2.d`` .. ``rc5.d`` folders (SysV guests)

At boot the hook looks for the IO disk by its filesystem label (:data:`IO_LABEL`), then on every other
disk (``vdb``.., ``sdb``.., ``xvdb``.., their partitions) for one holding ``job.json``; it mounts it at
``/mnt/disk`` (where the job's paths point), runs ``python3 agent.py /mnt/disk`` and powers off. A boot
**without** an IO disk, or with ``pyti.agent=0`` on the kernel command line, is left alone: the image
stays usable as a normal system.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final, Literal

import attrs

from diskhandler import DiskOperations
from pyti_core.errors import ImagePrepareError
from pyti_core.guest import agent
from pyti_core.guest.protocol import (
    CMDLINE_AGENT,
    IO_LABEL,
    IO_MOUNT,
    READY_MARKER,
    RUN_EXIT_MARKER,
    RUN_SCRIPT,
)

if TYPE_CHECKING:
    from pyti_core.manager import GuestSystem

__all__ = [
    "AGENT_DIR",
    "IO_LABEL",
    "READY_MARKER",
    "RUN_EXIT_MARKER",
    "GuestFile",
    "ImageInfo",
    "InitSystem",
    "PreparedImage",
    "build_default_image",
    "detect_init",
    "hook_files",
    "hook_script",
    "inspect_image",
    "prepare_image",
    "systemd_unit",
    "sysv_script",
]

#: Where the agent and its hook go in a prepared guest.
AGENT_DIR: Final = "/opt/pyti"
SERVICE: Final = "pyti-agent"
_SYSTEMD_BINARIES: Final = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
_PYTHONS: Final = ("/usr/bin/python3", "/bin/python3", "/usr/local/bin/python3")
_RUNLEVELS: Final = ("2", "3", "4", "5")
_LIBCS: Final = (
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6",
)
#: Guest files read by :func:`inspect_image` are refused above these sizes (the image is not trusted).
_MAX_LIBC: Final = 32 << 20
_MAX_OS_RELEASE: Final = 64 << 10
_PYTHON_NAME: Final = re.compile(r"python3\.(\d{1,3})")
_GLIBC_BANNER: Final = re.compile(rb"release version (\d{1,2})\.(\d{1,3})")
_GLIBC_SYMBOL: Final = re.compile(rb"GLIBC_(\d{1,2})\.(\d{1,3})")
_SHELL_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./")

InitSystem = Literal["systemd", "sysv"]


def build_default_image(cache_dir: Path | None = None) -> GuestSystem:
    """Build (or find in the cache) the default system image: the tiny Python guest."""
    from pyti_core.manager import GuestSystem  # noqa: PLC0415  (manager pulls in vmanager)

    return GuestSystem.default(cache_dir)


def _shell_word(value: str, what: str) -> str:
    if not value or not set(value) <= _SHELL_SAFE:
        raise ValueError(f"{what} may only hold letters, digits and - _ . /, got {value!r}")
    return value


def hook_script(*, label: str = IO_LABEL, mount_point: str = IO_MOUNT) -> str:
    """The boot hook (POSIX sh): find and mount the IO disk, run the agent on it, power off."""
    label = _shell_word(label, "label")
    mount_point = _shell_word(mount_point, "mount_point")
    if not PurePosixPath(mount_point).is_absolute():
        raise ValueError(f"mount_point must be an absolute guest path, got {mount_point!r}")
    return f"""#!/bin/sh
# Installed by pyti (pyti image prepare). At boot: find pyti's IO disk, mount it at {mount_point},
# run its run.sh (or the agent) on it, power off. Without an IO disk, or with pyti.agent=0 on the
# kernel command line, it does nothing and the system boots as usual.
LABEL='{label}'
MNT='{mount_point}'
AGENT='{AGENT_DIR}/agent.py'

case " $(cat /proc/cmdline 2>/dev/null) " in
    *" {CMDLINE_AGENT}=0 "*) exit 0 ;;
esac

try_mount() {{  # mount $1 on $MNT; succeed only when it holds a job
    mount "$1" "$MNT" 2>/dev/null || return 1
    [ -f "$MNT/job.json" ] && return 0
    umount "$MNT" 2>/dev/null
    return 1
}}

find_io() {{  # set $found to the IO disk's device, mounted on $MNT
    dev=$(blkid -L "$LABEL" 2>/dev/null)
    if [ -z "$dev" ] && [ -e "/dev/disk/by-label/$LABEL" ]; then dev="/dev/disk/by-label/$LABEL"; fi
    if [ -n "$dev" ] && try_mount "$dev"; then found=$dev; return 0; fi
    for dev in /dev/vd[b-z]* /dev/sd[b-z]* /dev/xvd[b-z]* /dev/hd[b-z]*; do
        [ -b "$dev" ] || continue
        if try_mount "$dev"; then found=$dev; return 0; fi
    done
    return 1
}}

mkdir -p "$MNT"
found=
if ! find_io && command -v udevadm >/dev/null 2>&1 && [ -d /run/udev ]; then
    # udev may still be adding disks (a busy or slow machine): let its queue drain, look again
    udevadm settle --timeout=60 2>/dev/null
    find_io
fi
[ -n "$found" ] || exit 0

say() {{  # on stdout (the journal / console) and on the serial port, where the host watches
    echo "$1"
    if [ -c /dev/ttyS0 ]; then echo "$1" > /dev/ttyS0 2>/dev/null; fi
}}
say "pyti: running the job on $found ($MNT)"
say "{READY_MARKER}"
cd "$MNT"
if [ -f "$MNT/{RUN_SCRIPT}" ]; then
    sh "$MNT/{RUN_SCRIPT}"
else
    agent="$MNT/agent.py"
    [ -f "$agent" ] || agent=$AGENT
    python=$(command -v python3 || echo /usr/bin/python3)
    "$python" "$agent" "$MNT"
fi
status=$?
cd /
sync
umount "$MNT" 2>/dev/null
sync
say "{RUN_EXIT_MARKER} $status"
if [ -d /run/systemd/system ]; then
    systemctl --no-block poweroff
else
    poweroff
fi
exit 0
"""


def systemd_unit() -> str:
    """The systemd service that runs the hook once the system is up (``multi-user.target``).

    What a real systemd needs: the service starts after the local filesystems and udev's coldplug (so
    the IO disk's block device exists), with ``HOME`` and a UTF-8 locale set (a service gets neither
    by default, and pip and pytest want both), its output on the journal and the serial console, no
    start timeout (the job's own timeout is the host's), and it is skipped when the kernel command
    line says ``pyti.agent=0``. The hook powers the guest off itself when the job is over.
    """
    return f"""[Unit]
Description=pyti agent: run the job on pyti's IO disk, then power off
After=local-fs.target systemd-udev-trigger.service
ConditionPathExists={AGENT_DIR}/run-agent
ConditionKernelCommandLine=!{CMDLINE_AGENT}=0

[Service]
Type=oneshot
ExecStart={AGENT_DIR}/run-agent
WorkingDirectory=/
Environment=HOME=/root LANG=C.UTF-8
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def sysv_script() -> str:
    """The SysV init script (LSB header) that runs the hook last in runlevels 2-5."""
    return f"""#!/bin/sh
### BEGIN INIT INFO
# Provides:          {SERVICE}
# Required-Start:    $local_fs $remote_fs
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:
# Short-Description: pyti agent: run the job on pyti's IO disk, then power off
### END INIT INFO
case "$1" in
    start) {AGENT_DIR}/run-agent ;;
    stop|restart|force-reload|status) exit 0 ;;
    *) echo "Usage: $0 start" >&2; exit 3 ;;
esac
"""


@attrs.frozen
class GuestFile:
    """One file (``text`` with ``mode``) or symlink (``link``) that pyti installs at ``path`` in a guest."""

    path: str
    text: str | None = None
    mode: int = 0o644
    link: str | None = None


def hook_files(
    init: InitSystem, *, label: str = IO_LABEL, mount_point: str = IO_MOUNT, sysv_base: str = "/etc"
) -> tuple[GuestFile, ...]:
    """What ``pyti image prepare`` installs for ``init``: the agent, the hook, and the unit or init script.

    The same list goes into the system disks ``pyti image build --os`` makes. ``sysv_base`` is where a
    SysV guest keeps ``init.d`` and ``rcN.d`` (``/etc`` or ``/etc/rc.d``).
    """
    if init not in ("systemd", "sysv"):
        raise ValueError(f"init must be 'systemd' or 'sysv', got {init!r}")
    files = [
        GuestFile(f"{AGENT_DIR}/agent.py", Path(agent.__file__).read_text(encoding="utf-8")),
        GuestFile(f"{AGENT_DIR}/run-agent", hook_script(label=label, mount_point=mount_point), 0o755),
    ]
    if init == "systemd":
        unit = f"/etc/systemd/system/{SERVICE}.service"
        files.append(GuestFile(unit, systemd_unit()))
        files.append(GuestFile(f"/etc/systemd/system/multi-user.target.wants/{SERVICE}.service", link=unit))
    else:
        files.append(GuestFile(f"{sysv_base}/init.d/{SERVICE}", sysv_script(), 0o755))
        files += [
            GuestFile(f"{sysv_base}/rc{lv}.d/S99{SERVICE}", link=f"../init.d/{SERVICE}") for lv in _RUNLEVELS
        ]
    return tuple(files)


@attrs.frozen
class PreparedImage:
    """What :func:`prepare_image` did: the image, the init system it found, the guest paths it wrote."""

    image: Path
    init: InitSystem
    python: str | None
    files: tuple[str, ...]


class _Guest:
    """The few DiskOperations calls prepare_image needs, with errors naming the image."""

    def __init__(self, ops: DiskOperations, image: Path) -> None:
        self.ops = ops
        self.image = image
        self.written: list[str] = []

    def put(self, text: str, guest_path: str, mode: int, tmp: Path) -> None:
        host = tmp / PurePosixPath(guest_path).name
        host.write_text(text, encoding="utf-8")
        self.ops.mkdir(str(PurePosixPath(guest_path).parent), parents=True, exist_ok=True, owner=(0, 0))
        self.ops.put_file(host, guest_path, mode=mode, owner=(0, 0))
        self.written.append(guest_path)

    def link(self, target: str, guest_path: str, tmp: Path) -> None:
        """Create (or replace) the symlink ``guest_path`` -> ``target`` in the guest."""
        parent = str(PurePosixPath(guest_path).parent)
        holder = Path(tempfile.mkdtemp(dir=tmp))
        os.symlink(target, holder / PurePosixPath(guest_path).name)
        self.ops.mkdir(parent, parents=True, exist_ok=True, owner=(0, 0))
        self.ops.upload(holder, parent, owner=(0, 0))  # DiskOperations copies a folder's symlinks as links
        self.written.append(guest_path)

    def install(self, file: GuestFile, tmp: Path) -> None:
        if file.link is not None:
            self.link(file.link, file.path, tmp)
        else:
            self.put(file.text or "", file.path, file.mode, tmp)


def detect_init(exists: Callable[[str], bool]) -> InitSystem | None:
    """``"systemd"`` when the guest has systemd's binary, ``"sysv"`` with ``/etc/init.d``, else None."""
    if any(exists(p) for p in _SYSTEMD_BINARIES):
        return "systemd"
    if exists("/etc/init.d") or exists("/etc/rc.d/init.d"):
        return "sysv"
    return None


def prepare_image(
    image: str | os.PathLike[str],
    *,
    partition: int | None = None,
    init: InitSystem | None = None,
    label: str = IO_LABEL,
    mount_point: str = IO_MOUNT,
    require_python: bool = True,
) -> PreparedImage:
    """Install pyti's agent and boot hook into the disk image ``image`` without booting it.

    ``partition`` picks the root filesystem's partition (default: the largest one diskhandler can
    open). ``init`` forces ``"systemd"`` or ``"sysv"``; by default systemd is used when the guest has
    ``/lib/systemd/systemd`` or ``/usr/lib/systemd/systemd``, else SysV when it has ``/etc/init.d``.
    Running it again updates the files in place.

    Raises :class:`ImagePrepareError` when the image has no init system pyti knows, or no ``python3``
    (``require_python=False`` skips that check, for a Python you install later), and diskhandler's
    errors (``FileNotFoundError``, ``ImageInUseError`` while a VM runs on it, ...) as they are.
    """
    path = Path(image)
    hook_script(label=label, mount_point=mount_point)  # refuses bad words before the image is opened
    if init is not None and init not in ("systemd", "sysv"):
        raise ValueError(f"init must be 'systemd' or 'sysv', got {init!r}")
    with DiskOperations(path, partition=partition) as ops, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if not ops.exists("/etc") or not (ops.exists("/bin") or ops.exists("/usr/bin")):
            raise ImagePrepareError(
                path, "the filesystem has no /etc and /bin: not a Linux root filesystem (pick --partition)"
            )
        chosen = init or detect_init(ops.exists)
        if chosen is None:
            raise ImagePrepareError(
                path,
                "found neither systemd (/lib/systemd/systemd, /usr/lib/systemd/systemd) nor SysV init "
                "(/etc/init.d); pass init='systemd' or 'sysv' to choose",
            )
        python = next((p for p in _PYTHONS if ops.exists(p)), None)
        if python is None and require_python:
            raise ImagePrepareError(
                path,
                f"no python3 in the guest ({', '.join(_PYTHONS)}): the agent needs Python 3.8 or newer; "
                "install it in the image first",
            )
        base = "/etc" if ops.exists("/etc/init.d") or not ops.exists("/etc/rc.d") else "/etc/rc.d"
        guest = _Guest(ops, path)
        for file in hook_files(chosen, label=label, mount_point=mount_point, sysv_base=base):
            guest.install(file, tmp)
        return PreparedImage(image=path, init=chosen, python=python, files=tuple(guest.written))


@attrs.frozen
class ImageInfo:
    """What :func:`inspect_image` read from a disk image's root filesystem, without booting it.

    ``hook`` says which of pyti's boot hooks is installed (``None``: none, ``pyti image prepare`` it);
    ``python_version`` is the ``(major, minor)`` that ``python3`` runs and ``glibc`` the C library's
    version, which decide the wheels a run downloads; ``os_release`` holds ``/etc/os-release``.
    """

    image: Path
    init: InitSystem | None
    hook: InitSystem | None
    python: str | None
    python_version: tuple[int, int] | None
    glibc: tuple[int, int] | None
    os_release: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def prepared(self) -> bool:
        """pyti's agent and a boot hook that runs it are installed."""
        return self.hook is not None


def inspect_image(image: str | os.PathLike[str], *, partition: int | None = None) -> ImageInfo:
    """Read (never write) what pyti needs to know about a guest image before booting it.

    ``partition`` picks the root filesystem's partition as in :func:`prepare_image`. The image is not
    trusted: files it holds are size-checked before they are read, and nothing in it is run. Raises
    :class:`ImagePrepareError` when the filesystem is not a Linux root filesystem, and diskhandler's
    errors (``FileNotFoundError``, an unreadable image, ...) as they are.
    """
    path = Path(image)
    with (
        DiskOperations(path, readonly=True, partition=partition) as ops,
        tempfile.TemporaryDirectory() as tmp,
    ):
        if not ops.exists("/etc") or not (ops.exists("/bin") or ops.exists("/usr/bin")):
            raise ImagePrepareError(
                path, "the filesystem has no /etc and /bin: not a Linux root filesystem (pick a partition)"
            )
        init = detect_init(ops.exists)
        hook: InitSystem | None = None
        if ops.exists(f"{AGENT_DIR}/run-agent") and ops.exists(f"{AGENT_DIR}/agent.py"):
            if ops.exists(f"/etc/systemd/system/multi-user.target.wants/{SERVICE}.service"):
                hook = "systemd"
            elif any(
                ops.exists(f"{b}/rc{lv}.d/S99{SERVICE}") for b in ("/etc", "/etc/rc.d") for lv in _RUNLEVELS
            ):
                hook = "sysv"
        python = next((p for p in _PYTHONS if ops.exists(p)), None)
        return ImageInfo(
            image=path,
            init=init,
            hook=hook,
            python=python,
            python_version=_python_version(ops, python) if python else None,
            glibc=_glibc_version(ops, Path(tmp)),
            os_release=_os_release(ops, Path(tmp)),
        )


def _python_version(ops: DiskOperations, python: str) -> tuple[int, int] | None:
    """The ``python3.N`` beside ``python`` that it is (the same file once links are followed)."""
    folder = str(PurePosixPath(python).parent)
    try:
        target = ops.stat(python)
        names = ops.listdir(folder)
    except OSError:
        return None
    for name in names:
        match = _PYTHON_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            st = ops.stat(f"{folder}/{name}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return (3, int(match.group(1)))
    return None


def _small_file(ops: DiskOperations, guest: str, tmp: Path, limit: int) -> bytes | None:
    try:
        st = ops.stat(guest)
    except OSError:
        return None
    if not 0 < st.st_size <= limit:
        return None
    out = tmp / PurePosixPath(guest).name
    try:
        ops.get_file(guest, out)
        return out.read_bytes()[:limit]
    except OSError:
        return None
    finally:
        out.unlink(missing_ok=True)


def _glibc_version(ops: DiskOperations, tmp: Path) -> tuple[int, int] | None:
    """glibc's version from its banner (``... release version 2.36.``), else its newest symbol version."""
    for guest in _LIBCS:
        data = _small_file(ops, guest, tmp, _MAX_LIBC)
        if data is None:
            continue
        banner = _GLIBC_BANNER.search(data)
        if banner is not None:
            return (int(banner.group(1)), int(banner.group(2)))
        versions = [(int(a), int(b)) for a, b in _GLIBC_SYMBOL.findall(data)]
        if versions:
            return max(versions)
    return None


def _os_release(ops: DiskOperations, tmp: Path) -> dict[str, str]:
    for guest in ("/etc/os-release", "/usr/lib/os-release"):
        data = _small_file(ops, guest, tmp, _MAX_OS_RELEASE)
        if data is None:
            continue
        out = {}
        for line in data.decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip().isidentifier():
                out[key.strip()] = value.strip().strip("\"'")
        return out
    return {}
