"""pyti runs end to end in a real TCG guest: the tiny Python guest, a fresh IO disk, no network.

Four guest boots in all (each ~10-40 s under TCG):

* a small package made here (with a dependency; both built locally) and one passing + one failing test,
  on a guest with a system disk: the report says exactly that, with figures measured in the guest; the
  guest sees no network interface but ``lo``; a file written on the system disk does not reach the base;
* a second run on the same system disk sees none of that file; a task killed by its own timeout, then a
  guest that hangs until the job timeout: every task is reported, none lost;
* a failing install (a dependency missing from the wheelhouse) is reported as such;
* a guest that never boots: :class:`GuestBootError` with the serial log, quickly.

pytest for the guest comes from this Python's installed pytest, repacked as wheels: no network is used.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import attrs
import pytest

from pyti_core.errors import GuestBootError, GuestImageError
from pyti_core.manager import PHASES, GuestSystem, RunResult, run, run_prepared
from pyti_core.packages import Distribution, bundled_pip_wheel, prepare_distribution
from pyti_core.tasks import RECIPES, Recipe, Task
from tests.pyti_core.test_packages import make_wheel, tiny_pair

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs"),
]

#: pytest and what it needs on a Python 3.11 guest.
PYTEST_DISTRIBUTIONS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
_SKIPPED_METADATA = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "WHEEL"}


def wheel_of_installed(name: str, out: Path) -> Path:
    """Repack the installed pure-Python distribution ``name`` as a ``py3-none-any`` wheel in ``out``.

    Only files inside site-packages are taken (no scripts, no byte code); the metadata gets a fresh
    ``WHEEL`` and ``RECORD``. Enough for pip to install it offline in the guest.
    """
    dist = importlib.metadata.distribution(name)
    meta_name = dist.metadata["Name"]
    stem = meta_name.replace("-", "_").replace(".", "_")
    info = f"{stem}-{dist.version}.dist-info"
    members: dict[str, bytes] = {}
    for file in dist.files or ():
        parts = file.parts
        if ".." in parts or "__pycache__" in parts or file.suffix == ".pyc":
            continue
        if parts[0].endswith(".dist-info"):
            if parts[-1] in _SKIPPED_METADATA:
                continue
            arcname = "/".join((info, *parts[1:]))
        else:
            arcname = "/".join(parts)
        members[arcname] = Path(str(dist.locate_file(file))).read_bytes()
    members[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: pyti-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for arcname, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{arcname},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    members[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{stem}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in members.items():
            zf.writestr(arcname, data)
    return wheel


@pytest.fixture(scope="module")
def guest() -> GuestSystem:
    try:
        return GuestSystem.default()
    except GuestImageError as exc:  # no apt / no Debian package lists on this machine
        pytest.skip(f"the tiny Python guest cannot be built here: {exc}")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A find-links folder: the wheels of pytest (from this Python) and of ``pytiny-dep``."""
    root = tmp_path_factory.mktemp("index")
    for name in PYTEST_DISTRIBUTIONS:
        wheel_of_installed(name, root / "wheels")
    _main, dep = tiny_pair(root / "projects")
    make_wheel(dep, root / "wheels")
    return root / "wheels"


