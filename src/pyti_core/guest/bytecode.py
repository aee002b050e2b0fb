"""Byte code made on the host for the guest: pip, compiled ahead of time.

The guest runs pip straight from its wheel (a zip). Python cannot cache byte code for modules it
imports from a zip, so under TCG every pip start compiles pip's own ~500 modules again, which costs
seconds per call. :func:`compiled_pip_zip` makes a copy of the wheel with a ``.pyc`` beside every
``.py`` (unchecked hash-based, PEP 552, so time stamps do not matter); zipimport then loads the byte
code. Byte code is specific to a Python version, so this only helps a guest whose Python has the same
minor version as the host's (:func:`use_compiled_pip`); any other Python sees the wrong magic number
and falls back to the sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import marshal
import os
import shutil
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pyti_core.errors import GuestRunError
from pyti_core.guest.protocol import JOB_FILE, AgentJob

if TYPE_CHECKING:
    from pyti_core.packages import GuestTarget
    from pyti_core.tasks import GuestLayout

__all__ = ["compiled_pip_zip", "unchecked_pyc", "use_compiled_pip", "use_compiled_pip_in_job"]

#: The IO disk folder the compiled copy of pip goes to.
COMPILED_PIP_DIR: Final = "pyti"


def use_compiled_pip(target: GuestTarget) -> bool:
    """Whether byte code made here runs in a guest of ``target``: the same implementation and version.

    ``PYTI_NO_COMPILED_PIP=1`` turns it off.
    """
    if os.environ.get("PYTI_NO_COMPILED_PIP", "") not in ("", "0"):
        return False
    same_impl = getattr(target, "implementation", "cp") == "cp" and sys.implementation.name == "cpython"
    return same_impl and sys.version_info[:2] == tuple(target.python_version)


def unchecked_pyc(code: types.CodeType, source: bytes) -> bytes:
    """A PEP 552 ``.pyc`` of this Python: magic, flags 0b01 (hash-based, unchecked), source hash, code."""
    return (
        importlib.util.MAGIC_NUMBER
        + (0b01).to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyti" / "pip-compiled"


def compiled_pip_zip(wheel: Path, cache_dir: Path | None = None) -> Path:
    """A copy of the pip ``wheel`` with the byte code of every module beside it (this Python's version).

    Cached under ``cache_dir`` (default ``<user cache>/pyti/pip-compiled``) by the wheel's SHA-256 and
    the byte code's magic number; written to a temporary file and renamed, so concurrent callers never
    see half a zip. Raises :class:`~pyti_core.errors.GuestRunError` when the wheel cannot be read.
    """
    cache = cache_dir or _default_cache()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:24]
    magic = importlib.util.MAGIC_NUMBER.hex()
    target = cache / f"{wheel.stem}-{digest}-{magic}.zip"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=".pip-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp_name, "w", zipfile.ZIP_STORED) as out:
            for info in src.infolist():
                data = src.read(info)
                out.writestr(info.filename, data)
                if info.filename.endswith(".py") and not info.is_dir():
                    try:
                        code = compile(data, info.filename, "exec", dont_inherit=True)
                    except (SyntaxError, ValueError):
                        continue  # left to the source: the guest reports what is wrong
                    out.writestr(info.filename + "c", unchecked_pyc(code, data))
        os.replace(tmp_name, target)
    except (OSError, zipfile.BadZipFile) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise GuestRunError(f"{wheel}: cannot make a byte-compiled copy of pip: {exc}") from exc
    return target


def use_compiled_pip_in_job(job: AgentJob, folder: Path, pip_wheel: Path, layout: GuestLayout) -> AgentJob:
    """Point the job's pip commands at a byte-compiled copy of pip in ``folder``; rewrite its job.json.

    ``folder`` is the staged IO folder (:func:`pyti_core.tasks.stage_io_folder`).
    """
    from_wheel = layout.path(layout.wheels, pip_wheel.name, "pip")
    compiled = compiled_pip_zip(pip_wheel)
    (folder / COMPILED_PIP_DIR).mkdir(exist_ok=True)
    shutil.copyfile(compiled, folder / COMPILED_PIP_DIR / compiled.name)
    to_zip = layout.path(COMPILED_PIP_DIR, compiled.name, "pip")
    new: AgentJob = {
        **job,
        "tasks": [{**t, "argv": [to_zip if a == from_wheel else a for a in t["argv"]]} for t in job["tasks"]],
    }
    (folder / JOB_FILE).write_text(json.dumps(new, indent=2) + "\n")
    return new
