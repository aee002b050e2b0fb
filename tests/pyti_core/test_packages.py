"""packages: guest tags, wheel metadata, safe sdist unpacking, and resolution with real pip.

Every test builds its tiny projects here with an in-tree PEP 517 backend (no setuptools, no network) and
resolves them with ``pip --no-index --find-links``; one test downloads from PyPI (skipped when
``PYTI_OFFLINE=1``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from pyti_core.errors import PackageError, UnsafeArchiveError
from pyti_core.packages import (
    DEBIAN_12,
    GuestTarget,
    bundled_pip_wheel,
    import_names_of_wheel,
    normalize_name,
    prepare_distribution,
    unpack_sdist,
    wheel_metadata,
)

# An in-tree PEP 517 backend: builds the wheel described by tiny.json with zipfile only.
BACKEND = textwrap.dedent(
    """
    import base64, hashlib, json, os, tarfile, zipfile

    def _meta():
        with open("tiny.json") as f:
            return json.load(f)

    def write_wheel(out_dir, meta, root="."):
        name, version = meta["name"], meta["version"]
        stem = name.replace("-", "_")
        tag = meta.get("tag", "py3-none-any")
        filename = f"{stem}-{version}-{tag}.whl"
        info = f"{stem}-{version}.dist-info"
        files = {}
        for package in meta["packages"]:
            for dirpath, _, names in os.walk(os.path.join(root, package)):
                for n in sorted(names):
                    if n.endswith(".py"):
                        path = os.path.join(dirpath, n)
                        with open(path, "rb") as f:
                            files[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
        metadata = f"Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n"
        metadata += "".join(f"Requires-Dist: {r}\\n" for r in meta.get("requires", []))
        files[f"{info}/METADATA"] = metadata.encode()
        purelib = "true" if tag.endswith("-none-any") else "false"
        files[f"{info}/WHEEL"] = (
            f"Wheel-Version: 1.0\\nGenerator: tiny\\nRoot-Is-Purelib: {purelib}\\nTag: {tag}\\n"
        ).encode()
        if meta.get("top_level"):
            files[f"{info}/top_level.txt"] = "".join(t + "\\n" for t in meta["top_level"]).encode()
        record = []
        for path, data in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        files[f"{info}/RECORD"] = ("\\n".join(record) + "\\n").encode()
        with zipfile.ZipFile(os.path.join(out_dir, filename), "w") as zf:
            for path, data in files.items():
                zf.writestr(path, data)
        return filename

    def get_requires_for_build_wheel(config_settings=None):
        return []

    def get_requires_for_build_sdist(config_settings=None):
        return []

    def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
        return write_wheel(wheel_directory, _meta())
    """
)

PYPROJECT = textwrap.dedent(
    """
    [build-system]
    requires = []
    build-backend = "tinybackend"
    backend-path = ["."]
    """
)


def make_project(root: Path, name: str, version: str, files: dict[str, str], **meta: Any) -> Path:
    """A project folder with the tiny backend: ``files`` relative paths -> text; packages from ``meta``."""
    project = root / f"{name}-{version}"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "tinybackend.py").write_text(BACKEND)
    packages = meta.pop("packages", sorted({p.split("/")[0] for p in files if "/" in p and p[0] != "t"}))
    (project / "tiny.json").write_text(
        json.dumps({"name": name, "version": version, "packages": packages, **meta})
    )
    for rel, text in files.items():
        path = project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return project


def make_sdist(project: Path, out: Path) -> Path:
    """``project`` as a ``.tar.gz`` sdist (top folder ``name-version``) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    sdist = out / f"{project.name}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(project, arcname=project.name)
    return sdist


def make_wheel(project: Path, out: Path) -> Path:
    """Build ``project``'s wheel in-process with the tiny backend."""
    out.mkdir(parents=True, exist_ok=True)
    namespace: dict[str, Any] = {}
    exec(BACKEND, namespace)
    meta = json.loads((project / "tiny.json").read_text())
    filename: str = namespace["write_wheel"](str(out), meta, str(project))
    return out / filename


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """``pytiny`` (one passing, one failing test) and its dependency ``pytiny-dep``: the two projects."""
    dep = make_project(root, "pytiny-dep", "1.0", {"pytiny_dep/__init__.py": "def base():\n    return 2\n"})
    main = make_project(
        root,
        "pytiny",
        "0.3",
        {
            "pytiny/__init__.py": "from pytiny_dep import base\n\ndef double(x):\n    return x * base()\n",
            "pytiny/extra.py": "VALUE = 1\n",
            "tests/test_tiny.py": """
                import pytiny

                def test_double():
                    assert pytiny.double(2) == 4

                def test_wrong():
                    assert pytiny.double(2) == 5
                """,
        },
        packages=["pytiny"],
        requires=["pytiny-dep>=1.0"],
    )
    return main, dep


@pytest.fixture(scope="session")
def pip_wheel() -> Path:
    wheel = bundled_pip_wheel()
    if wheel is None:
        pytest.skip("this Python has no ensurepip-bundled pip wheel")
    return wheel


# -- tags and metadata --------------------------------------------------------------------------------


def test_debian12_platforms_cover_every_manylinux_up_to_glibc_2_36() -> None:
    plats = DEBIAN_12.platforms()
    assert plats[0] == "manylinux_2_36_x86_64"
    assert plats[-1] == "linux_x86_64"
    for tag in ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"):
        assert tag in plats
    assert "manylinux_2_37_x86_64" not in plats
    opts = DEBIAN_12.pip_options()
    assert opts[opts.index("--python-version") + 1] == "3.11"
    assert [opts[i + 1] for i, o in enumerate(opts) if o == "--abi"] == ["cp311", "abi3", "none"]
    assert "--only-binary=:all:" in opts


@pytest.mark.parametrize(
    ("wheel", "ok"),
    [
        ("attrs-23.2.0-py3-none-any.whl", True),
        ("six-1.16.0-py2.py3-none-any.whl", True),
        ("numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
        ("numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", False),
        ("cryptography-42.0.5-cp39-abi3-manylinux_2_28_x86_64.whl", True),
        ("x-1.0-cp311-cp311-manylinux_2_38_x86_64.whl", False),  # newer glibc than the guest's
        ("x-1.0-cp311-cp311-musllinux_1_1_x86_64.whl", False),
        ("x-1.0-cp311-cp311-manylinux_2_17_aarch64.whl", False),
        ("x-1.0-py312-none-any.whl", False),
        ("x-1.0-1build-py3-none-any.whl", True),
        ("not-a-wheel.tar.gz", False),
    ],
)
def test_target_supports(wheel: str, ok: bool) -> None:
    assert DEBIAN_12.supports(wheel) is ok


def test_other_targets() -> None:
    old = GuestTarget(python_version=(3, 9), glibc=(2, 31))
    assert old.supports("x-1-cp39-cp39-manylinux_2_31_x86_64.whl")
    assert not old.supports("x-1-cp39-cp39-manylinux_2_36_x86_64.whl")
    assert not old.supports("x-1-py310-none-any.whl")


def test_normalize_name() -> None:
    assert normalize_name("Zope.Interface__x") == "zope-interface-x"


def test_wheel_metadata_and_import_names(tmp_path: Path) -> None:
    main, _ = tiny_pair(tmp_path)
    wheel = make_wheel(main, tmp_path / "w")
    assert wheel_metadata(wheel) == ("pytiny", "0.3")
    assert import_names_of_wheel(wheel) == ("pytiny",)  # from RECORD
    other = make_project(
        tmp_path, "other", "1", {"a/__init__.py": "", "b.py": ""}, packages=["a"], top_level=["a", "bad-name"]
    )
    assert import_names_of_wheel(make_wheel(other, tmp_path / "w")) == ("a",)  # from top_level.txt


def test_not_a_wheel(tmp_path: Path) -> None:
    bogus = tmp_path / "x-1-py3-none-any.whl"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(PackageError, match="cannot read the wheel"):
        wheel_metadata(bogus)
    with zipfile.ZipFile(bogus, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with pytest.raises(PackageError, match=r"no \*\.dist-info/METADATA"):
        wheel_metadata(bogus)


# -- sdists ---------------------------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_unpack_sdist_returns_its_top_folder(tmp_path: Path) -> None:
    main, _ = tiny_pair(tmp_path)
    top = unpack_sdist(make_sdist(main, tmp_path / "sd"), tmp_path / "out")
    assert top == tmp_path / "out" / "pytiny-0.3"
    assert (top / "tests" / "test_tiny.py").is_file()


@pytest.mark.parametrize("name", ["../evil.py", "/abs/evil.py", "pkg/../../evil.py"])
def test_unpack_refuses_paths_outside(tmp_path: Path, name: str) -> None:
    tar = _tar(tmp_path / "bad.tar.gz", [(tarfile.TarInfo(name), b"x")])
    with pytest.raises(UnsafeArchiveError, match="outside"):
        unpack_sdist(tar, tmp_path / "out")
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr(name, "x")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        unpack_sdist(zpath, tmp_path / "out2")
    assert not (tmp_path / "evil.py").exists()


def test_unpack_refuses_a_symlink_out(tmp_path: Path) -> None:
    link = tarfile.TarInfo("pkg/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    tar = _tar(tmp_path / "bad.tar.gz", [(link, b"")])
    with pytest.raises(UnsafeArchiveError, match="unsafe member"):
        unpack_sdist(tar, tmp_path / "out")


def test_unpack_refuses_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(PackageError, match="not a readable sdist"):
        unpack_sdist(bad, tmp_path / "out")


# -- pip --------------------------------------------------------------------------------------------------


def test_pip_runs_from_its_wheel_file(pip_wheel: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(pip_wheel / "pip"), "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("pip ")
    assert str(pip_wheel) in out.stdout


def test_prepare_a_project_folder_with_an_sdist_only_dependency(tmp_path: Path, pip_wheel: Path) -> None:
    main, dep = tiny_pair(tmp_path / "projects")
    index = tmp_path / "index"
    make_sdist(dep, index)  # no wheel: pyti must build one on the host
    dist = prepare_distribution(
        main,
        tmp_path / "out",
        requirements=(),
        no_index=True,
        find_links=[index],
        pip_wheel=pip_wheel,
        build_isolation=False,
    )
    assert (dist.name, dist.version, dist.requirement) == ("pytiny", "0.3", "pytiny==0.3")
    assert dist.sources == main
    assert dist.import_names == ("pytiny",)
    names = sorted(p.name for p in dist.wheels)
    assert names == [pip_wheel.name, "pytiny-0.3-py3-none-any.whl", "pytiny_dep-1.0-py3-none-any.whl"]
    assert all(p.parent == dist.wheelhouse and p.is_file() for p in dist.wheels)
    assert dist.pip_wheel.name == pip_wheel.name


def test_prepare_an_sdist_and_a_wheel(tmp_path: Path, pip_wheel: Path) -> None:
    main, dep = tiny_pair(tmp_path / "projects")
    index = tmp_path / "index"
    make_wheel(dep, index)
    kw: dict[str, Any] = {"requirements": (), "no_index": True, "find_links": [index], "pip_wheel": pip_wheel}
    from_sdist = prepare_distribution(make_sdist(main, tmp_path / "sd"), tmp_path / "a", **kw)
    assert from_sdist.sources == tmp_path / "a" / "src" / "pytiny-0.3"
    assert (from_sdist.sources / "tests" / "test_tiny.py").is_file()
    from_wheel = prepare_distribution(make_wheel(main, tmp_path / "wh"), tmp_path / "b", **kw)
    assert from_wheel.sources is None
    assert from_wheel.requirement == "pytiny==0.3"
    # a second run in the same folder works and finds the same files
    again = prepare_distribution(make_wheel(main, tmp_path / "wh"), tmp_path / "b", **kw)
    assert again.wheels == from_wheel.wheels


def test_a_compiled_sdist_only_dependency_is_built_in_the_guest(tmp_path: Path, pip_wheel: Path) -> None:
    """Its sdist builds a wheel that fits only the host: the sdist itself goes to the guest."""
    main, _ = tiny_pair(tmp_path / "projects")
    compiled = make_project(
        tmp_path / "c", "pytiny-dep", "1.0", {"pytiny_dep/__init__.py": ""}, tag="cp311-cp311-linux_x86_64"
    )
    index = tmp_path / "index"
    make_sdist(compiled, index)
    dist = prepare_distribution(
        main,
        tmp_path / "out",
        requirements=(),
        no_index=True,
        find_links=[index],
        pip_wheel=pip_wheel,
        build_isolation=False,
    )
    names = sorted(p.name for p in dist.wheels)
    assert "pytiny-dep-1.0.tar.gz" in names
    assert not [n for n in names if n.startswith("pytiny_dep")]  # no host wheel, no stand-in
    assert (dist.wheelhouse / "pytiny-dep-1.0.tar.gz").is_file()
    assert dist.name == "pytiny"


def test_a_missing_dependency_names_it_with_pip_stderr(tmp_path: Path, pip_wheel: Path) -> None:
    main, _ = tiny_pair(tmp_path / "projects")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="pytiny-dep") as info:
        prepare_distribution(
            main,
            tmp_path / "out",
            requirements=(),
            no_index=True,
            find_links=[tmp_path / "empty"],
            pip_wheel=pip_wheel,
            build_isolation=False,
        )
    assert "no sdist either" in str(info.value)
    assert "No matching distribution" in info.value.stderr
    assert info.value.command[:3] == (sys.executable, "-m", "pip")


def test_prepare_a_requirement_from_an_index_folder(tmp_path: Path, pip_wheel: Path) -> None:
    main, dep = tiny_pair(tmp_path / "projects")
    index = tmp_path / "index"
    make_wheel(main, index)
    make_wheel(dep, index)
    kw: dict[str, Any] = {"requirements": (), "no_index": True, "find_links": [index], "pip_wheel": pip_wheel}
    dist = prepare_distribution("PyTiny[Fast]>=0.1", tmp_path / "a", **kw)
    assert (dist.requirement, dist.extras, dist.sources) == ("pytiny[fast]==0.3", ("fast",), None)
    make_sdist(main, index)  # now its tests can be fetched too
    dist = prepare_distribution("pytiny", tmp_path / "b", **kw)
    assert dist.sources == tmp_path / "b" / "src" / "pytiny-0.3"
    assert (dist.sources / "tests" / "test_tiny.py").is_file()
    assert dist.wheel.name == "pytiny-0.3-py3-none-any.whl"  # the wheel, not a build of the sdist


@pytest.mark.parametrize("spec", ["-r requirements.txt", "--index-url=http://evil", "", "!!"])
def test_bad_specs_are_refused_before_pip_runs(tmp_path: Path, spec: str) -> None:
    with pytest.raises(PackageError, match="not a requirement"):
        prepare_distribution(spec, tmp_path / "out")


@pytest.mark.parametrize("spec", ["missing-1.0-py3-none-any.whl", "gone-1.0.tar.gz"])
@pytest.mark.parametrize("as_path", [True, False])
def test_a_missing_file_is_named_before_pip_runs(tmp_path: Path, spec: str, as_path: bool) -> None:
    target = tmp_path / spec
    with pytest.raises(PackageError, match=f"{spec}: no such file or folder"):
        prepare_distribution(target if as_path else str(target), tmp_path / "out")


def test_a_wheel_for_another_platform_is_refused(tmp_path: Path, pip_wheel: Path) -> None:
    project = make_project(
        tmp_path, "arm", "1", {"arm/__init__.py": ""}, tag="cp311-cp311-manylinux_2_17_aarch64"
    )
    with pytest.raises(PackageError, match="does not install on the guest"):
        prepare_distribution(make_wheel(project, tmp_path / "w"), tmp_path / "out", pip_wheel=pip_wheel)


@pytest.mark.skipif(os.environ.get("PYTI_OFFLINE") == "1", reason="PYTI_OFFLINE=1: no PyPI")
def test_network_download_for_the_guest_from_pypi(tmp_path: Path, pip_wheel: Path) -> None:
    """The only test that reaches PyPI: one small wheel, its sdist, for CPython 3.11 on glibc 2.36."""
    dist = prepare_distribution(
        "six==1.16.0", tmp_path / "out", requirements=(), pip_wheel=pip_wheel, cache_dir=tmp_path / "cache"
    )
    assert (dist.name, dist.version, dist.import_names) == ("six", "1.16.0", ("six",))
    assert dist.wheel.name == "six-1.16.0-py2.py3-none-any.whl"
    assert dist.sources is not None
    assert (dist.sources / "test_six.py").is_file()
