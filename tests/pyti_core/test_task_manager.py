"""TaskManager: bounded parallel VMs, results for every job (timeouts and failures included).

The fast tests run the whole pipeline against libvirt's in-process fake hypervisor (``test:///``), where a
"guest" never prints anything: every job must then come back as a boot timeout, with its serial log,
never lost, and never more VMs at once than allowed. The ``e2e`` test boots real TCG guests.
Distributions are wheels made in the test (and installed offline in the guest), so nothing is
downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest

from pyti_core.errors import TaskError, TaskManagerClosedError
from pyti_core.manager import GuestSystem, RunResult
from pyti_core.task_manager import TaskManager, default_max_vms, failure_result
from pyti_core.tasks import Recipe, Task

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None and os.path.exists("/dev/fuse")


# -- distributions made in the test ---------------------------------------------------------------


def make_wheel(
    folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()
) -> Path:
    """A minimal pure-Python wheel (PEP 427) holding ``files`` (path -> text)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
    meta += [f"Requires-Dist: {r}\n" for r in requires]
    contents = {
        **files,
        f"{info}/METADATA": "".join(meta),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": "".join(sorted({p.split("/")[0].removesuffix(".py") + "\n" for p in files})),
    }
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}\n")
    record.append(f"{info}/RECORD,,\n")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
        zf.writestr(f"{info}/RECORD", "".join(record))
    return wheel


def command_recipe(name: str, code: str, *, timeout: float = 600) -> Recipe:
    """install, import, then ``python3 -c code``; nothing else to download (no pytest)."""
    return Recipe(
        name,
        (
            Task("install", "install"),
            Task("import", "import", 120),
            Task("check", "command", timeout, argv=("python3", "-c", code)),
        ),
    )


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    make_wheel(folder, "tmdep", "1.0", {"tmdep/__init__.py": "VALUE = 41\n"})
    make_wheel(folder, "tmok", "1.0", {"tmok/__init__.py": "import tmdep\nX = tmdep.VALUE + 1\n"}, ("tmdep",))
    make_wheel(folder, "tmhang", "1.0", {"tmhang/__init__.py": ""})
    make_wheel(folder, "tmthird", "2.0", {"tmthird.py": "Y = 3\n"})
    return folder


# -- without a real guest -------------------------------------------------------------------------


