"""A whole ``pyti run`` against the same work on the host, and a matrix of guests against one guest.

Part 1: a small pure-Python package (``pytiny``) with one dependency and one test, through
``pyti_core.run()`` with warm caches (the guest built, wheels in a local folder), against the same work
on the host, measured in the same run: a fresh venv, an offline ``pip install`` of the package and
pytest, pytest. Goal: pyti at most 2.0x the host under TCG. Printed: every phase of each run and the
guest's own task times.

Part 2: the same package in four tiny guests (3.9, 3.11, 3.13, 3.14) through one TaskManager with two VMs
at once, against one guest (3.11) alone. Goal: at most 2.5x the wall time of the single guest.

pytest and its dependencies come from this Python's installed copies (repacked as wheels) for the host
side; the guests have their own, preinstalled. No network is used for the package.

    python benchmarks/bench_pyti_run.py [--runs 3] [--skip-matrix] [--pythons 3.9,3.11,3.13,3.14]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test helpers that make the project and repack pytest

GOAL_RUN_RATIO = 2.0
GOAL_MATRIX_RATIO = 2.5


def host_reference(project: Path, index: Path, work: Path) -> float:
    """Seconds for a fresh venv, an offline install of ``project`` and pytest, and pytest, on the host."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, capture_output=True)
    py = str(work / "venv" / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(index)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([*pip, str(project), "pytest"], check=True, capture_output=True, env=env)
    subprocess.run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project, check=True, capture_output=True, env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each side in part 1 (default 3)")
    parser.add_argument("--pythons", default="3.9,3.11,3.13,3.14", help="the guests of part 2")
    parser.add_argument("--skip-matrix", action="store_true", help="only part 1")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="pyti-bench-"))
    os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", f"3:file:{scratch / 'libvirt.log'}")
    from tests.pyti_core.test_e2e import PYTEST_DISTRIBUTIONS, wheel_of_installed  # noqa: PLC0415
    from tests.pyti_core.test_packages import make_project, make_wheel  # noqa: PLC0415

    from pyti_core.manager import PHASES, GuestSystem, RunMatrix, hypervisor_uri, run  # noqa: PLC0415
    from pyti_core.task_manager import TaskManager  # noqa: PLC0415

    try:
        dep = make_project(
            scratch / "projects", "pytiny-dep", "1.0", {"pytiny_dep/__init__.py": "BASE = 2\n"}
        )
        project = make_project(
            scratch / "projects", "pytiny", "0.4",
            {"pytiny/__init__.py": "from pytiny_dep import BASE\n\ndef double(x):\n    return x * BASE\n",
             "tests/test_tiny.py": "import pytiny\n\ndef test_double():\n    assert pytiny.double(2) == 4\n"},
            packages=["pytiny"], requires=["pytiny-dep>=1.0"],
        )  # fmt: skip
        index = scratch / "index"
        make_wheel(dep, index)
        make_wheel(project, index)
        for name in PYTEST_DISTRIBUTIONS:
            wheel_of_installed(name, index)
        guest = GuestSystem.default()
        print(
            f"hypervisor: {hypervisor_uri()}; guest: {guest.initrd} ({guest.initrd.stat().st_size >> 20} MiB)"
        )
        tooling = ", ".join(f"{k} {v}" for k, v in sorted(guest.preinstalled.items()))
        print(f"preinstalled in the guest: {tooling}")
        run(project, find_links=[index], no_index=True, work_dir=scratch / "runs", timeout=600)  # warm caches

        print("\npart 1: pyti run against the host (fresh venv, offline pip install, pytest)")
        print(
            f"{'run':>4} "
            + " ".join(f"{p:>9}" for p in PHASES)
            + f" {'pyti':>7} {'host':>6}   guest tasks (s)"
        )
        pyti_times: list[float] = []
        host_times: list[float] = []
        for i in range(args.runs):
            host_times.append(host_reference(project, index, scratch / "host"))
            t = time.monotonic()
            result = run(project, find_links=[index], no_index=True, work_dir=scratch / "runs", timeout=600)
            pyti_times.append(time.monotonic() - t)
            tasks = ", ".join(f"{r.task} {r.duration_s:.1f}" for r in result.report.records)
            row = " ".join(f"{result.phases.get(p, 0.0):9.2f}" for p in PHASES)
            print(f"{i + 1:>4} {row} {pyti_times[-1]:7.2f} {host_times[-1]:6.2f}   {tasks}")
            if not result.ok:
                print(f"     unexpected records: {[(r.task, r.status) for r in result.report.records]}")
        pyti_s, host_s = statistics.median(pyti_times), statistics.median(host_times)
        ratio = pyti_s / host_s
        verdict = "met" if ratio <= GOAL_RUN_RATIO else "MISSED"
        print(
            f"median pyti run {pyti_s:.1f} s, host {host_s:.1f} s: {ratio:.2f}x "
            f"(goal <= {GOAL_RUN_RATIO:.1f}x: {verdict})"
        )
        if args.skip_matrix:
            return 0

        pythons = [p.strip() for p in args.pythons.split(",") if p.strip()]
        print(f"\npart 2: {len(pythons)} guests ({', '.join(pythons)}), two VMs at once, against one (3.11)")
        guests = [GuestSystem.for_python(p) for p in pythons]
        single = GuestSystem.for_python("3.11")

        def matrix(chosen: list[GuestSystem]) -> tuple[float, RunMatrix]:
            t = time.monotonic()
            with TaskManager(2, work_dir=scratch / "tm", find_links=[index], no_index=True) as tm:
                futures = [tm.submit(project, timeout=900, guest=g) for g in chosen]
                results = RunMatrix([f.result() for f in futures])
            return time.monotonic() - t, results

        one_s, one = matrix([single])
        many_s, many = matrix(guests)
        print(str(many))
        ratio = many_s / one_s
        verdict = "met" if ratio <= GOAL_MATRIX_RATIO else "MISSED"
        print(
            f"one guest {one_s:.1f} s ({'passed' if one.ok else 'FAILED'}), {len(guests)} guests "
            f"{many_s:.1f} s: {ratio:.2f}x (goal <= {GOAL_MATRIX_RATIO:.1f}x: {verdict})"
        )
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
