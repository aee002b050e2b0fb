"""The agent's live channel, run here on the host: the real agent, real pytest runs with the plugin.

The agent and its channel module are copied into a folder as they are onto the IO disk and run by a
separate Python; their channel "port" is a unix socket where the test listens (as QEMU would), and the
host's :class:`LiveChannel` reads it. The pytest plugin runs inside real pytest subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyti_core.channel import (
    AgentExit,
    AgentHello,
    ChannelConfig,
    ChannelEvent,
    Heartbeat,
    LiveChannel,
    TaskFinished,
    TaskOutput,
    TaskStarted,
    TestReport,
)
from pyti_core.guest import agent, livechannel, pyti_live
from pyti_core.rawdata import parse_records

PY = sys.executable

TESTS = textwrap.dedent(
    """
    import pytest

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture fails")

    def test_passes():
        print("hello from a test")

    def test_fails():
        assert 1 + 1 == 3

    def test_errors(broken):
        pass

    @pytest.mark.skip(reason="not here")
    def test_skipped():
        pass

    @pytest.mark.xfail(reason="known")
    def test_xfails():
        assert False

    def test_nested_runs_do_not_report(pytester):
        import sys
        pytester.makepyfile("def test_inner(): pass")
        args = ["-p", "pyti_live"] if "pyti_live" in sys.modules else []
        pytester.runpytest(*args).assert_outcomes(passed=1)
    """
)


def bridge(listener: socket.socket, device: Path) -> threading.Thread:
    """Plays QEMU: the host connects to ``listener``; the agent connects to ``device``; bytes go across."""
    guest_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    guest_side.bind(str(device))
    guest_side.listen(1)

    def pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def run() -> None:
        host, _ = listener.accept()
        guest, _ = guest_side.accept()
        threads = [threading.Thread(target=pump, args=p, daemon=True) for p in ((host, guest), (guest, host))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in (host, guest, guest_side, listener):
            s.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def io_dir(tmp_path: Path) -> Path:
    """A folder laid out as the IO disk: the agent, its channel module, the plugin, a test project."""
    io = tmp_path / "io"
    (io / "plugins").mkdir(parents=True)
    shutil.copyfile(agent.__file__, io / "agent.py")
    shutil.copyfile(livechannel.__file__, io / "livechannel.py")
    shutil.copyfile(pyti_live.__file__, io / "plugins" / "pyti_live.py")
    project = io / "src"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (project / "conftest.py").write_text('pytest_plugins = ["pytester"]\n')
    (project / "test_demo.py").write_text(TESTS)
    (project / "test_broken_import.py").write_text("import no_such_module_anywhere\n")
    return io


def run_agent(io: Path, tasks: list[dict[str, Any]], channel: dict[str, Any] | None) -> int:
    job = {"distribution": "demo", "tasks": tasks}
    if channel is not None:
        job["channel"] = channel
    (io / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTI_"))}
    argv = [PY, str(io / "agent.py"), str(io)]
    proc = subprocess.run(argv, env=env, timeout=120, capture_output=True, check=False)
    assert proc.stderr == b"" or b"Traceback" not in proc.stderr, proc.stderr.decode()
    return proc.returncode


def pytest_task(io: Path, task_id: str = "2", live: bool = True) -> dict[str, Any]:
    argv = [PY, "-m", "pytest", "-p", "pyti_live"] if live else [PY, "-m", "pytest"]
    return {
        "id": task_id,
        "name": "pytest",
        "argv": [*argv, "-q", "--continue-on-collection-errors", f"--junitxml={io}/results/junit.xml", "."],
        "cwd": "src",
        "timeout": 120,
        "parse": f"junit:{io}/results/junit.xml",
    }


class Recorder:
    def __init__(self) -> None:
        self.events: list[ChannelEvent] = []

    def __call__(self, event: ChannelEvent) -> None:
        self.events.append(event)


def test_the_agent_tells_the_host_about_tasks_tests_and_output_as_they_happen(io_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_path = io_dir.parent / "host.sock"
    listener.bind(str(host_path))
    listener.listen(1)
    device = io_dir.parent / "port.sock"
    pumping = bridge(listener, device)
    recorder = Recorder()
    host = LiveChannel(host_path, ChannelConfig(heartbeat=0.2, stall_timeout=10), on_event=recorder).start()
    channel = {"device": str(device), "heartbeat_s": 0.2, "plugin_dir": str(io_dir / "plugins")}
    tasks = [
        {
            "id": "1",
            "name": "hello",
            "argv": [PY, "-c", "import time; print('chunk-1', flush=True); time.sleep(1.2)"],
        },
        pytest_task(io_dir),
    ]
    try:
        assert run_agent(io_dir, tasks, channel) == 1  # a test fails
        assert wait(lambda: any(isinstance(e, AgentExit) for e in recorder.events))
    finally:
        host.close()
        pumping.join(5)
    kinds = [type(e) for e in recorder.events]
    assert kinds[0] is AgentHello
    assert kinds[-1] is AgentExit
    assert Heartbeat in kinds
    started = [e.task_id for e in recorder.events if isinstance(e, TaskStarted)]
    finished = [(e.task_id, e.status) for e in recorder.events if isinstance(e, TaskFinished)]
    assert started == ["1", "2"]
    assert finished == [("1", "passed"), ("2", "failed")]
    output = "".join(e.data for e in recorder.events if isinstance(e, TaskOutput) and e.task_id == "1")
    assert output == "chunk-1\n"
    reports = {e.nodeid: e for e in recorder.events if isinstance(e, TestReport)}
    outcomes = {nodeid.split("::")[-1]: r.outcome for nodeid, r in reports.items()}
    assert outcomes == {
        "test_broken_import.py": "error",
        "test_passes": "passed",
        "test_fails": "failed",
        "test_errors": "error",
        "test_skipped": "skipped",
        "test_xfails": "xfailed",
        "test_nested_runs_do_not_report": "passed",
    }  # and no "test_inner" from the nested run
    fails = reports["test_demo.py::test_fails"]
    assert (fails.task_id, fails.word, fails.when) == ("2", "FAILED", "call")
    assert fails.message == "assert (1 + 1) == 3"
    assert "ModuleNotFoundError" in reports["test_broken_import.py"].message
    # every test event came before its task's end, and the records on "disk" say the same
    order = [type(e).__name__ + getattr(e, "task_id", "") for e in recorder.events]
    assert max(i for i, k in enumerate(order) if k == "TestReport2") < order.index("TaskFinished2")
    records = parse_records((io_dir / "results" / "records.jsonl").read_text().splitlines())
    assert [(r.task_id, r.status) for r in records] == [("1", "passed"), ("2", "failed")]
    assert host.stats.invalid == 0
    assert host.stats.cut_off is None


def test_without_a_channel_the_job_runs_as_before(io_dir: Path) -> None:
    assert run_agent(io_dir, [pytest_task(io_dir, live=False)], None) == 1
    records = parse_records((io_dir / "results" / "records.jsonl").read_text().splitlines())
    assert records[0].tests is not None
    assert records[0].tests.to_dict() == {"passed": 2, "failed": 1, "errors": 2, "skipped": 2}


def test_a_guest_without_the_port_runs_its_job_and_the_plugin_stays_quiet(io_dir: Path) -> None:
    channel = {"port": "org.pyti.no-such-port", "heartbeat_s": 0.2, "plugin_dir": str(io_dir / "plugins")}
    assert run_agent(io_dir, [pytest_task(io_dir)], channel) == 1
    records = parse_records((io_dir / "results" / "records.jsonl").read_text().splitlines())
    assert records[0].tests is not None
    assert records[0].tests.to_dict() == {"passed": 2, "failed": 1, "errors": 2, "skipped": 2}


def test_a_host_that_never_reads_does_not_slow_the_agent(io_dir: Path) -> None:
    # the port exists but nobody reads it: events queue, then drop; the job runs at full speed
    device = io_dir.parent / "deaf.sock"
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.bind(str(device))
    deaf.listen(1)
    chatty = "import sys\nfor i in range(20000): print('x' * 200)\n"
    tasks = [{"id": "1", "name": "chatty", "argv": [PY, "-c", chatty], "timeout": 60}]
    try:
        t0 = time.monotonic()
        assert run_agent(io_dir, tasks, {"device": str(device), "heartbeat_s": 0.2}) == 0
        assert time.monotonic() - t0 < 15
    finally:
        deaf.close()


def wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_the_guest_modules_use_only_the_standard_library() -> None:
    for module, allowed in ((livechannel, set()), (pyti_live, set())):
        source = Path(module.__file__ or "").read_text()
        imports = {
            line.split()[1].split(".")[0]
            for line in source.splitlines()
            if line.startswith(("import ", "from "))
        }
        assert imports <= set(sys.stdlib_module_names) | {"__future__"} | allowed, (module, imports)


def _old_pythons() -> list[str]:
    found = []
    for minor in (8, 9, 10):
        exe = shutil.which(f"python3.{minor}")
        if exe is None or "/shims/" in exe:  # a pyenv shim refuses versions not selected
            candidates = sorted(Path.home().glob(f".pyenv/versions/3.{minor}.*/bin/python3"))
            exe = str(candidates[-1]) if candidates else None
        if exe is not None:
            found.append(exe)
    return found


@pytest.mark.parametrize(
    "python", _old_pythons() or [pytest.param("", marks=pytest.mark.skip("no 3.8-3.10"))]
)
def test_the_agent_and_its_channel_run_on_the_oldest_guest_pythons(io_dir: Path, python: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_path = io_dir.parent / "host.sock"
    listener.bind(str(host_path))
    listener.listen(1)
    device = io_dir.parent / "port.sock"
    pumping = bridge(listener, device)
    recorder = Recorder()
    host = LiveChannel(host_path, ChannelConfig(heartbeat=0.2, stall_timeout=10), on_event=recorder).start()
    job = {
        "distribution": "demo",
        "tasks": [{"id": "1", "name": "hello", "argv": [python, "-c", "print('hi')"]}],
        "channel": {"device": str(device), "heartbeat_s": 0.2},
    }
    (io_dir / "job.json").write_text(json.dumps(job))
    try:
        proc = subprocess.run(
            [python, str(io_dir / "agent.py"), str(io_dir)], timeout=120, capture_output=True, check=False
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert wait(lambda: any(isinstance(e, AgentExit) for e in recorder.events))
    finally:
        host.close()
        pumping.join(5)
    hello = recorder.events[0]
    assert isinstance(hello, AgentHello)
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert hello.python == version
    assert [e.task_id for e in recorder.events if isinstance(e, TaskFinished)] == ["1"]


def test_the_plugin_delivers_every_report_of_a_fast_suite(tmp_path: Path) -> None:
    # 500 tests that take no time: far more reports than a unix datagram queue holds (10 by default)
    (tmp_path / "plugins").mkdir()
    shutil.copyfile(pyti_live.__file__, tmp_path / "plugins" / "pyti_live.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (tmp_path / "test_fast.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(500)))
    got: list[dict[str, Any]] = []
    relay = livechannel.PluginRelay(str(tmp_path / "relay.sock"), got.append)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTI_"))}
        env.update(PYTHONPATH=str(tmp_path / "plugins"), PYTI_LIVE_SOCKET=relay.path)
        argv = [PY, "-m", "pytest", "-p", "pyti_live", "-q", "test_fast.py"]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout.decode()[-2000:]
        assert wait(lambda: len(got) == 500, 10), len(got)
    finally:
        relay.close()
    assert {r["outcome"] for r in got} == {"passed"}
    assert len({r["nodeid"] for r in got}) == 500


def test_a_stuck_agent_costs_the_tests_one_short_wait_not_one_per_test(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    shutil.copyfile(pyti_live.__file__, tmp_path / "plugins" / "pyti_live.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (tmp_path / "test_fast.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(300)))
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # bound, never read: its queue fills at once
    stuck.bind(str(tmp_path / "stuck.sock"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTI_"))}
    env["PYTHONPATH"] = str(tmp_path / "plugins")
    try:
        times = {}
        for live in (False, True):
            argv = [PY, "-m", "pytest", "-q", "test_fast.py"]
            run_env = dict(env)
            if live:
                argv[3:3] = ["-p", "pyti_live"]
                run_env["PYTI_LIVE_SOCKET"] = str(tmp_path / "stuck.sock")
            t0 = time.monotonic()
            proc = subprocess.run(
                argv, cwd=tmp_path, env=run_env, capture_output=True, timeout=300, check=False
            )
            times[live] = time.monotonic() - t0
            assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    finally:
        stuck.close()
    # one wait per test would be 300 x 0.2 s = 60 s more
    assert times[True] - times[False] < 10, times
