"""Real system disks: a Debian system, made from Debian's packages, that boots by itself through the BIOS.

::

    from pyti_core.guest.system import build_system_disk, write_system_disk

    build = build_system_disk("debian-12")                # cached; minutes the first time
    write_system_disk(build, "debian.vdi", "vdi")        # vdi, qcow2, vmdk, vhd or raw

    # pyti run attrs==23.2.0 --guest debian.vdi

What is on the disk (one MBR partition, ext4, label ``pyti-root``):

* Debian's ``minbase`` variant (the packages of priority *required*), made by ``mmdebstrap`` with its own
  private apt configuration: the host's ``sources.list``, package lists and caches are never read or
  written; the suite's ``Release`` files are checked against ``debian-archive-keyring``;
* ``systemd-sysv`` (systemd as PID 1) and ``udev``; the distribution's ``python3``;
* the kernel of ``linux-image-cloud-amd64`` with an ``initramfs-tools`` initramfs that carries the
  virtio, SCSI and SATA disk drivers; ``virtio_console`` is loaded at boot, so a virtio-serial port
  shows up as ``/dev/virtio-ports/NAME``;
* GRUB (i386-pc, from the host's ``grub-pc-bin``): ``boot.img`` in the MBR, ``core.img`` in the gap
  before the partition, ``/boot/grub/grub.cfg`` that boots ``/vmlinuz`` with the console on ``ttyS0``
  (GRUB's own messages too), and powers the machine off if it cannot;
* pyti's agent and boot hook, exactly what ``pyti image prepare`` installs
  (:func:`pyti_core.image.hook_files`);
* no documentation, man pages or locales (dpkg ``path-exclude``), no apt lists; the units a throwaway
  test VM has no use for are masked (:data:`MASKED_UNITS`).

**What needs root.** Nothing needs a loop device or a mount of the image: the filesystem is written
by ``mke2fs -d`` from a directory tree into a flat file, GRUB's boot code is written into the disk
image by pyti, and diskhandler writes the requested format. ``mmdebstrap`` runs in its ``unshare``
mode: as root it only unshares a mount namespace; as an ordinary user it needs user namespaces and an
entry for the user in ``/etc/subuid`` and ``/etc/subgid`` (``usermod --add-subuids``), which Debian's
``adduser`` creates.

Builds are cached under ``<pyti cache>/system`` (``$XDG_CACHE_HOME/pyti/system`` or
``~/.cache/pyti/system``) as a sparse raw disk, keyed by everything the build is made of: the suite and
its mirrors, the package list, the files pyti adds (agent, hook, grub.cfg, ...), the disk size and the
versions of the host's mmdebstrap, GRUB and e2fsprogs. The key does not cover the archive's state: a
cached build is reused until ``rebuild=True`` asks for a fresh one (to pick up security updates).
A build is made in a temporary directory and renamed into place under a lock per key, so concurrent
builders wait for one another and nobody sees half a build.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Final

import attrs

from pyti_core.errors import GuestImageError
from pyti_core.guest._locking import locked
from pyti_core.image import IO_LABEL, hook_files

__all__ = [
    "DEFAULT_SIZE",
    "FORMATS",
    "MASKED_GENERATORS",
    "MASKED_UNITS",
    "PACKAGES",
    "RELEASES",
    "DebianRelease",
    "SystemDisk",
    "build_system_disk",
    "default_cache_dir",
    "write_system_disk",
]


@attrs.frozen
class DebianRelease:
    """A Debian release a system disk can be made of: its suite, and the Python and glibc it ships."""

    name: str
    suite: str
    version: str
    python: tuple[int, int]
    glibc: tuple[int, int]
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"

    def sources(self, keyring: str) -> tuple[str, ...]:
        """The one-line apt sources of the build: the suite, its updates and its security updates."""
        signed = f"[signed-by={keyring}]"
        return (
            f"deb {signed} {self.mirror} {self.suite} main",
            f"deb {signed} {self.mirror} {self.suite}-updates main",
            f"deb {signed} {self.security_mirror} {self.suite}-security main",
        )


RELEASES: Final[Mapping[str, DebianRelease]] = {
    "debian-12": DebianRelease("debian-12", "bookworm", "12", (3, 11), (2, 36)),
    "debian-13": DebianRelease("debian-13", "trixie", "13", (3, 13), (2, 41)),
}
#: The formats :func:`write_system_disk` writes (through diskhandler).
FORMATS: Final = ("vdi", "qcow2", "vmdk", "vhd", "raw")
#: The disk's virtual size; the image files hold only what is used (about 400 MB).
DEFAULT_SIZE: Final = 2 << 30
#: Installed on top of ``minbase`` (with what they depend on, no recommends).
PACKAGES: Final = ("systemd-sysv", "udev", "python3", "linux-image-cloud-amd64", "initramfs-tools")
#: Loaded by the initramfs, so the root disk is found on any of QEMU's, VirtualBox's or VMware's buses.
INITRAMFS_MODULES: Final = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "ata_piix", "ext4")
#: Loaded at boot by systemd-modules-load: the virtio-serial ports (``/dev/virtio-ports/``).
BOOT_MODULES: Final = ("virtio_console",)
#: Units a throwaway test VM has no use for; masked to boot faster under emulation.
MASKED_UNITS: Final = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "getty@tty1.service",
    "getty-static.service",
    "dev-hugepages.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    # these run whenever /usr is newer than /etc/.updated, i.e. at every boot of an image built once:
    # rebuilding udev's hwdb and the journal catalog and running ldconfig cost seconds under emulation
    "ldconfig.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "modprobe@configfs.service",
    "modprobe@drm.service",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service",
    "systemd-pstore.service",
    "systemd-random-seed.service",
    "systemd-journal-flush.service",
    "systemd-sysusers.service",
    "systemd-machine-id-commit.service",
    "kmod-static-nodes.service",
)
#: systemd generators masked for the same reason: nothing on these disks for them to find.
MASKED_GENERATORS: Final = (
    "systemd-gpt-auto-generator",
    "systemd-cryptsetup-generator",
    "systemd-veritysetup-generator",
    "systemd-integritysetup-generator",
    "systemd-bless-boot-generator",
    "systemd-hibernate-resume-generator",
    "systemd-system-update-generator",
    "systemd-run-generator",
)
#: dpkg leaves these out of every package (the copyright files stay).
DPKG_EXCLUDES: Final = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
#: Built into GRUB's core.img (with what they need), so /boot/grub holds only grub.cfg.
GRUB_MODULES: Final = (
    "biosdisk", "part_msdos", "ext2", "normal", "linux", "serial", "terminal", "echo", "halt", "test",
)  # fmt: skip
KEYRING: Final = "/usr/share/keyrings/debian-archive-keyring.gpg"
ROOT_LABEL: Final = "pyti-root"
#: ``no_timer_check``: under a busy emulator the kernel's early check of the IO-APIC timer can fail and
#: stall the boot ("MP-BIOS bug: 8254 timer not connected"); cloud images skip it for the same reason.
KERNEL_CMDLINE: Final = "ro console=ttyS0,115200n8 panic=-1 quiet no_timer_check"

_BUILD_FORMAT: Final = 1  # bump when the builder's output changes for the same inputs
_SECTOR: Final = 512
_PARTITION_START: Final = 1 << 20  # the partition starts at 1 MiB; GRUB's core.img lives before it
_GRUB_DIR: Final = Path("/usr/lib/grub/i386-pc")
# boot.img (grub-core/boot/i386/pc/boot.S): the 8-byte LBA of core.img's first sector, and the jump
# that trusts only 0x80-0x8f as the BIOS boot drive (grub-bios-setup replaces it with two NOPs for
# hard disks, as done here)
_BOOT_KERNEL_SECTOR: Final = 0x5C
_BOOT_DRIVE_CHECK: Final = 0x66
_MBR_CODE: Final = 440
_MMDEBSTRAP_TIMEOUT: Final = 3600.0
_CHUNK: Final = 1 << 20

ProgressCallback = Callable[[str], None]


def _no_progress(message: str) -> None:
    """The default progress callback: does nothing."""


@attrs.frozen
class SystemDisk:
    """A built system disk in the cache: a sparse raw image (``path``) and what is in it.

    ``packages`` maps every installed Debian package to its version; ``kernel_release`` is the kernel's
    ``uname -r``; ``root_uuid`` the root filesystem's UUID (on the kernel command line).
    """

    path: Path
    release: DebianRelease
    size: int
    kernel_release: str
    root_uuid: str
    packages: Mapping[str, str] = attrs.field(factory=dict)
    build_seconds: float = 0.0

    @property
    def python_version(self) -> str:
        """The version of the distribution's ``python3`` package (e.g. ``3.11.2-1+b1``)."""
        return self.packages.get("python3", "")


