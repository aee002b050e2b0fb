"""The tables pyti run prints, for one run and for a matrix of environments, in text and in HTML."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

from pyti_core.cli import _report_paths
from pyti_core.manager import RunMatrix, RunResult, _with_environment
from pyti_core.rawdata import Environment, RawDataRecord, Report, TestCounts
from pyti_core.tables import format_table, matrix_table, run_table

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def rec(task: str, status: str = "passed", tests: TestCounts | None = None, env: Environment | None = None,
        stderr: str = "") -> RawDataRecord:  # fmt: skip
    return RawDataRecord(
        task_id=task, task=task, status=status, exit_code=0 if status == "passed" else 1,  # type: ignore[arg-type]
        stdout="", stderr=stderr, started_at=T0, duration_s=1.5, max_rss_kb=2048, cpu_user_s=1.0,
        cpu_system_s=0.5, tests=tests, environment=env,
    )  # fmt: skip


def result(guest: str, version: str, pytest_status: str, dist: str = "demo==1.0") -> RunResult:
    env = Environment(implementation="cpython", python_version=version, os_pretty_name=f"Debian <{guest}>",
                      kernel="6.1.0", init="init", cpus=1, memory_mib=479, accelerator="tcg")  # fmt: skip
    failed = int(pytest_status != "passed")
    records = (
        rec("install", env=env),
        rec("pytest", pytest_status, TestCounts(passed=1, failed=failed), env, stderr="E   needs 3.10"),
    )
    return RunResult(dist, Report(dist, records, env), {"boot": 3.0}, "", guest=guest)


def test_one_run_table_names_its_environment_and_renders_the_same_in_html() -> None:
    run = result("3.9", "3.9.2", "failed")
    text = format_table(run)
    assert text.splitlines()[0] == "demo==1.0"
    assert "environment: CPython 3.9.2, Debian <3.9>, kernel 6.1.0, PID 1 init, 1 CPU, 479 MiB, TCG" in text
    assert "result: FAILED (1 of 2 tasks: pytest failed)" in text
    assert str(run) == text
    page = run._repr_html_()
    assert page.startswith('<div class="pyti-table">')
    assert "Debian &lt;3.9&gt;" in page  # escaped
    assert page == run_table(run).html()
    assert "<td" in page


def test_matrix_table_has_a_column_per_environment() -> None:
    runs = [
        result("3.9", "3.9.2", "failed"),
        result("3.11", "3.11.2", "passed"),
        result("3.13", "3.13.5", "passed"),
    ]
    table = matrix_table(runs)
    assert table.header == ("task", "3.9", "3.11", "3.13")
    assert table.rows == (
        ("install", "passed", "passed", "passed"),
        ("pytest", "failed (1 passed, 1 failed)", "passed (1 passed)", "passed (1 passed)"),
    )
    text = str(RunMatrix(runs))
    assert "3.11: CPython 3.11.2, Debian <3.11>" in text
    assert "  3.9 pytest: E   needs 3.10" in text
    assert text.rstrip().endswith("result: FAILED in 1 of 3 runs (3.9)")
    assert not RunMatrix(runs).ok
    assert RunMatrix(runs[1:]).ok
    assert RunMatrix(runs)._repr_html_() == table.html()
    for cell in ("3.13", "failed (1 passed, 1 failed)", html.escape("Debian <3.13>")):
        assert cell in table.html()


def test_matrix_with_several_distributions_and_a_run_that_reported_nothing() -> None:
    broken = RunResult("other==2", Report("other==2", ()), {}, "", guest="pypy3")
    table = matrix_table([result("pypy3", "3.9.16", "passed"), broken])
    assert table.header == ("distribution", "task", "pypy3")
    assert table.rows[0] == ("demo==1.0", "install", "passed")
    text = table.text()
    assert "pypy3 other==2: not measured (the guest ran no task)" in text
    assert "pypy3 other==2: no task reported" in text


def test_report_files_are_named_after_distribution_and_environment(tmp_path: Path) -> None:
    runs = [
        result("3.9", "3.9.2", "passed"),
        result("pypy3", "3.9.16", "passed"),
        result("", "3.11.2", "passed"),
    ]
    paths = _report_paths(tmp_path / "reports", runs)
    assert [p.name for p in paths] == ["demo-1.0-py3.9.json", "demo-1.0-pypy3.json", "demo-1.0.json"]
    assert (tmp_path / "reports").is_dir()


def test_the_host_adds_its_accelerator_and_made_up_records_get_the_environment() -> None:
    env = Environment(implementation="cpython", python_version="3.13.5")
    measured = rec("install", env=env)
    made_up = rec("pytest", "error")
    environment, records = _with_environment([measured, made_up], "tcg")
    assert environment == Environment(implementation="cpython", python_version="3.13.5", accelerator="tcg")
    assert [r.environment for r in records] == [environment, environment]
    assert _with_environment([made_up], "tcg") == (None, [made_up])
