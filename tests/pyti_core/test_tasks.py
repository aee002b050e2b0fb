"""tasks: recipes, the agent's job.json, and a whole job run by the real agent on this host."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import attrs
import pytest

from pyti_core.errors import TaskError
from pyti_core.guest import agent
from pyti_core.packages import Distribution, bundled_pip_wheel, prepare_distribution
from pyti_core.rawdata import parse_records
from pyti_core.tasks import RECIPES, GuestLayout, Recipe, Task, get_recipe, stage_io_folder, to_agent_job

from .test_packages import make_wheel, tiny_pair

AGENT_KEYS = {"id", "name", "argv", "timeout", "cwd", "parse", "env", "stop_on_failure"}


def _dist(tmp_path: Path, *, sources: bool = True, imports: tuple[str, ...] = ("a", "b")) -> Distribution:
    wheels = tmp_path / "wheels"
    return Distribution(
        name="demo",
        version="1.0",
        wheel=wheels / "demo-1.0-py3-none-any.whl",
        wheels=(wheels / "demo-1.0-py3-none-any.whl", wheels / "pip-24.0-py3-none-any.whl"),
        pip_wheel=wheels / "pip-24.0-py3-none-any.whl",
        wheelhouse=wheels,
        sources=tmp_path / "src" if sources else None,
        import_names=imports,
    )


def test_default_job_for_the_guest(tmp_path: Path) -> None:
    job = to_agent_job(_dist(tmp_path), RECIPES["default"])
    assert job["distribution"] == "demo==1.0"
    tasks = job["tasks"]
    assert [t["name"] for t in tasks] == ["install", "install-requirements", "import", "pytest"]
    assert [t["id"] for t in tasks] == ["1", "2", "3", "4"]
    assert all(set(t) == AGENT_KEYS for t in tasks)
    pip = ["python3", "/mnt/disk/wheels/pip-24.0-py3-none-any.whl/pip", "install", "--no-index"]
    assert tasks[0]["argv"][:4] == pip
    assert tasks[0]["argv"][-3:] == ["--find-links", "/mnt/disk/wheels", "demo==1.0"]
    assert tasks[0]["stop_on_failure"] is True
    assert tasks[0]["env"]["PIP_BREAK_SYSTEM_PACKAGES"] == "1"
    assert tasks[1]["argv"][-1] == "pytest"
    assert "--no-compile" in tasks[1]["argv"]  # test tooling is compiled on import, not at install
    assert "--no-compile" not in tasks[0]["argv"]  # the distribution itself installs as usual
    assert tasks[2]["argv"] == ["python3", "-c", "import a, b"]
    assert tasks[2]["cwd"] == "/mnt/disk/work"
    assert tasks[3]["argv"] == [
        "python3",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--junitxml=/mnt/disk/results/junit-4.xml",
    ]
    assert tasks[3]["parse"] == "junit:/mnt/disk/results/junit-4.xml"
    assert tasks[3]["cwd"] == "/mnt/disk/src"
    assert tasks[3]["env"]["PYTHONSAFEPATH"] == "1"
    assert tasks[3]["timeout"] == 1800
    json.dumps(job)  # plain JSON


def test_unittest_and_command_and_layout(tmp_path: Path) -> None:
    recipe = Recipe(
        "mine",
        [
            Task("install", "install"),
            Task("unittest", "unittest", 60, argv=["discover", "-s", "tests"]),
            Task("lint", "command", 30, argv=["python3", "-m", "mylint"], env={"X": 1}, stop_on_failure=True),
        ],
    )
    job = to_agent_job(_dist(tmp_path), recipe, GuestLayout(io_dir="/io", python="/usr/bin/python3.11"))
    install, unit, lint = job["tasks"]
    assert install["argv"][1] == "/io/wheels/pip-24.0-py3-none-any.whl/pip"
    assert unit["argv"] == ["/usr/bin/python3.11", "-m", "unittest", "discover", "-s", "tests"]
    assert (unit["parse"], unit["cwd"], unit["stop_on_failure"]) == ("unittest", "/io/src", False)
    assert (lint["argv"], lint["env"], lint["stop_on_failure"]) == (
        ["python3", "-m", "mylint"],
        {"X": "1"},
        True,
    )


def test_without_sources_or_import_names(tmp_path: Path) -> None:
    job = to_agent_job(_dist(tmp_path, sources=False, imports=("pkg",)), RECIPES["default"])
    assert job["tasks"][-1]["argv"][-2:] == ["--pyargs", "pkg"]
    assert job["tasks"][-1]["cwd"] == "/mnt/disk/work"
    with pytest.raises(TaskError, match=r"unittest.*demo==1\.0 has none"):
        to_agent_job(_dist(tmp_path, sources=False), RECIPES["unittest"])
    job = to_agent_job(_dist(tmp_path, imports=()), RECIPES["install-only"])
    assert [t["name"] for t in job["tasks"]] == ["install"]


def test_bad_tasks_and_recipes() -> None:
    with pytest.raises(TaskError, match="kind must be one of"):
        Task("x", "shell")  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="timeout must be > 0"):
        Task("x", "pytest", 0)
    with pytest.raises(TaskError, match="non-empty argv"):
        Task("x", "command")
    with pytest.raises(TaskError, match="non-empty name"):
        Task(" ", "pytest")
    with pytest.raises(TaskError, match="unique"):
        Recipe("r", [Task("a", "pytest"), Task("a", "unittest")])
    with pytest.raises(TaskError, match="no tasks"):
        Recipe("r", [])
    with pytest.raises(TaskError, match="built-in recipes: default, install-only, unittest"):
        get_recipe("nope")
    assert get_recipe("unittest") is RECIPES["unittest"]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        RECIPES["default"].name = "x"  # type: ignore[misc]


@pytest.fixture
def guest_python(tmp_path: Path) -> str:
    """A fresh venv without pip standing in for the guest's Python; it sees this venv's pytest."""
    venv = tmp_path / "guest-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # pytest and its plugins come from here; the distribution under test is installed by pip in the job
    (Path(purelib) / "host_pytest.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def test_a_whole_job_run_by_the_agent(tmp_path: Path, guest_python: str) -> None:
    pip_wheel = bundled_pip_wheel()
    if pip_wheel is None:
        pytest.skip("this Python has no ensurepip-bundled pip wheel")
    main, dep = tiny_pair(tmp_path / "projects")
    index = tmp_path / "index"
    make_wheel(dep, index)
    dist = prepare_distribution(
        main,
        tmp_path / "prepared",
        requirements=(),
        no_index=True,
        find_links=[index],
        pip_wheel=pip_wheel,
        build_isolation=False,
    )
    io = tmp_path / "io"
    recipe = attrs.evolve(RECIPES["default"], requirements=())  # pytest is already visible to the guest
    job = stage_io_folder(io, dist, recipe, GuestLayout(io_dir=str(io), python=guest_python))
    assert json.loads((io / "job.json").read_text()) == job
    assert (io / "agent.py").read_text() == Path(agent.__file__).read_text()
    assert sorted(p.name for p in (io / "wheels").iterdir()) == sorted(p.name for p in dist.wheels)

    assert agent.run_job(str(io)) == 1  # the failing test
    with open(io / "results" / "records.jsonl", "rb") as f:
        records = parse_records(f)
    by_name = {r.task: r for r in records}
    assert list(by_name) == ["install", "import", "pytest"]
    assert by_name["install"].status == "passed", by_name["install"].stderr
    assert "Successfully installed pytiny-0.3 pytiny-dep-1.0" in by_name["install"].stdout
    assert by_name["import"].status == "passed", by_name["import"].stderr
    pytest_record = by_name["pytest"]
    assert (pytest_record.status, pytest_record.exit_code) == ("failed", 1)
    assert pytest_record.tests is not None
    assert (pytest_record.tests.passed, pytest_record.tests.failed) == (1, 1)
    # the tests ran against the installed package, not the source tree
    installed = subprocess.run(
        [guest_python, "-c", "import pytiny; print(pytiny.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "site-packages" in installed
    assert "test_wrong" in pytest_record.stdout


def test_a_failed_install_stops_the_job(tmp_path: Path, guest_python: str) -> None:
    pip_wheel = bundled_pip_wheel()
    if pip_wheel is None:
        pytest.skip("this Python has no ensurepip-bundled pip wheel")
    main, _ = tiny_pair(tmp_path / "projects")
    wheel = make_wheel(main, tmp_path / "w")
    # the dependency is missing from the wheelhouse: the install fails and nothing else runs
    dist = Distribution(
        name="pytiny",
        version="0.3",
        wheel=wheel,
        wheels=(wheel, pip_wheel),
        pip_wheel=pip_wheel,
        wheelhouse=wheel.parent,
        sources=main,
        import_names=("pytiny",),
    )
    io = tmp_path / "io"
    stage_io_folder(io, dist, RECIPES["default"], GuestLayout(io_dir=str(io), python=guest_python))
    assert agent.run_job(str(io)) == 1
    with open(io / "results" / "records.jsonl", "rb") as f:
        records = parse_records(f)
    assert [(r.task, r.status) for r in records] == [("install", "failed")]
    assert "pytiny-dep" in records[0].stderr


def test_layout_is_checked() -> None:
    with pytest.raises(TaskError, match="absolute"):
        GuestLayout(io_dir="mnt/disk")
    with pytest.raises(TaskError, match=r"layout\.wheels"):
        GuestLayout(wheels="../etc")
    with pytest.raises(TaskError, match=r"layout\.results"):
        GuestLayout(results="a/b")


def test_staging_replaces_stale_files_and_skips_clutter(tmp_path: Path) -> None:
    dist = _dist(tmp_path)
    dist.wheelhouse.mkdir()
    for wheel in dist.wheels:
        wheel.write_bytes(b"wheel")
    assert dist.sources is not None
    for rel in (
        "pyproject.toml",
        "tests/test_x.py",
        "pkg/__pycache__/x.pyc",
        ".git/HEAD",
        ".venv/bin/python",
        "build/lib/x.py",
        "pkg/build/keep.py",
    ):
        (dist.sources / rel).parent.mkdir(parents=True, exist_ok=True)
        (dist.sources / rel).write_text("x")
    io = tmp_path / "io"
    (io / "wheels").mkdir(parents=True)
    (io / "wheels" / "old-0.1-py3-none-any.whl").write_text("stale")
    (io / "results").mkdir()
    (io / "results" / "records.jsonl").write_text("{}\n")
    stage_io_folder(io, dist, RECIPES["default"])
    assert sorted(p.name for p in (io / "wheels").iterdir()) == sorted(w.name for w in dist.wheels)
    assert list((io / "results").iterdir()) == []
    copied = sorted(str(p.relative_to(io / "src")) for p in (io / "src").rglob("*") if p.is_file())
    assert copied == ["pkg/build/keep.py", "pyproject.toml", "tests/test_x.py"]
    assert json.loads((io / "job.json").read_text())["tasks"][0]["cwd"] == "/mnt/disk/work"


def test_the_live_channel_adds_the_plugin_and_its_files_and_nothing_without_it(tmp_path: Path) -> None:
    dist = _dist(tmp_path)
    layout = GuestLayout()
    plain = to_agent_job(dist, RECIPES["default"], layout)
    live = to_agent_job(dist, RECIPES["default"], layout, heartbeat=2.0)
    assert "channel" not in plain
    assert live["channel"] == {
        "port": "org.pyti.rpc.0",
        "heartbeat_s": 2.0,
        "plugin_dir": "/mnt/disk/pyti-live",
    }
    for before, after in zip(plain["tasks"], live["tasks"], strict=True):
        if before["name"] == "pytest":
            assert after["argv"] == [*before["argv"][:5], "-p", "pyti_live", *before["argv"][5:]]
            assert "-p" in before["argv"]
            assert "pyti_live" not in before["argv"]
        else:
            assert after == before
    (tmp_path / "wheels").mkdir()
    for wheel in dist.wheels:
        wheel.write_bytes(b"PK")
    (tmp_path / "src").mkdir()
    stage_io_folder(tmp_path / "off", dist, RECIPES["default"], layout)
    stage_io_folder(tmp_path / "on", dist, RECIPES["default"], layout, heartbeat=2.0)
    assert not (tmp_path / "off" / "livechannel.py").exists()
    assert not (tmp_path / "off" / "pyti-live").exists()
    assert (tmp_path / "on" / "livechannel.py").is_file()
    assert (tmp_path / "on" / "pyti-live" / "pyti_live.py").is_file()
