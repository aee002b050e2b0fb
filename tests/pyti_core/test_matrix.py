"""The matrix: one `pyti run` across tiny guests with CPython 3.9 to 3.14 and PyPy, each from its own
Debian suite; bad --python values; the private apt state; wheels resolved for each guest's Python."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import attrs
import pytest

from pyti_core.cli import EXIT_FAILED, EXIT_USAGE, main
from pyti_core.errors import GuestImageError
from pyti_core.guest import tinylinux
from pyti_core.guest.debian import Archive
from pyti_core.manager import GuestSystem
from pyti_core.packages import GuestTarget, prepare_distribution
from pyti_core.rawdata import Report
from pyti_core.tasks import RECIPES
from tests.pyti_core.test_packages import make_project, make_wheel

ALL = ("3.9", "3.11", "3.13", "3.14", "pypy3")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2.7", "3.9,jython", "3.12", ","])
def test_an_unknown_python_is_a_usage_error_listing_the_choices(value: str) -> None:
    for command in (["run", "six==1.16.0"], ["image", "build"]):
        code, out, err = run_cli(*command, "--python", value)
        assert code == EXIT_USAGE
        assert out == ""
        assert "choose from 3.9, 3.11, 3.13, 3.14, pypy3" in err
    with pytest.raises(ValueError, match=re.escape("choose from 3.9, 3.11, 3.13, 3.14, pypy3")):
        GuestSystem.for_python("2.7")


def test_python_and_guest_do_not_go_together(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"")
    code, _out, err = run_cli("run", "six==1.16.0", "--python", "3.9", "--guest", str(disk))
    assert code == EXIT_USAGE
    assert "--python" in err
    assert "--guest" in err


# -- Debian through a private apt state ------------------------------------------------------------------


def _host_lists() -> list[tuple[str, int]]:
    lists = Path("/var/lib/apt/lists")
    return sorted((p.name, p.stat().st_mtime_ns) for p in lists.iterdir()) if lists.is_dir() else []


def test_the_private_archive_leaves_the_hosts_apt_alone(tmp_path: Path) -> None:
    before = _host_lists()
    archive = Archive(tmp_path / "apt", "bookworm")
    try:
        archive.update()
    except GuestImageError as exc:
        pytest.skip(f"Debian's archive is not reachable here: {exc}")
    source = (tmp_path / "apt/bookworm/sources.list").read_text()
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert source == f"deb [signed-by={keyring}] http://deb.debian.org/debian bookworm main\n"
    closure = archive.closure(["python3.11-minimal"], exclude=["tzdata"])
    assert closure["python3.11-minimal"].startswith("3.11.")
    assert "libc6" in closure
    assert "tzdata" not in closure
    assert archive.update() is False  # fresh lists are not fetched again
    assert _host_lists() == before
    with pytest.raises(GuestImageError, match="Debian bookworm has no package no-such-package"):
        archive.closure(["no-such-package"])


def test_an_unreachable_suite_is_named_and_a_cached_build_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTI_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    with pytest.raises(
        GuestImageError, match=re.escape("Debian bullseye cannot be reached at http://127.0.0.1:9/debian")
    ):
        Archive(tmp_path / "apt", "bullseye", mirror="http://127.0.0.1:9/debian").update()
    with pytest.raises(GuestImageError, match="Debian bookworm cannot be reached"):
        tinylinux.build_tiny_linux(tmp_path / "empty", python="3.9")
    # a cache holding a build for these options: it is used, offline
    cached = _cached_guest("3.9")
    cache = tmp_path / "cache"
    shutil.copytree(cached.kernel.parent, cache / cached.kernel.parent.name)
    again = tinylinux.build_tiny_linux(cache, python="3.9")
    assert again.initrd.read_bytes() == cached.initrd.read_bytes()
    assert again.interpreter == "3.9"


def _cached_guest(name: str) -> tinylinux.TinyLinux:
    try:
        return tinylinux.build_tiny_linux(python=name)
    except GuestImageError as exc:
        pytest.skip(f"the {name} guest cannot be built here: {exc}")


# -- wheels for each guest's Python ----------------------------------------------------------------------


def test_conditional_dependencies_are_evaluated_for_the_guest(tmp_path: Path) -> None:
    """pip evaluates markers for the host's Python; pyti fetches what the guest's Python needs."""
    index = tmp_path / "index"
    backport = make_project(tmp_path / "p", "backport", "1.0", {"backport/__init__.py": ""})
    make_wheel(backport, index)
    main_project = make_project(
        tmp_path / "p", "needsbackport", "1.0", {"needsbackport/__init__.py": ""},
        packages=["needsbackport"], requires=['backport>=1; python_version < "3.10"'],
    )  # fmt: skip
    for version, expected in (((3, 9), True), ((3, 13), False)):
        dist = prepare_distribution(
            main_project, tmp_path / f"d{version[1]}", requirements=(), no_index=True, find_links=[index],
            target=GuestTarget(python_version=version), sources=False, build_isolation=False,
            pip_wheel=_any_pip(tmp_path),
        )  # fmt: skip
        names = {w.name.split("-")[0] for w in dist.wheels}
        assert ("backport" in names) is expected, (version, names)


def _any_pip(tmp_path: Path) -> Path:
    wheel = tmp_path / "pip-99.0-py3-none-any.whl"
    if not wheel.exists():
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pip/__init__.py", "")
            zf.writestr("pip-99.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: pip\nVersion: 99.0\n")
    return wheel


def test_pypy_targets_select_pypy_wheels() -> None:
    pypy = GuestTarget(python_version=(3, 9), glibc=(2, 36), implementation="pp", abi="pypy39_pp73")
    assert pypy.python_tag == "pp39"
    assert pypy.supports("x-1-pp39-pypy39_pp73-manylinux_2_17_x86_64.whl")
    assert pypy.supports("x-1-py3-none-any.whl")
    assert not pypy.supports("x-1-cp39-cp39-manylinux_2_17_x86_64.whl")
    assert not pypy.supports("x-1-cp39-abi3-manylinux_2_17_x86_64.whl")
    opts = pypy.pip_options()
    assert opts[opts.index("--implementation") + 1] == "pp"
    assert "pypy39_pp73" in opts
    assert "abi3" not in opts
    assert pypy.marker_environment()["implementation_name"] == "pypy"
    old = GuestTarget(python_version=(3, 9), glibc=(2, 31))
    assert "manylinux_2_31_x86_64" in old.platforms()
    assert "manylinux_2_34_x86_64" not in old.platforms()
    assert not old.supports("x-1-cp39-cp39-manylinux_2_34_x86_64.whl")


def test_preinstalled_tooling_is_not_fetched_again_unless_it_differs() -> None:
    guest = GuestSystem(kernel=Path("k"), preinstalled={"pytest": "8.4.2", "pluggy": "1.6.0"})
    default = RECIPES["default"]
    assert guest.recipe_for(default).requirements == ()
    custom = default.__class__("custom", default.tasks, ("pytest>=9", "pytest-timeout", "pluggy"))
    assert guest.recipe_for(custom).requirements == ("pytest>=9", "pytest-timeout")
    assert GuestSystem(kernel=Path("k")).recipe_for(default) == default


# -- the matrix in real guests ---------------------------------------------------------------------------

NEEDS_310 = """
import platform
import sys