# -- the build's inputs ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyti/system``, or ``~/.cache/pyti/system`` (read when called, not at import)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyti" / "system"


def _grub_cfg(root_uuid: str, release: DebianRelease) -> str:
    return f"""# Written by pyti: boot Debian {release.version} with the console on the first serial port.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
echo "pyti: GRUB is loading Linux"
linux /vmlinuz root=UUID={root_uuid} {KERNEL_CMDLINE}
initrd /initrd.img
boot
echo "pyti: GRUB could not boot /vmlinuz and /initrd.img from this disk; powering off"
halt
"""


_INITRAMFS_HOOK: Final = """#!/bin/sh
# Written by pyti: the disk drivers a virtual machine's root disk may need, loaded early.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for module in %s; do force_load "$module"; done
"""

# Runs in mmdebstrap's namespace (as root there) with the chroot as $1, before mmdebstrap's own cleanup:
# puts pyti's files in, does that cleanup itself, then writes the root filesystem with mke2fs -d from a
# non-recursive bind mount of the chroot (which hides the /dev, /proc and /sys mounted inside it).
_CUSTOMIZE: Final = """#!/bin/sh
set -eu
root=$1
work=$2
size_kib=$3
root_uuid=$4
cp -R --preserve=mode,timestamps,links --no-dereference "$work/files/." "$root/"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
rm -f "$root/var/lib/dbus/machine-id" "$root/etc/ssh/"ssh_host_*
: > "$root/etc/machine-id"
ls "$root/boot" | sed -n 's/^vmlinuz-//p' > "$work/kernel-release"
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}\\t${Version}\\n' > "$work/packages.tsv"
mkdir -p "$work/view"
mount --bind "$root" "$work/view"
status=0
mke2fs -q -F -t ext4 -L %(label)s -U "$root_uuid" -O ^metadata_csum_seed,^orphan_file \\
    -E lazy_itable_init=0,lazy_journal_init=0 -d "$work/view" "$work/root.ext4" "${size_kib}k" || status=$?
umount "$work/view"
exit $status
"""


