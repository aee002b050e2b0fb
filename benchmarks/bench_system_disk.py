"""Figures of a Debian system disk: build time (cold and warm), size per format, boot and run under TCG.

1. ``build_system_disk`` into a fresh cache folder (cold: mmdebstrap, mke2fs, GRUB), then again (warm: a
   cache hit), and ``write_system_disk`` into every format: seconds and file sizes. Reference in the
   same run: ``qemu-img convert`` of the cached raw disk to the same format.
2. ``pyti run`` of the tiny project (``pytiny``: one dependency, one passing and one failing test) with
   ``--guest debian.vdi``, ``--runs`` times: every phase, and boot-to-records (the VM's start to the
   records read back). A command task prints ``systemd-analyze`` and ``systemd-analyze blame`` from
   inside the guest, so the time systemd itself needs is visible. Reference in the same run: the same
   project on the tiny Python guest (direct kernel boot).

    python benchmarks/bench_system_disk.py [--runs 1] [--os debian-12] [--skip-cold] [--skip-run]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers that make the project and repack pytest


def _build(os_name: str, cache: Path, skip_cold: bool) -> object:
    from pyti_core.guest.system import build_system_disk  # noqa: PLC0415

    if not skip_cold:
        started = time.monotonic()
        build_system_disk(os_name, cache_dir=cache)
        print(f"cold build ({os_name}): {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    build = build_system_disk(os_name, cache_dir=None if skip_cold else cache)
    print(f"warm build (cache hit): {time.monotonic() - started:.2f} s")
    return build


def _formats(build: object, folder: Path) -> Path:
    from pyti_core.guest.system import FORMATS, SystemDisk, write_system_disk  # noqa: PLC0415

    assert isinstance(build, SystemDisk)
    used = build.path.stat().st_blocks * 512
    print(f"disk: {build.size >> 20} MiB virtual, {used / 1e6:.0f} MB used; kernel {build.kernel_release}")
    print(f"{'format':7} {'pyti s':>7} {'qemu-img s':>10} {'ratio':>6} {'file MB':>8}")
    for fmt in FORMATS:
        out = folder / f"debian.{fmt}"
        started = time.monotonic()
        write_system_disk(build, out)
        ours = time.monotonic() - started
        ref_out = folder / f"ref.{fmt}"
        started = time.monotonic()
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                {"vhd": "vpc"}.get(fmt, fmt),
                str(build.path),
                str(ref_out),
            ],
            check=True,
        )
        ref = time.monotonic() - started
        ref_out.unlink()
        size = out.stat().st_blocks * 512
        print(f"{fmt:7} {ours:7.2f} {ref:10.2f} {ours / ref:6.2f} {size / 1e6:8.0f}")
        if fmt != "vdi":
            out.unlink()
    return folder / "debian.vdi"


def _runs(vdi: Path, runs: int, folder: Path) -> None:
    from tests.pyti_core.test_e2e import PYTEST_DISTRIBUTIONS, wheel_of_installed  # noqa: PLC0415
    from tests.pyti_core.test_packages import make_wheel, tiny_pair  # noqa: PLC0415

    from pyti_core.manager import GuestSystem, run  # noqa: PLC0415
    from pyti_core.tasks import RECIPES, Recipe, Task  # noqa: PLC0415

    index = folder / "wheels"
    for name in PYTEST_DISTRIBUTIONS:
        wheel_of_installed(name, index)
    project, dep = tiny_pair(folder / "projects")
    make_wheel(dep, index)
    analyze = Task(
        "systemd-analyze", "command", 120, ("sh", "-c", "systemd-analyze; systemd-analyze blame | head -15")
    )
    recipe = Recipe("bench", (*RECIPES["default"].tasks, analyze), RECIPES["default"].requirements)
    guests = {"system disk (GRUB, systemd)": GuestSystem.from_image(vdi), "tiny guest (direct boot)": None}
    for label, guest in guests.items():
        for i in range(runs):
            started = time.monotonic()
            result = run(project, recipe=recipe, guest=guest, no_index=True, find_links=[index])
            total = time.monotonic() - started
            to_records = sum(result.phases.get(p, 0.0) for p in ("boot", "tasks", "collect"))
            phases = ", ".join(f"{k} {v:.1f}" for k, v in result.phases.items())
            print(f"{label} run {i + 1}: total {total:.1f} s, boot-to-records {to_records:.1f} s ({phases})")
            for record in result.report.records:
                print(f"    {record.task:20} {record.status:7} {record.duration_s:6.1f} s")
                if record.task == "systemd-analyze" and record.status == "passed":
                    print("      " + "\n      ".join(record.stdout.strip().splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--os", default="debian-12")
    parser.add_argument("--skip-cold", action="store_true", help="use the user's cache (no cold build)")
    parser.add_argument("--skip-run", action="store_true", help="no pyti run")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-sysdisk-"))
    try:
        build = _build(args.os, folder / "cache", args.skip_cold)
        vdi = _formats(build, folder)
        if not args.skip_run:
            _runs(vdi, args.runs, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at the end: {' '.join(load)}")


if __name__ == "__main__":
    main()
