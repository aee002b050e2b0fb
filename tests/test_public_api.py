"""Each package's public API: what ``__all__`` names exists, every error users may catch is exported
at the top, and the packages ship their ``py.typed`` marker (PEP 561)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("vmanager", "diskhandler", "pyti_core")


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist_and_errors_are_exported(name: str) -> None:
    package = importlib.import_module(name)
    assert sorted(n for n in package.__all__ if not hasattr(package, n)) == []
    errors = importlib.import_module(f"{name}.errors")
    defined = {
        n
        for n, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException | Warning)
        and obj.__module__ == errors.__name__
    }
    assert sorted(defined - set(package.__all__)) == []


@pytest.mark.parametrize("name", PACKAGES)
def test_packages_are_typed(name: str) -> None:
    package = importlib.import_module(name)
    assert (Path(package.__file__).parent / "py.typed").is_file()  # type: ignore[arg-type]


def test_disk_packages_import_without_libvirt(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['libvirt'] = None\n"
        "import diskhandler, pyti_core\n"
        "assert 'vmanager' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"