def _files(release: DebianRelease, root_uuid: str) -> dict[str, tuple[bytes, int] | str]:
    """The files pyti puts into the tree: guest path -> (content, mode), or -> a symlink's target."""
    files: dict[str, tuple[bytes, int] | str] = {
        # no device timeout: under a busy emulator udev may take longer than systemd's 90 s default;
        # no fsck at boot: every boot starts from the same clean filesystem (a throwaway overlay)
        "/etc/fstab": (
            f"UUID={root_uuid} / ext4 errors=remount-ro,x-systemd.device-timeout=0 0 0\n".encode(),
            0o644,
        ),
        "/etc/hostname": (f"pyti-{release.name.replace('-', '')}\n".encode(), 0o644),
        "/etc/hosts": (
            f"127.0.0.1\tlocalhost\n127.0.1.1\tpyti-{release.name.replace('-', '')}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n".encode(),
            0o644,
        ),
        "/boot/grub/grub.cfg": (_grub_cfg(root_uuid, release).encode(), 0o644),
        "/etc/modules-load.d/pyti.conf": (("\n".join(BOOT_MODULES) + "\n").encode(), 0o644),
        "/etc/pyti-system.json": (
            json.dumps({"os": release.name, "suite": release.suite, "builder": _BUILD_FORMAT}).encode(),
            0o644,
        ),
    }
    files["/etc/systemd/system/default.target"] = "/lib/systemd/system/multi-user.target"
    # the journal stays in memory: writing it to the throwaway disk costs seconds and keeps nothing
    files["/etc/systemd/journald.conf.d/pyti.conf"] = (b"[Journal]\nStorage=volatile\n", 0o644)
    for generator in MASKED_GENERATORS:
        files[f"/etc/systemd/system-generators/{generator}"] = "/dev/null"
    for unit in MASKED_UNITS:
        files[f"/etc/systemd/system/{unit}"] = "/dev/null"
    for file in hook_files("systemd", label=IO_LABEL):
        files[file.path] = file.link if file.link is not None else ((file.text or "").encode(), file.mode)
    return files