def test_needs_310():
    assert sys.version_info >= (3, 10), "this package needs Python 3.10"


def test_compiled_dependency_is_used_on_cpython():
    import charset_normalizer.md as md

    if platform.python_implementation() == "CPython":
        assert md.__file__.endswith(".so"), md.__file__
"""


@pytest.mark.e2e
@pytest.mark.qemu
def test_one_run_across_every_guest(tmp_path: Path) -> None:
    """3.11, 3.13 and 3.14 pass; 3.9 and PyPy (a 3.9) fail the test that needs 3.10; the compiled
    (manylinux) dependency installs and imports everywhere: all in one `pyti run`, two VMs at once."""
    for name in ALL:
        _cached_guest(name)
    project = make_project(
        tmp_path / "projects",
        "needs310",
        "1.0",
        {"needs310/__init__.py": "import charset_normalizer\n", "tests/test_needs310.py": NEEDS_310},
        packages=["needs310"],
        requires=["charset-normalizer>=3.4"],
    )
    reports = tmp_path / "reports"
    code, out, err = run_cli(
        "run", str(project), "--python", ",".join(ALL), "--max-vms", "2", "--report", str(reports),
        "--plain", "--timeout", "900",
    )  # fmt: skip
    print(out, err[-3000:])
    assert code == EXIT_FAILED
    lines = out.splitlines()
    assert lines[1].split() == ["task", *ALL]
    rows = {line.split()[0]: line for line in lines[2:6]}
    assert rows["install"].split() == ["install", *["passed"] * 5]
    assert rows["import"].split() == ["import", *["passed"] * 5]
    assert "result: FAILED in 2 of 5 runs (3.9, pypy3)" in out
    by_name = {p.name: Report.from_json(p.read_text()) for p in reports.iterdir()}
    assert sorted(by_name) == sorted(
        f"needs310-1.0-{'pypy3' if n == 'pypy3' else 'py' + n}.json" for n in ALL
    )
    expected = {
        "3.9": ("cpython", "3.9.", "11", False),
        "3.11": ("cpython", "3.11.", "12", True),
        "3.13": ("cpython", "3.13.", "13", True),
        "3.14": ("cpython", "3.14.", "", True),
        "pypy3": ("pypy", "3.9.", "12", False),
    }
    for name, (impl, version, os_version, ok) in expected.items():
        file = f"needs310-1.0-{'pypy3' if name == 'pypy3' else 'py' + name}.json"
        report = by_name[file]
        env = report.environment
        assert env is not None, name
        assert (env.implementation, env.python_version[: len(version)]) == (impl, version), env
        assert env.os_name == "Debian GNU/Linux"
        if os_version:
            assert env.os_version == os_version
        assert env.init == "init"
        assert env.accelerator in ("tcg", "kvm")
        assert env.memory_mib > 0
        assert env.cpus == 1
        assert all(r.environment == env for r in report.records)
        pytest_record = next(r for r in report.records if r.task == "pytest")
        assert pytest_record.tests is not None
        assert (pytest_record.tests.passed, pytest_record.tests.failed) == ((2, 0) if ok else (1, 1)), name
        raw = json.loads(
            (reports / f"needs310-1.0-{'pypy3' if name == 'pypy3' else 'py' + name}.json").read_text()
        )
        assert next(iter(raw)) == "distribution"
        assert list(raw)[1] == "environment"


# -- no wheel for the guest, only an sdist ----------------------------------------------------------------

CEXT_SETUP = """
from setuptools import Extension, setup