@pytest.fixture
def fake_guest(tmp_path: Path) -> GuestSystem:
    """Files that exist (the fake hypervisor opens none); the 'guest' never prints its ready marker."""
    (tmp_path / "vmlinuz").write_bytes(b"not a kernel")
    (tmp_path / "initrd").write_bytes(b"not an initrd")
    return GuestSystem(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", boot_timeout=1.5)


class Watch:
    """Counts the jobs between their "boot" and "done" events: the VMs alive at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.booting: set[str] = set()
        self.peak = 0
        self.events: list[tuple[str, str]] = []

    def __call__(self, job: str, phase: str, _message: str) -> None:
        with self.lock:
            self.events.append((job, phase))
            if phase == "boot":
                self.booting.add(job)
                self.peak = max(self.peak, len(self.booting))
            elif phase in ("collect", "done"):
                self.booting.discard(job)


def test_every_job_comes_back_even_when_no_guest_boots(
    tmp_path: Path, wheels: Path, fake_guest: GuestSystem
) -> None:
    watch = Watch()
    with TaskManager(
        max_vms=2,
        guest=fake_guest,
        uri=f"test://{_node_xml(tmp_path)}",
        work_dir=tmp_path / "jobs",
        find_links=[wheels],
        no_index=True,
        progress=watch,
    ) as tm:
        futures = [tm.submit(w, recipe="install-only", timeout=60) for w in sorted(wheels.glob("*.whl"))]
        results = [f.result(timeout=120) for f in futures]
    assert len(results) == 4
    for result in results:
        assert isinstance(result, RunResult)
        assert not result.ok
        (record,) = result.report.records
        assert (record.task, record.status) == ("pyti", "timeout")
        assert "PYTI-GUEST-READY" in record.stderr  # the boot error says what it waited for
        assert "download" in result.phases
    assert sorted(r.distribution for r in results) == [
        "tmdep==1.0",
        "tmhang==1.0",
        "tmok==1.0",
        "tmthird==2.0",
    ]
    assert watch.peak == 2  # two at once, never three
    assert list(tm.work_dir.iterdir()) == []  # every job's folder removed


def test_jobs_for_the_same_spec_share_one_download(
    tmp_path: Path, wheels: Path, fake_guest: GuestSystem
) -> None:
    spec = wheels / "tmok-1.0-py3-none-any.whl"
    with TaskManager(
        max_vms=2,
        guest=fake_guest,
        uri=f"test://{_node_xml(tmp_path)}",
        work_dir=tmp_path / "jobs",
        find_links=[wheels],
        no_index=True,
        keep=True,
    ) as tm:
        results = tm.run_all([spec, spec, str(spec)], recipe="install-only", timeout=60)
        needs_dep = Recipe("with-dep", (Task("install", "install"),), requirements=("tmdep",))
        other = tm.submit(spec, recipe=needs_dep).result(timeout=120)  # other requirements: its own
    assert [r.distribution for r in results] == ["tmok==1.0"] * 3
    assert other.distribution == "tmok==1.0"
    assert sorted(p.name for p in (tmp_path / "jobs" / "downloads").iterdir()) == ["0", "1"]


def test_a_failed_download_is_an_error_result_naming_the_spec(
    tmp_path: Path, fake_guest: GuestSystem
) -> None:
    with TaskManager(max_vms=1, guest=fake_guest, uri="test:///default", no_index=True) as tm:
        result = tm.submit(tmp_path / "no-such-1.0-py3-none-any.whl").result(timeout=60)
    (record,) = result.report.records
    assert record.status == "error"
    assert "no-such-1.0-py3-none-any.whl" in record.stderr
    assert result.phases == {}


def test_closing_with_cancel_reports_queued_jobs(
    tmp_path: Path, wheels: Path, fake_guest: GuestSystem
) -> None:
    slow = GuestSystem(kernel=fake_guest.kernel, initrd=fake_guest.initrd, boot_timeout=30)
    tm = TaskManager(max_vms=1, guest=slow, uri="test:///default", find_links=[wheels], no_index=True)
    futures = [tm.submit(w, recipe="install-only") for w in sorted(wheels.glob("*.whl"))[:3]]
    time.sleep(1)
    t0 = time.monotonic()
    tm.close(cancel=True)
    assert time.monotonic() - t0 < 25  # not the 30 s boot timeout of the running job
    for future in futures:
        (record,) = future.result(timeout=1).report.records
        assert record.status == "error"
        assert "closed" in record.stderr
    with pytest.raises(TaskManagerClosedError):
        tm.submit(wheels / "tmok-1.0-py3-none-any.whl")


def test_a_failing_progress_callback_loses_no_job(fake_guest: GuestSystem) -> None:
    def broken(_job: str, _phase: str, _message: str) -> None:
        raise RuntimeError("display crashed")

    with TaskManager(max_vms=1, guest=fake_guest, uri="test:///default", progress=broken) as tm:
        future = tm.submit(Path("/nonexistent/y-1-py3-none-any.whl"), recipe="install-only")
        (record,) = future.result(timeout=60).report.records
    assert record.status == "error"
    assert "y-1-py3-none-any.whl" in record.stderr


def test_bad_arguments(fake_guest: GuestSystem) -> None:
    with pytest.raises(ValueError, match="max_vms"):
        TaskManager(max_vms=0)
    with TaskManager(max_vms=1, guest=fake_guest, uri="test:///default") as tm:
        with pytest.raises(ValueError, match="timeout"):
            tm.submit("x==1", timeout=0)
        with pytest.raises(TaskError, match="unknown recipe"):
            tm.submit("x==1", recipe="nope")
        missing = Path("/nonexistent/x-1-py3-none-any.whl")
        tm.submit(missing, name="same", recipe="install-only")
        with pytest.raises(ValueError, match="already submitted"):
            tm.submit(missing, name="same", recipe="install-only")


def test_default_max_vms_follows_cores_and_memory() -> None:
    cores = os.cpu_count() or 1
    assert 1 <= default_max_vms() <= cores
    assert default_max_vms(memory_per_vm_mib=1 << 40) == 1  # memory bounds it
    assert default_max_vms(memory_per_vm_mib=1) == cores  # cores bound it


def test_failure_result_is_a_valid_report() -> None:
    from datetime import UTC, datetime

    from pyti_core.rawdata import Report

    result = failure_result("x==1", "timeout", "y" * 100_000, started=datetime.now(UTC), duration_s=-1)
    assert Report.from_json(result.report.to_json()) == result.report
    (record,) = result.report.records
    assert len(record.stderr) == 64 * 1024
    assert record.duration_s == 0


def _node_xml(tmp_path: Path) -> Path:
    """A private fake hypervisor (libvirt's test driver) with no domains."""
    node = tmp_path / "node.xml"
    node.write_text("<node><cpu><mhz>1000</mhz></cpu><memory>8388608</memory></node>")
    return node


# -- real guests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_guest() -> GuestSystem:
    if not HAVE_QEMU:
        pytest.skip("needs qemu-system-x86_64 and /dev/fuse")
    return GuestSystem.default()


@pytest.mark.e2e
@pytest.mark.qemu
def test_two_vms_at_once_one_hangs_and_is_reported_as_timeout(
    tmp_path: Path, wheels: Path, tiny_guest: GuestSystem
) -> None:
    watch = Watch()
    t0 = time.monotonic()
    with TaskManager(
        max_vms=2,
        guest=tiny_guest,
        work_dir=tmp_path / "jobs",
        find_links=[wheels],
        no_index=True,
        progress=watch,
    ) as tm:
        ok = tm.submit(
            wheels / "tmok-1.0-py3-none-any.whl",
            recipe=command_recipe("ok", "import tmok; assert tmok.X == 42"),
        )
        hang = tm.submit(
            wheels / "tmhang-1.0-py3-none-any.whl",
            recipe=command_recipe("hang", "import time; time.sleep(3600)"),
            timeout=45,
        )
        third = tm.submit(wheels / "tmthird-2.0-py3-none-any.whl", recipe="install-only")
        results = [f.result(timeout=400) for f in (ok, hang, third)]
    wall = time.monotonic() - t0
    ok_r, hang_r, third_r = results
    assert ok_r.ok, ok_r.report.to_json() + ok_r.serial_log[-3000:]
    assert [r.task for r in ok_r.report.records] == ["install", "import", "check"]
    assert ok_r.report.records[0].max_rss_kb > 0  # measured inside the guest
    assert third_r.ok, third_r.report.to_json()
    assert hang_r.timed_out
    statuses = {r.task: r.status for r in hang_r.report.records}
    assert statuses == {"install": "passed", "import": "passed", "check": "timeout"}
    assert watch.peak == 2
    for r in results:
        assert {"download", "io-disk", "boot", "tasks", "collect", "rollback"} <= set(r.phases)
    assert wall < 400