def _setup_files() -> dict[str, tuple[bytes, int] | str]:
    """Files in the tree before any package is installed: the initramfs configuration."""
    return {
        "/etc/initramfs-tools/conf.d/pyti.conf": (b"MODULES=list\nCOMPRESS=zstd\n", 0o644),
        "/etc/initramfs-tools/hooks/pyti": (
            (_INITRAMFS_HOOK % " ".join(INITRAMFS_MODULES)).encode(),
            0o755,
        ),
    }


def _stage(folder: Path, files: Mapping[str, tuple[bytes, int] | str]) -> None:
    for guest_path, what in sorted(files.items()):
        rel = PurePosixPath(guest_path).relative_to("/")
        host = folder.joinpath(*rel.parts)
        host.parent.mkdir(parents=True, exist_ok=True)
        for parent in [host.parent, *host.parent.parents]:
            if parent == folder or folder not in parent.parents:
                break
            parent.chmod(0o755)
        if isinstance(what, str):
            host.symlink_to(what)
        else:
            host.write_bytes(what[0])
            host.chmod(what[1])


def _tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        raise GuestImageError(f"building a system disk needs {name}: install the Debian package {package}")
    return found


def _tool_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except OSError as exc:
        raise GuestImageError(f"cannot run {argv[0]}: {exc}") from exc
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else ""


def _digest(files: Mapping[str, tuple[bytes, int] | str]) -> dict[str, str]:
    out = {}
    for path, what in sorted(files.items()):
        if isinstance(what, str):
            out[path] = "-> " + what
        else:
            out[path] = f"{what[1]:o} {hashlib.sha256(what[0]).hexdigest()}"
    return out


