"""The pyti command: tables, progress, exit codes, image commands, and real runs."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from diskhandler import create_io_disk
from pyti_core.cli import EXIT_ERROR, EXIT_FAILED, EXIT_OK, EXIT_USAGE, ProgressDisplay, format_table, main
from pyti_core.manager import RunResult
from pyti_core.rawdata import RawDataRecord, Report, TestCounts
from tests.pyti_core.test_image import _rootfs, debugfs
from tests.pyti_core.test_task_manager import HAVE_QEMU, make_wheel

MiB = 1 << 20
NOT_ROOT = "not a Linux root filesystem (pick --partition)"


def record(task: str, status: str, *, tests: TestCounts | None = None, rss: int = 2048) -> RawDataRecord:
    return RawDataRecord(
        task_id=task,
        task=task,
        status=status,  # type: ignore[arg-type]
        exit_code=0 if status == "passed" else 1,
        stdout="",
        stderr="",
        started_at=datetime(2026, 11, 27, tzinfo=UTC),
        duration_s=1.25,
        max_rss_kb=rss,
        cpu_user_s=0.5,
        cpu_system_s=0.25,
        tests=tests,
    )


def result_of(*records: RawDataRecord) -> RunResult:
    return RunResult("demo==1.0", Report("demo==1.0", records), {"boot": 3.0, "tasks": 9.5}, "")


def run_cli(*argv: str, **kwargs: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, **kwargs)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


# -- drawing ----------------------------------------------------------------------------------------


def test_table_has_a_row_per_task_with_counts_time_memory_cpu() -> None:
    text = format_table(
        result_of(
            record("install", "passed"),
            record("pytest", "failed", tests=TestCounts(passed=1, failed=1, skipped=2), rss=41234),
        )
    )
    lines = text.splitlines()
    assert lines[0] == "demo==1.0"
    assert lines[1].split() == [
        "task",
        "status",
        "passed",
        "failed",
        "errors",
        "skipped",
        "time",
        "peak",
        "mem",
        "CPU",
        "user+sys",
    ]
    assert lines[2].split() == [
        "install",
        "passed",
        "-",
        "-",
        "-",
        "-",
        "1.2",
        "s",
        "2.0",
        "MiB",
        "0.5",
        "+",
        "0.2",
        "s",
    ]
    assert lines[3].split()[:6] == ["pytest", "failed", "1", "1", "0", "2"]
    assert "40.3 MiB" in lines[3]
    assert lines[4] == "phases: boot 3.0 s, tasks 9.5 s"
    assert lines[5] == "  pytest: (no output)"
    assert lines[6] == "result: FAILED (1 of 2 tasks: pytest failed)"


def test_table_passed_and_empty() -> None:
    assert format_table(result_of(record("install", "passed"))).endswith("result: passed (1 tasks)\n")
    assert format_table(result_of()).endswith("result: FAILED (no task reported)\n")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_live_line_on_a_terminal_and_plain_lines_otherwise() -> None:
    tty = FakeTTY()
    live = ProgressDisplay(tty)
    live("boot", "starting")
    live("tasks", "running")
    live.close()
    assert tty.getvalue().count("\r\x1b[K") == 3
    assert "\n" not in tty.getvalue()
    plain_stream = io.StringIO()
    plain = ProgressDisplay(plain_stream)
    plain("download", "resolving")
    plain.job("pyti-1", "boot", "ready")
    plain.close()
    lines = plain_stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\[\s*\d+\.\d s\] download: resolving", lines[0])
    assert lines[1].endswith("boot: pyti-1: ready")


# -- exit codes and errors --------------------------------------------------------------------------


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli()[0] == EXIT_USAGE
    assert run_cli("run")[0] == EXIT_USAGE
    assert run_cli("run", "x==1", "--timeout", "-5")[0] == EXIT_USAGE
    assert run_cli("run", "x==1", "--timeout", "nan")[0] == EXIT_USAGE
    code, _, err = run_cli("run", "x==1", "--recipe", "nope")
    assert code == EXIT_USAGE
    assert err == "pyti: error: unknown recipe 'nope'; built-in recipes: default, install-only, unittest\n"
    job = tmp_path / "job.toml"
    job.write_text('distribution = "x==1"\nrecipe = "default"\ntimeotu = 3\n')
    code, _, err = run_cli("run", "--job", str(job))
    assert code == EXIT_USAGE
    assert err.startswith(f"pyti: error: {job}: timeotu: unknown key")
    assert "Traceback" not in err
    assert run_cli("master")[0] == EXIT_USAGE  # gone: `pyti farm`
    assert run_cli("--help")[0] == EXIT_OK


def test_a_failed_download_is_one_line_and_exit_3(tmp_path: Path) -> None:
    junk = tmp_path / "junk-1.0-py3-none-any.whl"
    junk.write_text("not a zip file")
    code, out, err = run_cli("run", str(junk), "--no-index")
    assert code == EXIT_ERROR
    assert out == ""
    last = err.splitlines()[-1]  # after the progress lines
    assert last.startswith("pyti: error: ")
    assert "junk-1.0-py3-none-any.whl: cannot read the wheel" in last
    assert "Traceback" not in err
    code, out, err = run_cli("run", str(tmp_path / "missing-1.0-py3-none-any.whl"))
    assert code == EXIT_USAGE
    assert err == f"pyti: usage error: run: {tmp_path}/missing-1.0-py3-none-any.whl: no such file or folder\n"


def test_several_specs_go_through_the_task_manager_and_each_gets_a_result(tmp_path: Path) -> None:
    """Failures of one job do not stop the others: every spec gets its table and its report."""
    specs = [str(tmp_path / f"junk{i}-1.0-py3-none-any.whl") for i in (1, 2)]
    for spec in specs:
        Path(spec).write_text("not a zip file")
    reports = tmp_path / "reports"
    code, out, err = run_cli(
        "run", *specs, "--no-index", "--max-vms", "1", "--report", str(reports), "--plain"
    )
    assert code == EXIT_FAILED
    tables = out.split("\n\n")
    assert len(tables) == 2
    for spec, table in zip(specs, tables, strict=True):
        lines = table.splitlines()
        assert lines[0] == spec
        assert lines[2].split()[:2] == ["pyti", "error"]
    assert "result: FAILED (1 of 1 tasks: pyti error)" in out
    written = sorted(p.name for p in reports.iterdir())
    assert len(written) == 2
    for name in written:
        (rec,) = Report.from_json((reports / name).read_text()).records
        assert "junk" in rec.stderr
        assert "cannot read the wheel" in rec.stderr
    assert "queued: " in err


def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyti_core", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0
    assert "usage: pyti" in proc.stdout


# -- image ----------------------------------------------------------------------------------------


needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fuse2fs"), reason="needs /dev/fuse and fuse2fs"
)


@needs_fuse
def test_image_prepare(tmp_path: Path) -> None:
    tree = _rootfs(tmp_path / "tree", systemd=False)
    image = create_io_disk(tmp_path / "root.img", 64 * MiB, "raw", "ext4", tree, partition_table=None)
    code, out, err = run_cli("image", "prepare", str(image))
    assert (code, err) == (EXIT_OK, "")
    assert out.splitlines()[0] == f"{image}: pyti agent installed (sysv)"
    assert "  /etc/init.d/pyti-agent" in out.splitlines()
    assert "S99pyti-agent" in debugfs(image, "ls /etc/rc2.d")

    shutil.rmtree(tree)
    data = tmp_path / "data"
    data.mkdir()
    plain = create_io_disk(tmp_path / "data.img", 16 * MiB, "raw", "ext4", data, partition_table=None)
    code, out, err = run_cli("image", "prepare", str(plain))
    assert code == EXIT_ERROR
    assert err == f"pyti: error: {plain}: the filesystem has no /etc and /bin: {NOT_ROOT}\n"
    code, _, err = run_cli("image", "prepare", str(tmp_path / "nope.img"))
    assert code == EXIT_ERROR
    assert "nope.img" in err


@pytest.mark.skipif(not shutil.which("apt-get"), reason="building the guest needs apt-get")
def test_image_build_prints_the_guest_files() -> None:
    code, out, _ = run_cli("image", "build")
    assert code == EXIT_OK
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert Path(fields["kernel"].strip()).is_file()
    assert Path(fields["initrd"].strip()).is_file()
    assert "console=ttyS0" in fields["cmdline"]


# -- real runs --------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.qemu
@pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-system-x86_64 and /dev/fuse")
def test_pyti_run_real_guest(tmp_path: Path) -> None:
    """One boot: a job file names a wheel (with a dependency) whose import fails; flags override the file."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "clidep", "1.0", {"clidep.py": "OK = True\n"})
    bad = make_wheel(
        wheels,
        "clibad",
        "1.0",
        {"clibad/__init__.py": "import clidep\nraise ImportError('broken on purpose')\n"},
        ("clidep",),
    )
    report = tmp_path / "bad.json"
    job = tmp_path / "job.toml"
    job.write_text(
        f'distribution = "{bad}"\nrecipe = "default"\ntimeout = 1\n'
        f'[packages]\nno_index = true\nfind_links = ["{wheels}"]\n'
        f'[results]\nreport = "{report}"\n'
    )
    code, out, err = run_cli(
        "run", "--job", str(job), "--recipe", "install-only", "--timeout", "300", "--plain"
    )
    assert code == EXIT_FAILED, out + err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:4]}
    assert rows["install"][1] == "passed"
    assert rows["import"][1] == "failed"
    assert float(rows["install"][6]) > 0  # seconds, measured in the guest
    assert out.splitlines()[-2] == "result: FAILED (1 of 2 tasks: import failed)"
    assert "  import: ImportError: broken on purpose" in out.splitlines()
    for phase in ("download", "io-disk", "boot", "tasks", "collect"):
        assert f"] {phase}: " in err
    saved = Report.from_json(report.read_text())
    assert saved.distribution == "clibad==1.0"
    assert [r.task for r in saved.records] == ["install", "import"]
    assert "broken on purpose" in saved.records[1].stderr
    assert saved.records[0].max_rss_kb > 0
