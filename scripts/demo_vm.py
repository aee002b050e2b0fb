"""Boot a tiny Linux guest and walk it through start, snapshot, change, rollback and stop.

Runs on the default hypervisor URI (libvirt's QEMU driver embedded in this process: no daemon), with a
qcow2 system disk holding an empty ext4 file system. Each step is printed with the time it took.

    python scripts/demo_vm.py [--keep-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"{title} ...", end=" ", flush=True)
    start = time.monotonic()
    yield
    print(f"done in {time.monotonic() - start:.2f} s", flush=True)


def timed(title: str, fn: Callable[[], T]) -> T:
    with step(title):
        return fn()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep-dir", type=Path, help="put the disk and serial log here and keep them")
    parser.add_argument(
        "--uri", default=None, help="hypervisor URI (default: qemu:///embed in the user cache)"
    )
    parser.add_argument(
        "--format",
        default="qcow2",
        choices=["qcow2", "vdi", "vmdk", "vpc", "raw"],
        help="the system disk's format: qcow2 gets internal snapshots, the others external ones",
    )
    args = parser.parse_args(argv)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyti"
    cache.mkdir(parents=True, exist_ok=True)

    # libvirt's own log lines (e.g. "tainted: high-privileges") are records of the vmanager.libvirt
    # logger; nothing configures logging here, so they stay quiet.
    from pyti_core.guest.tinylinux import READY_MARKER, build_tiny_linux  # noqa: PLC0415
    from vmanager import (  # noqa: PLC0415
        Connection,
        DomainNotFoundError,
        RunState,
        VirtualMachine,
        VMConfig,
        default_uri,
        detect_accelerator,
    )

    total = time.monotonic()
    guest = timed("build (or reuse) the tiny Linux guest", build_tiny_linux)
    accel = timed("detect the accelerator", lambda: detect_accelerator(cache / "accel.json"))
    print(f"   accelerator: {accel}")

    workdir = args.keep_dir or Path(tempfile.mkdtemp(prefix="pyti-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / f"system.{args.format}"
    with step(f"create a 64 MiB {args.format} system disk with ext4"):
        raw = workdir / "system.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", str(raw), "64M"], check=True, capture_output=True)
        if args.format == "raw":
            raw.rename(disk)
        else:
            subprocess.run(["qemu-img", "convert", "-O", args.format, str(raw), str(disk)], check=True)
            raw.unlink()

    config = VMConfig(
        name="pyti-demo",
        memory=256,
        hd_location=disk,
        kernel=guest.kernel,
        initrd=guest.initrd,
        cmdline=guest.cmdline,
        serial_log=workdir / "serial.log",
        overlay_dir=workdir / "layers",  # external snapshots' overlays and saved memory
    )
    uri = args.uri or default_uri()
    print(f"   hypervisor: {uri}")
    conn = Connection(uri)
    try:
        VirtualMachine("pyti-demo", conn).undefine()  # left over from an interrupted run
        print("   removed a VM left over from an earlier run")
    except DomainNotFoundError:
        pass
    vm = timed("define the VM", lambda: VirtualMachine("pyti-demo", conn, config))
    counter = iter(range(1, 1000))

    def sh(command: str) -> str:
        # The guest's shell computes the markers, so the echo of the typed line never matches them.
        n = next(counter)
        vm.console_write(f"echo BEGIN-$(({n} * 7)); {command}; echo END-$(({n} * 7))\n")
        match = vm.console_expect(rf"BEGIN-{n * 7}\r?\n([\s\S]*?)END-{n * 7}\r?\n", timeout=60)
        return match.group(1).replace("\r\n", "\n").strip()

    try:
        with vm:
            timed("start", vm.start)
            timed(
                f"boot to {READY_MARKER!r} on the serial console",
                lambda: vm.wait_for_output(READY_MARKER, 120),
            )
            print(f"   state: {vm.state.name}")
            timed("snapshot 'clean' of the running guest", lambda: vm.snapshot("clean", "freshly booted"))
            with step("change: write /mnt/disk/hello.txt through the serial console"):
                sh("echo 'hello from the guest' > /mnt/disk/hello.txt; sync")
            print(f"   guest: ls /mnt/disk -> {sh('ls /mnt/disk').split()}")
            timed("rollback to 'clean'", lambda: vm.rollback("clean"))
            print(f"   state after rollback: {vm.state.name}")
            listing = sh("ls /mnt/disk").split()
            print(f"   guest: ls /mnt/disk -> {listing}")
            if "hello.txt" in listing:
                print("FAILED: the file survived the rollback", file=sys.stderr)
                return 1
            print("   the file is gone: the disk is back to the snapshot")
            graceful = timed("stop (ACPI shutdown)", lambda: vm.shutdown(timeout=60))
            print(f"   state: {vm.state.name} ({'graceful' if graceful else 'forced'})")
            assert vm.state is RunState.SHUTOFF
    finally:
        timed("undefine the VM (and its snapshots)", vm.undefine)
        conn.close()
        if args.keep_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    kept = f"; disk and serial log kept in {workdir}" if args.keep_dir else ""
    print(f"total {time.monotonic() - total:.2f} s{kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