setup(name="cext", version="1.0", ext_modules=[Extension("cext", ["cext.c"])])
"""
CEXT_C = """
#include <Python.h>
static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "cext", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_cext(void) { return PyModule_Create(&m); }
"""


@pytest.mark.skipif(
    shutil.which("gcc") is None, reason="the host builds the sdist once to learn its metadata"
)
def test_a_compiled_sdist_goes_to_the_guest_with_its_build_requirements(tmp_path: Path) -> None:
    from tests.pyti_core.test_packages import make_sdist

    index = tmp_path / "index"
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "-d", str(index),
         "setuptools>=70.1,<76", "wheel"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if got.returncode != 0:
        pytest.skip(f"setuptools cannot be fetched from PyPI here: {got.stderr[-300:]}")
    cext = tmp_path / "src" / "cext-1.0"
    cext.mkdir(parents=True)
    (cext / "setup.py").write_text(CEXT_SETUP)
    (cext / "cext.c").write_text(CEXT_C)
    (cext / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    make_sdist(cext, index)
    main_project = make_project(
        tmp_path / "p", "usescext", "1.0", {"usescext/__init__.py": "import cext\n"},
        packages=["usescext"], requires=["cext"],
    )  # fmt: skip
    dist = prepare_distribution(
        main_project, tmp_path / "d", requirements=(), no_index=True, find_links=[index],
        target=GuestTarget(python_version=(3, 9), glibc=(2, 31)), pip_wheel=_any_pip(tmp_path),
    )  # fmt: skip
    names = sorted(p.name for p in dist.wheels)
    assert "cext-1.0.tar.gz" in names  # the guest builds it
    assert not any(
        n.startswith("cext-") and n.endswith(".whl") for n in names
    )  # no host-built or stand-in wheel
    assert any(n.startswith("setuptools-") for n in names)  # its build requirement, for an offline build
    assert all((dist.wheelhouse / n).is_file() for n in names)


def test_an_install_that_needs_a_compiler_says_so_plainly(tmp_path: Path) -> None:
    from pyti_core.manager import _explain_missing_compiler
    from pyti_core.packages import Distribution
    from tests.pyti_core.test_tables import rec

    wheelhouse = tmp_path / "wheels"
    dist = Distribution(
        name="usescext", version="1.0", wheel=wheelhouse / "usescext-1.0-py3-none-any.whl",
        wheels=(wheelhouse / "usescext-1.0-py3-none-any.whl", wheelhouse / "cext-1.0.tar.gz"),
        pip_wheel=wheelhouse / "pip-1-py3-none-any.whl", wheelhouse=wheelhouse, sources=None, import_names=(),
    )  # fmt: skip
    gcc = (
        "building 'cext' extension\nerror: command 'x86_64-linux-gnu-gcc' failed: No such file or directory\n"
    )
    failed = rec("install", "failed", stderr=gcc)
    other = rec("install", "failed", stderr="ERROR: No matching distribution found for nothing")
    passed = rec("pytest", "failed", stderr=gcc)  # not an install
    out = _explain_missing_compiler([failed, other, passed], dist)
    assert out[0].stderr.startswith("[pyti: cext-1.0.tar.gz has no wheel for this guest's Python")
    assert "needs a C compiler, which the tiny guest does not have" in out[0].stderr
    assert out[0].stderr.endswith(gcc)
    assert out[1:] == [other, passed]
    # without an sdist in the wheelhouse the guest built nothing: nothing is added
    assert _explain_missing_compiler([failed], attrs.evolve(dist, wheels=dist.wheels[:1])) == [failed]
