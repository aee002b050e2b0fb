"""Wall time of a whole ``pyti run`` on a small pure-Python distribution, split by phase.

Part 1: ``pyti_core.run()`` on a project made here (``pytiny``, with a dependency and one passing and one
failing test; pytest for the guest) under the default recipe, ``--runs`` times, on the tiny Python guest
under TCG. Printed per run: every phase (download, io-disk, boot, tasks, collect, rollback), the guest's
own task times, and against the reference measured in the same run — QEMU started directly (no libvirt,
no IO disk) on the same kernel and initramfs until the guest prints its ready marker. Goals: a run at
most 60 s, boot to the agent (VM start to ready marker) at most 8 s.

Part 2: four such jobs through ``pyti_core.task_manager.TaskManager`` against four sequential runs
(skipped when there is no TaskManager).

pytest and its dependencies go to the guest as wheels repacked from this Python's installed copies, so
no network is used; ``--online`` downloads them from PyPI instead (through pip's cache).

    python benchmarks/bench_pyti_run.py [--runs 3] [--jobs 4] [--max-vms N] [--online] [--skip-parallel]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers that make the project and repack pytest

GOAL_RUN_S = 60.0
GOAL_BOOT_S = 8.0


def reference_boot(kernel: Path, initrd: Path, cmdline: str, timeout: float = 120.0) -> float:
    """Seconds from starting ``qemu-system-x86_64`` (TCG) to the guest's ready marker."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    try:
        while b"PYTI-GUEST-READY" not in seen:
            left = start + timeout - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            if not ready:
                raise SystemExit(f"reference boot: no ready marker in {timeout} s:\n{seen[-2000:]!r}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise SystemExit(f"reference boot: qemu exited:\n{seen[-2000:]!r}")
            seen += chunk
        return time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="single runs in part 1 (default 3)")
    parser.add_argument("--jobs", type=int, default=4, help="jobs in part 2 (default 4)")
    parser.add_argument("--max-vms", type=int, default=None, help="TaskManager's VM slots (default: its own)")
    parser.add_argument("--online", action="store_true", help="download pytest for the guest from PyPI")
    parser.add_argument("--skip-parallel", action="store_true", help="only part 1")
    args = parser.parse_args(argv)

    # libvirt's embedded driver logs warnings to stderr; it reads this when it is loaded.
    scratch = Path(tempfile.mkdtemp(prefix="pyti-bench-"))
    os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", f"3:file:{scratch / 'libvirt.log'}")
    from tests.pyti_core.test_e2e import PYTEST_DISTRIBUTIONS, wheel_of_installed  # noqa: PLC0415
    from tests.pyti_core.test_packages import make_wheel, tiny_pair  # noqa: PLC0415

    from pyti_core.manager import PHASES, GuestSystem, hypervisor_uri, run  # noqa: PLC0415

    try:
        guest = GuestSystem.default()
        main_project, dep = tiny_pair(scratch / "projects")
        index = scratch / "index"
        make_wheel(dep, index)
        if not args.online:
            for name in PYTEST_DISTRIBUTIONS:
                wheel_of_installed(name, index)
        no_index = not args.online
        print(f"hypervisor: {hypervisor_uri()}")
        print(
            f"project: {main_project.name} (+ {dep.name}), recipe 'default', guest memory {guest.memory} MiB"
        )

        assert guest.kernel is not None
        assert guest.initrd is not None
        ref = [reference_boot(guest.kernel, guest.initrd, guest.cmdline) for _ in range(2)]
        ref_boot = min(ref)
        print(f"reference: qemu-system-x86_64 straight to the ready marker: {ref_boot:.2f} s (best of 2)\n")

        header = f"{'run':>4} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'total':>8}   guest tasks (s)"
        print(header)
        totals: list[float] = []
        boots: list[float] = []
        for i in range(args.runs):
            t = time.monotonic()
            result = run(
                main_project, work_dir=scratch / "runs", timeout=600, find_links=[index], no_index=no_index
            )
            total = time.monotonic() - t
            totals.append(total)
            boots.append(result.phases["boot"])
            tasks = ", ".join(f"{r.task} {r.duration_s:.1f}" for r in result.report.records)
            row = " ".join(f"{result.phases.get(p, 0.0):9.2f}" for p in PHASES)
            print(f"{i + 1:>4} {row} {total:8.2f}   {tasks}")
            summary = [(r.task, r.status) for r in result.report.records]
            if summary[-1] != ("pytest", "failed") or any(s != "passed" for _, s in summary[:-1]):
                print(f"     unexpected records: {summary}")
        run_median = statistics.median(totals)
        boot_median = statistics.median(boots)
        print(
            f"\nmedian run {run_median:.1f} s (goal <= {GOAL_RUN_S:.0f} s: "
            f"{'met' if run_median <= GOAL_RUN_S else 'MISSED'}); "
            f"median boot {boot_median:.2f} s (goal <= {GOAL_BOOT_S:.0f} s: "
            f"{'met' if boot_median <= GOAL_BOOT_S else 'MISSED'}); "
            f"boot / reference boot = {boot_median / ref_boot:.2f}x"
        )

        if args.skip_parallel:
            return 0
        try:
            from pyti_core.task_manager import TaskManager  # noqa: PLC0415
        except ImportError:
            print("\npart 2 skipped: pyti_core.task_manager.TaskManager is not there")
            return 0
        print(f"\n{args.jobs} jobs: sequential run() calls against one TaskManager")
        t = time.monotonic()
        for _ in range(args.jobs):
            run(main_project, work_dir=scratch / "runs", timeout=600, find_links=[index], no_index=no_index)
        sequential = time.monotonic() - t
        t = time.monotonic()
        with TaskManager(
            args.max_vms, guest=guest, work_dir=scratch / "tm", find_links=[index], no_index=no_index
        ) as tm:
            slots = tm.max_vms
            results = tm.run_all([main_project] * args.jobs, timeout=600)
        parallel = time.monotonic() - t
        statuses = {tuple((r.task, r.status) for r in res.report.records) for res in results}
        print(f"  sequential: {sequential:7.1f} s  ({sequential / args.jobs:.1f} s per job)")
        print(
            f"  TaskManager ({slots} VMs at once): {parallel:7.1f} s  ({parallel / args.jobs:.1f} s per job)"
        )
        print(
            f"  speed-up {sequential / parallel:.2f}x on {os.cpu_count()} cores; same records in every job: "
            f"{len(statuses) == 1}"
        )
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