@pytest.fixture(scope="module")
def system_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 system disk with an empty ext4 file system (mounted at /mnt/system in the guest)."""
    root = tmp_path_factory.mktemp("system")
    raw = root / "system.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "system", str(raw), "32M"], check=True, timeout=60)
    disk = root / "system.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True, timeout=60)
    raw.unlink()
    return disk


def _offline_tiny_distribution(tmp_path: Path, index: Path) -> Distribution:
    """The test's tiny package (with its dependency) fetched from the local index only."""
    main, _dep = tiny_pair(tmp_path / "projects")
    return prepare_distribution(
        main,
        tmp_path / "dist",
        requirements=(),
        no_index=True,
        find_links=[index],
        pip_wheel=bundled_pip_wheel(),
        build_isolation=False,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _by_task(result: RunResult) -> dict[str, object]:
    return {r.task: r for r in result.report.records}


@pytest.fixture
def phases_seen() -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    return seen


def test_a_package_with_a_dependency_one_passing_one_failing_test(
    guest: GuestSystem, index: Path, system_disk: Path, tmp_path: Path, phases_seen: list[tuple[str, str]]
) -> None:
    main, _dep = tiny_pair(tmp_path / "projects")
    base_before = _sha256(system_disk)
    recipe = Recipe(
        "e2e",
        (
            *RECIPES["default"].tasks,
            Task("network", "command", 60, argv=["ls", "/sys/class/net"]),
            Task(
                "system-disk",
                "command",
                60,
                argv=["sh", "-c", "grep ' /mnt/system ' /proc/mounts && echo dirty > /mnt/system/leftover"],
            ),
        ),
        RECIPES["default"].requirements,
    )
    result = run(
        main,
        recipe=recipe,
        timeout=300,
        guest=attrs.evolve(guest, system_disk=system_disk),
        work_dir=tmp_path / "work",
        find_links=[index],
        no_index=True,
        progress=lambda phase, message: phases_seen.append((phase, message)),
    )
    print("phases:", {k: round(v, 2) for k, v in result.phases.items()})
    records = result.report.records
    # pytest is preinstalled in the guest: no install-requirements task
    assert guest.recipe_for(recipe).requirements == ()
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "passed"),
        ("pytest", "failed"),
        ("network", "passed"),
        ("system-disk", "passed"),
    ], "\n".join(f"{r.task}: {r.stderr[-2000:]}" for r in records if not r.ok)
    pytest_record = records[2]
    assert pytest_record.tests is not None
    assert pytest_record.tests.to_dict() == {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}
    assert "test_wrong" in pytest_record.stdout
    assert pytest_record.exit_code == 1
    # figures measured in the guest, plausible for a Python process under TCG
    for record in records[:3]:
        assert 0.05 < record.duration_s < 300, record
        assert 5_000 < record.max_rss_kb < 400_000, record  # KiB: a Python, not nothing, not the guest RAM
        assert 0.0 < record.cpu_user_s + record.cpu_system_s < record.duration_s * 1.5 + 1, record
    assert pytest_record.started_at.tzinfo is not None
    # no network interface in the guest but the loopback
    assert records[3].stdout.split() == ["lo"]
    # the system disk was mounted and written in the guest ...
    assert "/dev/vda /mnt/system ext4 rw" in records[4].stdout
    # ... through a throwaway overlay: the base is untouched and the run left nothing behind
    assert _sha256(system_disk) == base_before
    assert list((tmp_path / "work").iterdir()) == []
    assert result.work_dir is None
    assert result.distribution == "pytiny==0.3" == result.report.distribution
    assert not result.ok
    assert not result.timed_out
    assert tuple(result.phases) == PHASES
    assert all(v >= 0 for v in result.phases.values())
    assert "PYTI-GUEST-READY" in result.serial_log
    env = result.report.environment  # measured in the guest: Debian 12's Python, busybox's /init
    assert env is not None
    assert (env.implementation, env.python_version[:5], env.os_version, env.init) == (
        "cpython",
        "3.11.",
        "12",
        "init",
    )
    assert all(r.environment == env for r in records)
    assert [p for p, _ in phases_seen] == sorted((p for p, _ in phases_seen), key=PHASES.index)
    assert set(PHASES) <= {p for p, _ in phases_seen}


