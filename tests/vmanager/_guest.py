"""Helpers for the tests that boot the tiny Linux guest: disks, a live ISO, a shell on the console."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

from vmanager import VirtualMachine

READY = "PYTI-GUEST-READY"
BOOT_TIMEOUT = 120.0
_counter = itertools.count(1)

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")  # Debian package isolinux
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")  # Debian package syslinux-common


def make_ext4(path: Path, fmt: str, files: dict[str, bytes] | None = None, size: str = "32M") -> Path:
    """An ext4 image in ``fmt``, optionally holding ``files`` (name -> content)."""
    raw = path.with_suffix(".raw-src")
    src = path.parent / f"{path.name}-root"
    src.mkdir()
    for name, data in (files or {}).items():
        (src / name).write_bytes(data)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw), size], check=True)
    if fmt == "raw":
        raw.rename(path)
    else:
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()
    return path


def read_guest_file(image: Path, name: str, tmp: Path) -> bytes | None:
    """A file from an ext4 image of any format (backing chain included), read with debugfs."""
    raw = tmp / "check.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    try:
        listing = subprocess.run(
            ["debugfs", "-R", "ls -l /", str(raw)], capture_output=True, text=True, check=True
        ).stdout
        if f" {name}\n" not in listing and not listing.rstrip().endswith(f" {name}"):
            return None
        return subprocess.run(
            ["debugfs", "-R", f"cat /{name}", str(raw)], capture_output=True, check=True
        ).stdout
    finally:
        raw.unlink()


def sh(vm: VirtualMachine, command: str, timeout: float = 30.0) -> str:
    """Run a shell command on the guest's serial console; returns its output."""
    n = next(_counter)
    # The markers are computed by the guest's shell, so the echo of the typed line never matches.
    vm.console_write(f"echo BEGIN-$(({n} * 7)); {command}; echo END-$(({n} * 7))\n")
    match = vm.console_expect(re.compile(rf"BEGIN-{n * 7}\r?\n(.*?)END-{n * 7}\r?\n", re.DOTALL), timeout)
    return match.group(1).replace("\r\n", "\n")


def live_iso_tools() -> str | None:
    """Why a live ISO cannot be built here, or None when it can."""
    if not ISOLINUX_BIN.exists() or not LDLINUX_C32.exists():
        return "isolinux and syslinux-common are not installed"
    if shutil.which("genisoimage") is None:
        return "genisoimage is not installed"
    return None


def build_live_iso(kernel: Path, initrd: Path, cmdline: str, iso: Path) -> Path:
    """A BIOS-bootable live CD of a kernel and initramfs: isolinux from Debian, written by genisoimage.

    SeaBIOS boots the CD's El Torito image (isolinux.bin), which loads the kernel and initramfs.
    """
    tree = iso.with_suffix(".tree")
    boot = tree / "isolinux"
    boot.mkdir(parents=True)
    shutil.copy(ISOLINUX_BIN, boot / "isolinux.bin")
    shutil.copy(LDLINUX_C32, boot / "ldlinux.c32")
    shutil.copy(kernel, boot / "vmlinuz")
    shutil.copy(initrd, boot / "initrd.img")
    (boot / "isolinux.cfg").write_text(
        f"SERIAL 0 115200\nDEFAULT live\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL live\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img {cmdline}\n"
    )
    eltorito = ["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot"]
    eltorito += ["-boot-load-size", "4", "-boot-info-table"]
    cmd = ["genisoimage", "-quiet", "-o", str(iso), *eltorito, "-R", "-J", "-V", "PYTI_LIVE", str(tree)]
    subprocess.run(cmd, check=True)
    shutil.rmtree(tree)
    return iso
