"""What host and guest agree on (pyti_core.guest.protocol), the agent's copies of it, pip compiled for
the guest, and pyti_core without libvirt-python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import attrs
import pytest

from pyti_core import image, rawdata
from pyti_core.guest import agent, protocol, tinylinux
from pyti_core.guest.bytecode import (
    compiled_pip_zip,
    unchecked_pyc,
    use_compiled_pip,
    use_compiled_pip_in_job,
)
from pyti_core.guest.protocol import AgentJob, AgentTask
from pyti_core.manager import GuestSystem, run_script
from pyti_core.packages import GuestTarget, bundled_pip_wheel
from pyti_core.tasks import GuestLayout


def to_agent_job_like(argvs: list[list[str]]) -> AgentJob:
    tasks: list[AgentTask] = [
        {"id": str(i + 1), "name": f"t{i}", "argv": a, "timeout": 60.0, "cwd": "work", "parse": None,
         "env": {}, "stop_on_failure": False}
        for i, a in enumerate(argvs)
    ]  # fmt: skip
    return {"distribution": "x==1", "output_cap": 1024, "tasks": tasks}


# -- one definition of each marker and key --------------------------------------------------------------


def test_each_marker_is_defined_once_and_everyone_uses_it() -> None:
    src = Path(protocol.__file__).parents[1]
    for marker in (protocol.READY_MARKER, protocol.RUN_EXIT_MARKER):
        holders = [p.relative_to(src).as_posix() for p in src.rglob("*.py") if f'"{marker}"' in p.read_text()]
        assert holders == ["guest/protocol.py"], (marker, holders)
    init = tinylinux._render_init(["virtio_blk"])
    assert f"echo {protocol.READY_MARKER}\n" in init
    assert f'echo "{protocol.RUN_EXIT_MARKER} $?"' in init
    for key in (protocol.CMDLINE_RUN, protocol.CMDLINE_DISK, protocol.CMDLINE_ECHO):
        assert f"{key}=" in init
    hook = image.hook_script()
    assert protocol.READY_MARKER in hook
    assert f"{protocol.RUN_EXIT_MARKER} $status" in hook
    assert f"{protocol.CMDLINE_AGENT}=0" in hook
    assert f"LABEL='{protocol.IO_LABEL}'" in hook


def test_the_agents_copies_agree_with_the_protocol() -> None:
    assert agent.METHOD == rawdata.METHOD
    assert agent.RECORDS_FILE == protocol.RECORDS_FILE
    assert agent.JOB_FILE == protocol.JOB_FILE
    assert set(protocol.AgentTask.__annotations__) >= {"id", "name", "argv", "timeout", "cwd", "parse"}


def test_kernel_cmdline_renders_the_keys_and_refuses_words_that_would_split() -> None:
    line = protocol.kernel_cmdline("console=ttyS0", disks=("/dev/vdb1", "/dev/vdb"), run="/mnt/disk/run.sh")
    assert line == "console=ttyS0 pyti.disk=/dev/vdb1,/dev/vdb pyti.run=/mnt/disk/run.sh"
    assert protocol.kernel_cmdline("", run="/x") == "pyti.run=/x"
    for bad in ("/mnt/my disk/run.sh", "", "/x;reboot"):
        with pytest.raises(ValueError, match=r"pyti\.run"):
            protocol.kernel_cmdline("quiet", run=bad)


def test_run_script_quotes_what_it_is_given(tmp_path: Path) -> None:
    script = protocol.run_script(python="/opt/py thon/bin/python3", work_dir="/mnt/disk/work")
    assert "'/opt/py thon/bin/python3' /mnt/disk/agent.py /mnt/disk\n" in script
    (tmp_path / "run.sh").write_text(script)
    subprocess.run(["sh", "-n", str(tmp_path / "run.sh")], check=True)
    guest = GuestSystem(kernel=tmp_path / "k", layout=GuestLayout(python="python3.13"))
    assert "python3.13 /mnt/disk/agent.py /mnt/disk\n" in run_script(guest)


# -- pyti_core without libvirt-python -------------------------------------------------------------------


def test_pyti_core_imports_and_reads_reports_without_libvirt(tmp_path: Path) -> None:
    """Records, reports, the agent and the CLI's non-VM commands need no libvirt-python."""
    code = """
import sys
sys.modules["libvirt"] = None  # `import libvirt` now raises ImportError
import pyti_core, pyti_core.cli, pyti_core.image
from pyti_core.guest import agent, protocol, tinylinux
report = pyti_core.Report("x==1", ())
assert pyti_core.Report.from_json(report.to_json()) == report
assert pyti_core.TaskManager is not None
assert "vmanager" not in sys.modules, "vmanager was imported"
assert pyti_core.cli.main(["image", "prepare", "/nonexistent.img"]) == 3
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"
    assert "pyti: error:" in out.stderr


def test_running_a_vm_without_libvirt_says_what_to_install(tmp_path: Path) -> None:
    code = """
