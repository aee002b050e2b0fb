"""The farm's scaling and overhead: four jobs through Dask against one worker and against the TaskManager.

Four small pure-Python distributions made here (wheels, installed offline in the guest; recipe:
install, import check, and a command that keeps the guest's CPU busy for ``--work`` seconds), on the
tiny Python guest under TCG:

1. the farm (``pyti_core.farm.run_many``) on a LocalCluster of **two workers of one VM each**, against
   the same on **one worker**: goal >= 1.8x faster with two;
2. the farm with two workers against ``pyti_core.task_manager.TaskManager(max_vms=2)`` on the same four
   jobs on this machine: goal <= 1.1x the TaskManager's time.

Each farm figure is the whole ``run_many`` call with a fresh ledger: starting the cluster's processes,
the jobs, and stopping it. The machine's load average is printed; on a shared 2-core machine the
scaling figure is bounded by what other processes leave free.

    python benchmarks/bench_farm.py [--jobs 4] [--work 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helper that makes wheels

GOAL_SCALING = 1.8
GOAL_OVERHEAD = 1.1


def _why(result: Any) -> str:
    """A failed job's distribution and its first failing task with the last line it wrote."""
    for record in result.report.records:
        if not record.ok:
            lines = (record.stderr or record.stdout).strip().splitlines() or ["(no output)"]
            return f"{result.distribution}: {record.task} {record.status}: {lines[-1][:200]}"
    return f"{result.distribution}: no records"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=4, help="jobs per measurement (default 4)")
    parser.add_argument("--work", type=float, default=10.0, help="seconds of CPU work per job in the guest")
    parser.add_argument(
        "--boot-timeout",
        type=float,
        default=90.0,
        help="the guest's boot timeout (raise it on a busy machine)",
    )
    args = parser.parse_args(argv)

    import attrs  # noqa: PLC0415
    from tests.pyti_core.test_task_manager import make_wheel  # noqa: PLC0415

    from pyti_core.farm import run_many  # noqa: PLC0415
    from pyti_core.manager import GuestSystem  # noqa: PLC0415
    from pyti_core.task_manager import TaskManager  # noqa: PLC0415
    from pyti_core.tasks import Recipe, Task  # noqa: PLC0415

    # built or found before anything is timed
    guest = attrs.evolve(GuestSystem.default(), boot_timeout=args.boot_timeout)
    root = Path(tempfile.mkdtemp(prefix="pyti-bench-farm-"))
    try:
        wheels = root / "wheels"
        specs = [
            make_wheel(wheels, f"benchfarm{i}", "1.0", {f"benchfarm{i}/__init__.py": "X = 1\n"})
            for i in range(args.jobs)
        ]
        busy = (
            f"import time\nt = time.monotonic()\nwhile time.monotonic() - t < {args.work}: sum(range(1000))"
        )
        recipe = Recipe(
            "bench",
            (
                Task("install", "install"),
                Task("import", "import", 120),
                Task("work", "command", 600, argv=("python3", "-c", busy)),
            ),
        )

        def farm(workers: int, tag: str) -> float:
            t0 = time.monotonic()
            results = list(
                run_many(
                    specs, ledger=root / f"{tag}.sqlite", max_vms=workers, recipe=recipe, timeout=900,
                    guest=guest, work_dir=root / f"work-{tag}", find_links=[wheels], no_index=True,
                )
            )  # fmt: skip
            elapsed = time.monotonic() - t0
            bad = [_why(r) for r in results if not r.ok]
            if len(results) != len(specs) or bad:
                raise SystemExit(f"farm ({workers} workers): {len(results)} results, failed: {bad}")
            return elapsed

        def task_manager() -> float:
            t0 = time.monotonic()
            with TaskManager(
                max_vms=2, guest=guest, work_dir=root / "tm", find_links=[wheels], no_index=True
            ) as tm:
                results = tm.run_all(specs, recipe=recipe, timeout=900)
            elapsed = time.monotonic() - t0
            bad = [_why(r) for r in results if not r.ok]
            if bad:
                raise SystemExit(f"TaskManager: failed: {bad}")
            return elapsed

        print(f"{args.jobs} jobs (install, import, {args.work:g} s of CPU work each) on the tiny guest, TCG")
        print(
            f"before: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
        )
        # the two figures compared for the overhead are measured one right after the other
        two = farm(2, "two")
        print(f"  farm, 2 workers x 1 VM : {two:7.1f} s")
        tm = task_manager()
        print(f"  TaskManager, 2 VMs     : {tm:7.1f} s")
        one = farm(1, "one")
        print(f"  farm, 1 worker  x 1 VM : {one:7.1f} s")
        print(f"after: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        scaling = one / two
        overhead = two / tm
        print(
            f"scaling, 1 worker / 2 workers: {scaling:.2f}x (goal >= {GOAL_SCALING}x: "
            f"{'met' if scaling >= GOAL_SCALING else 'missed'})"
        )
        print(
            f"overhead, farm / TaskManager: {overhead:.2f}x (goal <= {GOAL_OVERHEAD}x: "
            f"{'met' if overhead <= GOAL_OVERHEAD else 'missed'})"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
