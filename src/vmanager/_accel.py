"""Decide between KVM and TCG by trying KVM, never by the mere presence of ``/dev/kvm``.

The probe boots a 512-byte boot sector under ``qemu-system-x86_64`` with each accelerator. The sector
enables interrupts, waits for three BIOS timer ticks and exits QEMU through the ``isa-debug-exit``
device (exit status 85). KVM counts as usable when its run succeeds and is not much slower than TCG's:
under nested virtualisation KVM can open, run firmware very slowly and then hang real kernels, and a KVM
that runs firmware slower than the emulator is not worth using. The answer is cached per process and in
``<cache dir>/pyti/accel.json`` keyed by kernel release and the QEMU binary's identity.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

__all__ = ["Accelerator", "detect_accelerator"]

Accelerator = Literal["kvm", "tcg"]

# sti; xor ax,ax; mov ds,ax; mov bx,[0x46c]; l: mov ax,[0x46c]; sub ax,bx; cmp ax,3; jb l;
# mov al,0x2a; out 0xf4,al; hlt; jmp $-1
_BOOT_CODE = bytes.fromhex("FB31C08ED88B1E6C04A16C0429D883F80372F6B02AE6F4F4EBFD")
_BOOT_SECTOR = _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b"\x55\xaa"
_EXIT_OK = (0x2A << 1) | 1
_KVM_TIMEOUT = 4.0
_TCG_TIMEOUT = 20.0
_MIN_BUDGET = 1.0
_SLOWDOWN = 3.0


def _qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def _run_probe(qemu: str, image: Path, accel: Accelerator, timeout: float) -> float | None:
    """Seconds the probe took, or ``None`` if it failed or ran out of time."""
    cmd = [
        qemu, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults", "-no-user-config",
        "-display", "none", "-drive", f"file={image},format=raw,if=ide",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode != _EXIT_OK:
        return None
    return time.monotonic() - start


def probe_accelerator(qemu: str) -> Accelerator:
    """Run the probe now (no cache): ``"kvm"`` when KVM really works here, else ``"tcg"``."""
    if not os.path.exists("/dev/kvm"):
        return "tcg"
    with tempfile.TemporaryDirectory(prefix="vmanager-probe-") as tmp:
        image = Path(tmp) / "boot.img"
        image.write_bytes(_BOOT_SECTOR)
        tcg = _run_probe(qemu, image, "tcg", _TCG_TIMEOUT)
        budget = max(_MIN_BUDGET, _SLOWDOWN * tcg) if tcg is not None else _KVM_TIMEOUT
        kvm = _run_probe(qemu, image, "kvm", min(budget, _KVM_TIMEOUT))
    return "kvm" if kvm is not None and kvm <= budget else "tcg"


def _cache_key(qemu: str) -> str:
    st = os.stat(qemu)
    return f"{os.uname().release}|{qemu}|{st.st_size}|{st.st_mtime_ns}|{os.path.exists('/dev/kvm')}"


@functools.cache
def detect_accelerator(cache_file: Path | None = None) -> Accelerator:
    """``"kvm"`` if KVM demonstrably works on this machine, ``"tcg"`` otherwise (cached)."""
    qemu = _qemu_binary()
    if qemu is None:
        return "tcg"
    key = _cache_key(qemu)
    if cache_file is not None:
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key and cached.get("accel") in {"kvm", "tcg"}:
                return "kvm" if cached["accel"] == "kvm" else "tcg"
        except (OSError, ValueError, AttributeError):
            pass
    accel = probe_accelerator(qemu)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps({"key": key, "accel": accel}))
        except OSError:
            pass
    return accel