import sys
sys.modules["libvirt"] = None
from pathlib import Path
from pyti_core.errors import GuestRunError
from pyti_core.manager import GuestSystem, _define_vm
try:
    _define_vm(GuestSystem(kernel=Path("k")), "vm", None, Path("io.img"), Path("serial.log"))
except GuestRunError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "libvirt-python" in out.stdout


# -- pip, byte-compiled for the guest ---------------------------------------------------------------------


def test_unchecked_pyc_in_a_zip_is_what_zipimport_loads(tmp_path: Path) -> None:
    source = b"VALUE = 1\n"
    pyc = unchecked_pyc(compile(source, "mod.py", "exec"), source)
    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("mod.py", b"VALUE = 2\n")  # the source says 2; the byte code, never checked, says 1
        zf.writestr("mod.pyc", pyc)
    out = subprocess.run(
        [sys.executable, "-c", "import mod; print(mod.VALUE)"],
        env={**os.environ, "PYTHONPATH": str(archive)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "1\n"


def test_compiled_pip_runs_and_is_cached(tmp_path: Path) -> None:
    wheel = bundled_pip_wheel()
    if wheel is None:
        pytest.skip("this Python has no bundled pip wheel")
    compiled = compiled_pip_zip(wheel, tmp_path / "cache")
    with zipfile.ZipFile(compiled) as zf:
        names = set(zf.namelist())
    sources = {n for n in names if n.endswith(".py")}
    assert len(sources) > 100
    assert {n + "c" for n in sources} <= names
    out = subprocess.run(
        [sys.executable, str(compiled / "pip"), "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("pip ")
    assert str(compiled) in out.stdout
    mtime = compiled.stat().st_mtime_ns
    assert compiled_pip_zip(wheel, tmp_path / "cache") == compiled
    assert compiled.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [compiled.name]  # no temporary left


def test_compiled_pip_only_for_the_same_python_and_not_when_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    same = GuestTarget()
    assert same.python_version == (3, 11)
    assert use_compiled_pip(same) is (sys.version_info[:2] == (3, 11))
    assert not use_compiled_pip(attrs.evolve(same, python_version=(3, 8)))
    monkeypatch.setenv("PYTI_NO_COMPILED_PIP", "1")
    assert not use_compiled_pip(same)


def test_the_job_runs_pip_from_the_compiled_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "pip-24.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pip/__main__.py", "print('pip')\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    layout = GuestLayout()
    pip_argv = ["python3", f"/mnt/disk/wheels/{wheel.name}/pip", "install", "x"]
    job = to_agent_job_like([pip_argv, ["true"]])
    folder = tmp_path / "io"
    folder.mkdir()
    new = use_compiled_pip_in_job(job, folder, wheel, layout)
    (copy,) = (folder / "pyti").iterdir()
    assert new["tasks"][0]["argv"] == ["python3", f"/mnt/disk/pyti/{copy.name}/pip", "install", "x"]
    assert new["tasks"][1]["argv"] == ["true"]
    assert json.loads((folder / "job.json").read_text()) == new
    with zipfile.ZipFile(copy) as zf:
        assert sorted(zf.namelist()) == ["pip/__main__.py", "pip/__main__.pyc"]
