"""The guest agent, run here on the host: measurement, timeouts, output caps, test counts."""

from __future__ import annotations

import json
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pyti_core.guest import agent
from pyti_core.rawdata import parse_record, parse_records

PY = sys.executable


def _task(argv: list[str], **kw: Any) -> dict[str, Any]:
    return {"id": kw.pop("id", "1"), "name": kw.pop("name", "t"), "argv": argv, **kw}


def test_passed_task_is_measured(tmp_path: Path) -> None:
    # allocate ~60 MB in a grandchild process: the record must see the tree's peak RSS and CPU
    code = (
        "import subprocess, sys; "
        "subprocess.run([sys.executable, '-c', 'b = bytearray(60_000_000); sum(range(3_000_000))'])"
    )
    record = agent.run_task(_task([PY, "-c", code]), str(tmp_path))
    parsed = parse_record(json.dumps(record))
    assert parsed.status == "passed"
    assert parsed.exit_code == 0
    assert parsed.max_rss_kb > 55_000
    assert parsed.cpu_user_s + parsed.cpu_system_s > 0.01
    assert parsed.duration_s >= parsed.cpu_user_s * 0.5


def test_failing_task_and_captured_output(tmp_path: Path) -> None:
    record = agent.run_task(
        _task([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]),
        str(tmp_path),
    )
    p = record["params"]
    assert (p["status"], p["exit_code"], p["stdout"], p["stderr"]) == ("failed", 3, "out\n", "err\n")


def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(grandchild)!r}])\n"
        "time.sleep(60)\n"
    )
    record = agent.run_task(_task([PY, str(parent)], timeout=1), str(tmp_path))
    p = record["params"]
    assert p["status"] == "timeout"
    assert p["exit_code"] is None
    assert p["duration_s"] < 10
    assert "timeout" in p["stderr"]
    time.sleep(3.5)
    assert not marker.exists(), "a grandchild outlived the task's timeout"


def test_missing_program_is_an_error_record(tmp_path: Path) -> None:
    p = agent.run_task(_task(["/nonexistent/prog"]), str(tmp_path))["params"]
    assert p["status"] == "error"
    assert "cannot run" in p["stderr"]


def test_output_is_capped_with_a_marker(tmp_path: Path) -> None:
    p = agent.run_task(_task([PY, "-c", "print('x' * 5000)"]), str(tmp_path), output_cap=100)["params"]
    assert p["stdout"].startswith("x" * 100)
    assert "output truncated by pyti: 4901 more bytes" in p["stdout"]


def test_pytest_counts_from_junit(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "test_x.py").write_text(
        textwrap.dedent(
            """
            import pytest
            def test_ok(): pass
            def test_bad(): assert False
            @pytest.mark.skip
            def test_skip(): pass
            """
        )
    )
    task = _task(
        [PY, "-m", "pytest", "-p", "no:cacheprovider", "--junitxml=report.xml", "-q"],
        cwd="work",
        parse="junit:report.xml",
    )
    p = agent.run_task(task, str(tmp_path))["params"]
    assert p["status"] == "failed"
    assert p["tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}


@pytest.mark.parametrize(
    ("stderr", "counts"),
    [
        ("Ran 3 tests in 0.001s\n\nOK\n", {"passed": 3, "failed": 0, "errors": 0, "skipped": 0}),
        (
            "Ran 5 tests in 0.1s\n\nFAILED (failures=1, errors=1, skipped=1)\n",
            {"passed": 2, "failed": 1, "errors": 1, "skipped": 1},
        ),
        ("Ran 1 test in 0.0s\n\nOK (skipped=1)\n", {"passed": 0, "failed": 0, "errors": 0, "skipped": 1}),
        ("Traceback: boom\n", None),
    ],
)
def test_unittest_summary(stderr: str, counts: dict[str, int] | None) -> None:
    assert agent.parse_unittest(stderr) == counts


def test_run_job_writes_valid_records(tmp_path: Path) -> None:
    job = {
        "distribution": "demo",
        "tasks": [_task([PY, "-c", "pass"], id="a"), _task([PY, "-c", "raise SystemExit(1)"], id="b")],
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert agent.main([str(tmp_path)]) == 1
    lines = (tmp_path / "results" / "records.jsonl").read_text().splitlines()
    records = parse_records(lines)
    assert [(r.task_id, r.status) for r in records] == [("a", "passed"), ("b", "failed")]
    # every record says where it ran, measured where the agent runs (here: this host)
    env = records[0].environment
    assert env is not None
    assert records[1].environment == env
    assert env.implementation == sys.implementation.name
    assert env.python_version == platform.python_version()
    assert env.kernel == platform.uname().release
    assert env.cpus == os.cpu_count()
    assert env.memory_mib > 0
    assert env.init == Path("/proc/1/comm").read_text().strip()
    assert env.accelerator == ""  # the host adds it
    release = dict(
        line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
    )
    assert env.os_name == release["NAME"].strip('"')


def test_os_release_quotes_comments_and_fallbacks(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_text(
        "# a comment\nNAME=\"Debian GNU/Linux\"\nPRETTY_NAME='Debian GNU/Linux trixie/sid'\n"
        "VERSION_CODENAME=forky\nbroken line\n"
    )
    assert agent._os_release((str(tmp_path / "missing"), str(tmp_path / "os-release"))) == {
        "NAME": "Debian GNU/Linux",
        "PRETTY_NAME": "Debian GNU/Linux trixie/sid",
        "VERSION_CODENAME": "forky",
    }
    assert agent._os_release((str(tmp_path / "missing"),)) == {}


def test_agent_uses_only_the_standard_library() -> None:
    source = Path(agent.__file__).read_text()
    imports = {
        line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}, imports