def test_task_timeout_and_job_timeout_lose_no_task(
    guest: GuestSystem, index: Path, system_disk: Path, tmp_path: Path
) -> None:
    dist = _offline_tiny_distribution(tmp_path, index)
    recipe = Recipe(
        "hangs",
        (
            Task(
                "clean", "command", 60, argv=["sh", "-c", "ls -a /mnt/system; test ! -e /mnt/system/leftover"]
            ),
            Task("short-hang", "command", 3, argv=["sleep", "1000"]),
            Task("long-hang", "command", 900, argv=["sleep", "1000"]),
            Task("never-started", "command", 60, argv=["true"]),
        ),
    )
    job_timeout = 25.0
    started = time.monotonic()
    result = run_prepared(
        dist,
        recipe,
        guest=attrs.evolve(guest, system_disk=system_disk),
        timeout=job_timeout,
        work_dir=tmp_path / "run",
        uri=None,
        progress=None,
    )
    elapsed = time.monotonic() - started
    assert elapsed < job_timeout + 30  # stopped at the job timeout, not at the task's 900 s
    by_task = _by_task(result)
    assert [(r.task, r.status) for r in result.report.records] == [
        ("clean", "passed"),  # the first run's leftover went with its overlay
        ("short-hang", "timeout"),
        ("long-hang", "timeout"),
        ("never-started", "timeout"),
    ], by_task
    short = result.report.records[1]
    assert 2.5 < short.duration_s < 30
    assert short.exit_code is None
    assert "killed after the 3 s timeout" in short.stderr
    long = result.report.records[2]
    assert "ran out while this task ran" in long.stderr
    assert 3.0 < long.duration_s < job_timeout  # from the end of short-hang until the host stopped the VM
    assert long.started_at >= short.started_at
    assert "before this task started" in result.report.records[3].stderr
    assert result.timed_out
    assert not result.ok
    assert (tmp_path / "run" / "serial.log").is_file()


def test_a_failing_install_is_reported(guest: GuestSystem, index: Path, tmp_path: Path) -> None:
    dist = _offline_tiny_distribution(tmp_path, index)
    # The dependency goes missing from the guest's wheelhouse: pip in the guest cannot install.
    wheels = tuple(w for w in dist.wheels if not w.name.startswith("pytiny_dep-"))
    assert len(wheels) == len(dist.wheels) - 1
    for wheel in set(dist.wheels) - set(wheels):
        wheel.unlink()
    broken = attrs.evolve(dist, wheels=wheels)
    result = run_prepared(
        broken,
        RECIPES["install-only"],
        guest=guest,
        timeout=240,
        work_dir=tmp_path / "run",
        uri=None,
        progress=None,
    )
    assert [(r.task, r.status) for r in result.report.records] == [("install", "failed")]
    install = result.report.records[0]
    assert install.exit_code not in (0, None)
    assert "pytiny-dep" in install.stderr or "pytiny_dep" in install.stderr
    assert "PYTI-RUN-EXIT 1" in result.serial_log  # the agent ran and said it failed
    assert not result.ok
    assert not result.timed_out


def test_a_guest_that_never_boots_is_a_boot_error_with_its_serial_log(
    guest: GuestSystem, index: Path, tmp_path: Path
) -> None:
    bogus = tmp_path / "bogus-initrd.img"
    bogus.write_bytes(b"not an initramfs\n" * 4096)
    broken = attrs.evolve(guest, initrd=bogus, boot_timeout=8.0)
    dist = _offline_tiny_distribution(tmp_path, index)
    started = time.monotonic()
    with pytest.raises(GuestBootError) as info:
        run_prepared(
            dist,
            RECIPES["install-only"],
            guest=broken,
            timeout=300,
            work_dir=tmp_path / "run",
            uri=None,
            progress=None,
        )
    assert time.monotonic() - started < 40
    error = info.value
    assert isinstance(error, TimeoutError)
    assert "PYTI-GUEST-READY" in str(error)
    assert "Kernel panic" in error.serial_log
    assert "--- serial console (last lines) ---" in str(error)
    assert "Kernel panic" in str(error)
    assert error.timeout == 8.0
    assert error.vm.startswith("pyti-pytiny-")