def _cache_key(release: DebianRelease, size: int, tools: Mapping[str, str]) -> str:
    """Everything the build is made of, apart from the archive's current package versions."""
    placeholder = "00000000-0000-4000-8000-000000000000"  # the UUID is derived from this key
    material = {
        "format": _BUILD_FORMAT,
        "release": attrs.asdict(release),
        "sources": list(release.sources(KEYRING)),
        "packages": list(PACKAGES),
        "dpkg": list(DPKG_EXCLUDES),
        "initramfs": list(INITRAMFS_MODULES),
        "grub_modules": list(GRUB_MODULES),
        "files": _digest(_files(release, placeholder)),
        "setup": _digest(_setup_files()),
        "customize": hashlib.sha256(_CUSTOMIZE.encode()).hexdigest(),
        "size": size,
        "tools": dict(tools),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


# -- the build --------------------------------------------------------------------------------------------


def _load(build_dir: Path, release: DebianRelease) -> SystemDisk | None:
    try:
        info = json.loads((build_dir / "build.json").read_text())
    except (OSError, ValueError):
        return None
    disk = build_dir / "disk.raw"
    if not isinstance(info, dict) or not disk.is_file():
        return None
    try:
        return SystemDisk(
            path=disk,
            release=release,
            size=int(info["size"]),
            kernel_release=str(info["kernel_release"]),
            root_uuid=str(info["root_uuid"]),
            packages={str(k): str(v) for k, v in info["packages"].items()},
            build_seconds=float(info.get("build_seconds", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _release(name: str) -> DebianRelease:
    try:
        return RELEASES[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; choose one of {', '.join(RELEASES)}") from None


def build_system_disk(
    os_name: str = "debian-12",
    *,
    cache_dir: Path | None = None,
    size: int = DEFAULT_SIZE,
    rebuild: bool = False,
    progress: ProgressCallback | None = None,
) -> SystemDisk:
    """Build (or find in the cache) the system disk ``os_name`` (see :data:`RELEASES`); see the module doc.

    ``size`` is the disk's virtual size in bytes (at least 1 GiB). ``rebuild=True`` makes a fresh build
    even when one is cached (the new one replaces it). Raises :class:`ValueError` for an unknown
    ``os_name`` or a bad size, and :class:`GuestImageError` when a tool is missing or fails (the
    message ends with its output), e.g. when Debian's archive cannot be reached.
    """
    release = _release(os_name)
    if size < (1 << 30) or size % _SECTOR:
        raise ValueError(f"size must be at least 1 GiB and a multiple of 512 bytes, got {size}")
    report = progress or _no_progress
    tools = {
        "mmdebstrap": _tool_version([_tool("mmdebstrap", "mmdebstrap"), "--version"]),
        "grub": _tool_version([_tool("grub-mkimage", "grub-pc-bin (and grub-common)"), "--version"]),
        "mke2fs": _tool_version([_tool("mke2fs", "e2fsprogs"), "-V"]),
    }
    if not (_GRUB_DIR / "boot.img").is_file() or not (_GRUB_DIR / "moddep.lst").is_file():
        raise GuestImageError(
            f"building a system disk needs GRUB's BIOS images in {_GRUB_DIR}: install grub-pc-bin"
        )
    if not os.path.isfile(KEYRING):
        raise GuestImageError(f"{KEYRING} is missing: install the Debian package debian-archive-keyring")
    key = _cache_key(release, size, tools)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    build_dir = cache / f"{release.name}-{key}"
    if not rebuild and (cached := _load(build_dir, release)) is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / f".lock-{key}"):
        if not rebuild and (cached := _load(build_dir, release)) is not None:
            return cached  # another process built it while this one waited
        for stale in cache.glob(f".build-{key}-*"):  # left by a builder that died
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{key}-"))
        try:
            out = _build(work, release, size, key, report)
            old = cache / f".old-{key}-{uuid.uuid4().hex[:8]}"
            if build_dir.exists():
                os.replace(build_dir, old)
            os.replace(out, build_dir)
            _fsync_dir(cache)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    built = _load(build_dir, release)
    if built is None:
        raise GuestImageError(f"{build_dir}: the build finished but its files are not readable")
    return built


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(work: Path, release: DebianRelease, size: int, key: str, report: ProgressCallback) -> Path:
    """Make ``work/out/{disk.raw,build.json}``."""
    started = time.monotonic()
    root_uuid = str(uuid.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16], version=4))
    # mmdebstrap's namespace root must read the staged files and, run by an ordinary user, is another
    # (subordinate) uid than the user: it writes the filesystem and lists here, so the folder is open
    os.chmod(work, 0o755 if os.geteuid() == 0 else 0o777)
    _stage(work / "files", _files(release, root_uuid))
    _stage(work / "setup", _setup_files())
    (work / "customize.sh").write_text(_CUSTOMIZE % {"label": ROOT_LABEL})
    (work / "tmp").mkdir()
    fs_size = size - _PARTITION_START
    argv = [
        "mmdebstrap",
        "--mode=unshare",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES),
        f'--setup-hook=cp -R --preserve=mode,links --no-dereference "{work}/setup/." "$1/"',
        f'--customize-hook=sh "{work}/customize.sh" "$1" "{work}" {fs_size // 1024} {root_uuid}',
        release.suite,
        "/dev/null",
        *release.sources(KEYRING),
    ]
    report(f"mmdebstrap: Debian {release.version} ({release.suite}) minbase + {', '.join(PACKAGES)}")
    log = work / "mmdebstrap.log"
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "LC_ALL": "C.UTF-8"}
    try:
        with open(log, "wb") as fh:
            proc = subprocess.run(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False, timeout=_MMDEBSTRAP_TIMEOUT
            )
    except subprocess.TimeoutExpired as exc:
        raise GuestImageError(
            f"mmdebstrap did not finish within {_MMDEBSTRAP_TIMEOUT:g} s", command=argv, output=_tail(log)
        ) from exc
    if proc.returncode != 0 or not (work / "root.ext4").is_file():
        raise GuestImageError(
            f"mmdebstrap failed (exit {proc.returncode}) building Debian {release.version} "
            f"from {release.mirror}",
            command=argv,
            output=_tail(log),
        )
    kernel_release = (work / "kernel-release").read_text().strip().splitlines()
    if len(kernel_release) != 1:
        raise GuestImageError(f"expected one kernel in /boot, found {kernel_release or 'none'}")
    packages = dict(
        line.split("\t", 1) for line in (work / "packages.tsv").read_text().splitlines() if "\t" in line
    )
    report("writing the disk: partition table, GRUB, root filesystem")
    core = _grub_core(work / "core.img")
    out = work / "out"
    out.mkdir()
    _assemble(out / "disk.raw", work / "root.ext4", core, size)
    info = {
        "os": release.name,
        "size": size,
        "kernel_release": kernel_release[0],
        "root_uuid": root_uuid,
        "packages": packages,
        "build_seconds": round(time.monotonic() - started, 1),
        "key": key,
    }
    (out / "build.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    for name in ("disk.raw", "build.json"):
        with open(out / name, "rb") as fh:
            os.fsync(fh.fileno())
    return out


def _tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _grub_core(path: Path) -> bytes:
    """GRUB's core.img for a BIOS disk whose first MBR partition holds /boot/grub on ext2/3/4."""
    argv = [
        "grub-mkimage", "-O", "i386-pc", "-d", str(_GRUB_DIR), "-o", str(path),
        "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise GuestImageError("grub-mkimage failed", command=argv, output=proc.stderr)
    core = path.read_bytes()
    if len(core) > _PARTITION_START - _SECTOR:
        raise GuestImageError(f"GRUB's core.img is {len(core)} bytes: it does not fit before the partition")
    return core


def _boot_sector(core: bytes) -> bytes:
    """GRUB's boot.img as ``grub-bios-setup`` patches it for core.img at LBA 1 of a hard disk."""
    boot = bytearray((_GRUB_DIR / "boot.img").read_bytes())
    if len(boot) != _SECTOR or boot[510:512] != b"\x55\xaa":
        raise GuestImageError(f"{_GRUB_DIR / 'boot.img'} is not a 512-byte boot sector")
    boot[_BOOT_KERNEL_SECTOR : _BOOT_KERNEL_SECTOR + 8] = (1).to_bytes(8, "little")
    boot[_BOOT_DRIVE_CHECK : _BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    # diskboot.img (core.img's first sector) ends with its blocklist: the rest of core.img from LBA 2
    start = int.from_bytes(core[_SECTOR - 12 : _SECTOR - 4], "little")
    count = int.from_bytes(core[_SECTOR - 4 : _SECTOR - 2], "little")
    if start != 2 or count != -(-len(core) // _SECTOR) - 1:
        raise GuestImageError(f"unexpected GRUB core.img blocklist (start {start}, {count} sectors)")
    return bytes(boot[:_MBR_CODE])


def _assemble(path: Path, root_fs: Path, core: bytes, size: int) -> None:
    """The raw disk: MBR (GRUB's boot code + one bootable Linux partition), core.img, the filesystem."""
    from diskhandler import PartitionSpec, create_image, create_partition_table  # noqa: PLC0415
    from diskhandler.create import copy_sparse  # noqa: PLC0415

    boot = _boot_sector(core)
    with create_image(path, size, "raw") as disk:
        (part,) = create_partition_table(
            disk, "mbr", [PartitionSpec(size=size - _PARTITION_START, type="linux", bootable=True)]
        )
        if part.start != _PARTITION_START:
            raise GuestImageError(f"the partition starts at {part.start}, not at {_PARTITION_START}")
        with part:
            copy_sparse(root_fs, part)
        disk.write_at(0, boot)  # the partition table (bytes 440-511) stays as written
        disk.write_at(_SECTOR, core)
        disk.flush()


# -- the output -----------------------------------------------------------------------------------------


def write_system_disk(
    build: SystemDisk, output: str | os.PathLike[str], format: str | None = None, *, overwrite: bool = False
) -> Path:
    """Write the cached system disk ``build`` to ``output`` as ``format`` (from the suffix when omitted).

    The image is written by diskhandler (only the used blocks: about 400 MB) into a temporary file beside
    ``output`` and renamed over it when complete. An existing ``output`` is refused unless
    ``overwrite``. Returns ``output`` as a :class:`~pathlib.Path`.
    """
    from diskhandler import create_image  # noqa: PLC0415
    from diskhandler.create import copy_sparse  # noqa: PLC0415

    out = Path(output)
    fmt = format or {".img": "raw", ".vhd": "vhd"}.get(out.suffix.lower()) or out.suffix.lower().lstrip(".")
    fmt = {"vpc": "vhd"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown disk format {fmt or out.name!r}; choose one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "the output exists (overwrite it with --force)", str(out))
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the output is a folder", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.pyti-"))
    try:
        staged = tmp / out.name  # the final name: a VMDK names its own extent
        with create_image(staged, build.size, fmt) as image:
            if image.size < build.size:
                raise GuestImageError(f"{fmt} image of {image.size} bytes is smaller than the disk")
            copy_sparse(build.path, image)  # data extents only, and in them only non-zero chunks
            image.flush()
        with open(staged, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staged, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
