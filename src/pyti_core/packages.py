"""Everything the guest needs to install and test a distribution, fetched on the host.

The guest has no network, so the host (which can reach PyPI) resolves the distribution and all its
dependencies *for the guest's Python and platform* with ``pip download`` and puts the wheels in one
folder, the wheelhouse, which goes onto the IO disk::

    dist = prepare_distribution("attrs==23.2.0", Path("work/attrs"), requirements=["pytest"])
    dist.name, dist.version     # 'attrs', '23.2.0'
    dist.wheels                 # attrs, its dependencies, pytest and its dependencies
    dist.pip_wheel              # pip itself: the guest runs  python3 pip-X.whl/pip install ...
    dist.sources                # the unpacked sdist (tests rarely ship in wheels), or None
    dist.import_names           # ('attr', 'attrs')

Wheels only (``--only-binary=:all:``): a dependency without a wheel is built into one on the host from
its sdist (``pip wheel --no-deps``), which is only possible for pure-Python sdists; a compiled one fails
with a :class:`~pyti_core.errors.PackageError` naming it. The distribution itself may also be a local
sdist, a wheel or a project folder (built on the host).

pip always runs as ``sys.executable -m pip`` with an argument list (never a shell); its downloads go
through its HTTP cache (``cache_dir``) so repeated runs do not download again.
"""

from __future__ import annotations

import email.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Final, Literal

import attrs
from packaging.requirements import InvalidRequirement, Requirement

from pyti_core.errors import PackageError, UnsafeArchiveError

__all__ = [
    "DEBIAN_12",
    "Distribution",
    "GuestTarget",
    "bundled_pip_wheel",
    "download_wheels",
    "import_names_of_wheel",
    "normalize_name",
    "prepare_distribution",
    "unpack_sdist",
    "wheel_metadata",
]

#: Unpacked sdists larger than this are refused (a decompression bomb would fill the host's disk).
MAX_UNPACKED_BYTES: Final = 2 << 30
MAX_ARCHIVE_MEMBERS: Final = 200_000
#: Dependencies built from sdists in one resolution; more means something loops.
MAX_BUILT_FROM_SDIST: Final = 50
#: Rounds of fetching conditional dependencies pip left out for the target; more means something loops.
MAX_MARKER_ROUNDS: Final = 8
_STDERR_TAIL: Final = 3000
_SDIST_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
_NAME: Final = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_NOT_FOUND: Final = re.compile(
    r"(?:Could not find a version that satisfies the requirement|No matching distribution found for)"
    r" ([^\s(]+)"
)
_EXTRAS: Final = re.compile(r"^\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*\[([^\]]*)\]")
_SAVED: Final = re.compile(r"^\s*(?:Saved|File was already downloaded) (.+?\.whl)\s*$", re.MULTILINE)


def normalize_name(name: str) -> str:
    """A project name in its canonical form (PEP 503): lower case, runs of ``-_.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.frozen
class GuestTarget:
    """The Python and platform the wheels must fit: ``implementation`` (``"cp"`` CPython, ``"pp"`` PyPy)
    at language version ``python_version`` on glibc ``glibc``, with the interpreter's ABI tag ``abi``
    (default ``cpXY``; PyPy's look like ``pypy39_pp73``).

    The default, :data:`DEBIAN_12`, is the default test guest: CPython 3.11 on Debian 12 (glibc 2.36).
    """

    python_version: tuple[int, int] = (3, 11)
    glibc: tuple[int, int] = (2, 36)
    arch: str = "x86_64"
    implementation: Literal["cp", "pp"] = "cp"
    abi: str = ""
    full_version: str = ""

    @property
    def python_tag(self) -> str:
        return f"{self.implementation}{self.python_version[0]}{self.python_version[1]}"

    @property
    def abi_tag(self) -> str:
        return self.abi or f"cp{self.python_version[0]}{self.python_version[1]}"

    def describe(self) -> str:
        """``CPython 3.11, glibc 2.36, x86_64``: for messages."""
        impl = "PyPy" if self.implementation == "pp" else "CPython"
        major, minor = self.python_version
        return f"{impl} {major}.{minor} ({self.abi_tag}), glibc {self.glibc[0]}.{self.glibc[1]}, {self.arch}"

    def marker_environment(self) -> dict[str, str]:
        """The PEP 508 environment markers of the guest (``full_version`` defaults to ``X.Y.0``)."""
        major, minor = self.python_version
        pypy = self.implementation == "pp"
        return {
            "implementation_name": "pypy" if pypy else "cpython",
            "implementation_version": self.full_version or f"{major}.{minor}.0",
            "os_name": "posix",
            "platform_machine": self.arch,
            "platform_python_implementation": "PyPy" if pypy else "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": self.full_version or f"{major}.{minor}.0",
            "python_version": f"{major}.{minor}",
            "sys_platform": "linux",
        }

    def platforms(self) -> tuple[str, ...]:
        """Platform tags the guest accepts, most specific first (PEP 600 names and their legacy aliases)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        out: list[str] = []
        for tag in tags:
            out.append(tag)
            m = int(tag.split("_")[2])
            if major == 2 and m in legacy and self.arch in ("x86_64", "i686"):
                out.append(f"{legacy[m]}_{self.arch}")
        out.append(f"linux_{self.arch}")
        return tuple(out)

    def abis(self) -> tuple[str, ...]:
        if self.implementation == "pp":
            return (self.abi_tag, "none")
        return (self.abi_tag, "abi3", "none")

    def pip_options(self) -> list[str]:
        """``pip download`` options that select wheels for this target (and only wheels)."""
        opts = ["--only-binary=:all:", "--implementation", self.implementation]
        opts += ["--python-version", f"{self.python_version[0]}.{self.python_version[1]}"]
        for plat in self.platforms():
            opts += ["--platform", plat]
        for abi in self.abis():
            opts += ["--abi", abi]
        return opts

    def supports(self, wheel: str | Path) -> bool:
        """Whether a wheel (by its file name's tags, PEP 427) installs on this target."""
        parts = Path(wheel).name[: -len(".whl")].split("-")
        if not Path(wheel).name.endswith(".whl") or len(parts) not in (5, 6):
            return False
        pythons, abis, plats = (set(p.split(".")) for p in parts[-3:])
        platforms = {*self.platforms(), "any"}
        if not plats & platforms:
            return False
        major, minor = self.python_version
        generic = {f"py{major}"} | {f"py{major}{m}" for m in range(minor + 1)}
        if "none" in abis and pythons & (generic | {self.python_tag}):
            return True
        if self.abi_tag in abis and self.python_tag in pythons:
            return True
        if self.implementation != "cp":
            return False
        stable = {f"cp{major}{m}" for m in range(2, minor + 1)}
        return "abi3" in abis and bool(pythons & stable)


DEBIAN_12: Final = GuestTarget()


@attrs.frozen
class Distribution:
    """A distribution ready to go onto the IO disk.

    ``wheel`` is the distribution's own wheel; ``wheels`` every wheel the guest may install from (it,
    its dependencies, the recipe's requirements such as pytest, and pip), all inside ``wheelhouse``.
    ``sources`` is the unpacked sdist or project folder holding its tests, or ``None`` (a wheel given
    as input, or a project that publishes no sdist).
    """

    name: str
    version: str
    wheel: Path
    wheels: tuple[Path, ...]
    pip_wheel: Path
    wheelhouse: Path
    sources: Path | None
    import_names: tuple[str, ...]
    extras: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        """``name[extras]==version``: what the guest installs."""
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{extras}=={self.version}"


# -- wheels -------------------------------------------------------------------------------------------


def _read_wheel_member(wheel: Path, suffix: str, *, required: bool) -> str | None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(f".dist-info/{suffix}")]
            if not names:
                if required:
                    raise PackageError(f"{wheel}: not a wheel, it has no *.dist-info/{suffix}")
                return None
            info = zf.getinfo(names[0])
            if info.file_size > 16 << 20:
                raise PackageError(f"{wheel}: {names[0]} is {info.file_size} bytes, too large to be metadata")
            return zf.read(info).decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, PackageError):
            raise
        raise PackageError(f"{wheel}: cannot read the wheel: {exc}") from exc


def wheel_metadata(wheel: Path) -> tuple[str, str]:
    """``(name, version)`` from a wheel's ``METADATA`` file."""
    text = _read_wheel_member(wheel, "METADATA", required=True)
    msg = email.parser.Parser().parsestr(text or "", headersonly=True)
    name, version = msg.get("Name"), msg.get("Version")
    if not name or not version:
        raise PackageError(f"{wheel}: METADATA has no Name or no Version")
    return str(name).strip(), str(version).strip()


def import_names_of_wheel(wheel: Path) -> tuple[str, ...]:
    """The top-level import names a wheel installs (``top_level.txt`` when present, else its ``RECORD``)."""
    top = _read_wheel_member(wheel, "top_level.txt", required=False)
    names: set[str] = set()
    if top is not None:
        names = {line.strip().replace("/", ".") for line in top.splitlines() if line.strip()}
        names = {n for n in names if all(part.isidentifier() for part in n.split("."))}
        names = {n.split(".")[0] for n in names}
    if not names:
        record = _read_wheel_member(wheel, "RECORD", required=True) or ""
        for line in record.splitlines():
            path = line.rsplit(",", 2)[0].strip('"')
            first, _, rest = path.partition("/")
            if not first or first.endswith((".dist-info", ".data")) or first == "__pycache__":
                continue
            if rest:  # a package directory
                if first.isidentifier():
                    names.add(first)
            elif first.endswith(".py") and first[:-3].isidentifier():
                names.add(first[:-3])
            elif first.endswith((".so", ".pyd")) and first.split(".")[0].isidentifier():
                names.add(first.split(".")[0])
    return tuple(sorted(names))


def bundled_pip_wheel() -> Path | None:
    """The pip wheel bundled with this Python's ``ensurepip``, if the Python ships one (Debian strips it)."""
    spec = importlib.util.find_spec("ensurepip")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "_bundled"
    found = sorted(bundled.glob("pip-*-any.whl"))
    return found[-1] if found else None


# -- archives -----------------------------------------------------------------------------------------


def _check_member(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside the target folder")


def unpack_sdist(archive: Path, dest: Path) -> Path:
    """Unpack an sdist (tar or zip) safely into ``dest``; return its single top folder (or ``dest``).

    Tar members go through the ``data`` extraction filter (no absolute paths, no ``..``, no links out,
    no devices); zip members are checked the same way. Archives over 2 GiB unpacked are refused.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_ARCHIVE_MEMBERS:
                    raise UnsafeArchiveError(
                        f"{archive}: {len(infos)} members, more than {MAX_ARCHIVE_MEMBERS}"
                    )
                if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                    raise UnsafeArchiveError(f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                for info in infos:
                    _check_member(archive, info.filename)
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                members = []
                total = 0
                for member in tf:
                    members.append(member)
                    total += max(member.size, 0)
                    if len(members) > MAX_ARCHIVE_MEMBERS or total > MAX_UNPACKED_BYTES:
                        raise UnsafeArchiveError(f"{archive}: too many members or too large unpacked")
                    _check_member(archive, member.name)
                tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, tarfile.FilterError):
            raise UnsafeArchiveError(f"{archive}: unsafe member: {exc}") from exc
        raise PackageError(f"{archive}: not a readable sdist archive: {exc}") from exc
    entries = [p for p in dest.iterdir() if p.name != "pax_global_header"]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


# -- pip ----------------------------------------------------------------------------------------------


@attrs.frozen
class _Pip:
    """How pip is run: this interpreter, an index (or none), extra find-links, a cache folder."""

    index_url: str | None
    no_index: bool
    find_links: tuple[Path, ...]
    cache_dir: Path | None
    build_isolation: bool
    timeout: float

    def index_options(self) -> list[str]:
        opts: list[str] = []
        if self.no_index:
            opts.append("--no-index")
        elif self.index_url:
            opts += ["--index-url", self.index_url]
        for link in self.find_links:
            opts += ["--find-links", str(link)]
        if self.cache_dir is not None:
            opts += ["--cache-dir", str(self.cache_dir)]
        return opts

    def run(self, args: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pip", *args]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                errors="replace",
                env=env,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PackageError(f"{what}: pip did not finish within {self.timeout:g} s", command=argv) from exc
        except OSError as exc:
            raise PackageError(f"{what}: cannot run pip: {exc}", command=argv) from exc
        if proc.returncode != 0:
            raise PackageError(
                f"{what}: pip failed (exit code {proc.returncode})",
                command=argv,
                stderr=proc.stderr[-_STDERR_TAIL:],
            )
        return proc

    def build_wheel(self, source: Path, out: Path, what: str) -> Path:
        """``pip wheel --no-deps`` of a project folder or sdist; the one wheel it made."""
        out.mkdir(parents=True, exist_ok=True)
        with _fresh_dir(out / ".build") as tmp:
            args = ["wheel", "--no-deps", "--wheel-dir", str(tmp), *self.index_options()]
            if not self.build_isolation:
                args.append("--no-build-isolation")
            self.run([*args, str(source)], what)
            built = sorted(tmp.glob("*.whl"))
            if len(built) != 1:
                raise PackageError(
                    f"{what}: expected one wheel from pip wheel, got {[p.name for p in built]}"
                )
            final = out / built[0].name
            shutil.move(built[0], final)
        return final


@contextmanager
def _fresh_dir(path: Path) -> Iterator[Path]:
    """An empty folder at ``path`` for the block's duration, removed afterwards."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _project_key(requirement: str) -> str:
    match = _NAME.match(requirement)
    return normalize_name(match.group(1)) if match else requirement


def _extras(requirement: str) -> tuple[str, ...]:
    match = _EXTRAS.match(requirement)
    if match is None:
        return ()
    return tuple(sorted({normalize_name(e.strip()) for e in match.group(1).split(",") if e.strip()}))


def _classify(spec: str | Path) -> str:
    if not str(spec).strip():
        raise PackageError("an empty string is not a requirement such as 'attrs==23.2.0', nor a path")
    path = Path(spec)
    if isinstance(spec, Path) or path.exists() or path.name.endswith((".whl", *_SDIST_SUFFIXES)):
        if not path.exists():
            raise PackageError(f"{path}: no such file or folder")
        if path.is_dir():
            return "project"
        if path.name.endswith(".whl"):
            return "wheel"
        if path.name.endswith(_SDIST_SUFFIXES):
            return "sdist"
        raise PackageError(f"{path}: not a wheel (.whl), an sdist (.tar.gz, .zip) or a project folder")
    text = str(spec).strip()
    if not text or text.startswith("-") or not _NAME.match(text):
        raise PackageError(f"{spec!r} is not a requirement such as 'attrs==23.2.0', nor an existing path")
    return "requirement"


def _download(  # noqa: PLR0917 (private, called in two places)
    pip: _Pip,
    requirements: Sequence[str],
    wheels: Path,
    built: Path,
    target: GuestTarget,
    extras: Iterable[str] = (),
) -> list[Path]:
    """Resolve ``requirements`` for ``target`` into ``wheels``, with the dependencies the *guest* needs.

    ``pip download --python-version`` picks wheels for the target but evaluates environment markers
    for the Python that runs pip (pip issue 11664): a 3.9 guest would miss ``tomli; python_version <
    "3.11"`` when the host runs 3.11. So the downloaded wheels' ``Requires-Dist`` are evaluated for the
    target (:meth:`GuestTarget.marker_environment`, ``extras`` of the root project included) and what
    is missing is downloaded too, until nothing is.
    """
    saved = set(_download_once(pip, requirements, wheels, built, target))
    for _ in range(MAX_MARKER_ROUNDS):
        missing = _missing_for_target(sorted(saved), target, extras)
        if not missing:
            return sorted(saved)
        saved |= set(_download_once(pip, missing, wheels, built, target))
    raise PackageError(
        f"resolving {', '.join(requirements)} for the guest ({target.describe()}) did not settle after "
        f"{MAX_MARKER_ROUNDS} rounds of conditional dependencies"
    )


def _missing_for_target(wheels: Sequence[Path], target: GuestTarget, extras: Iterable[str]) -> list[str]:
    """Conditional requirements of ``wheels`` that hold on ``target`` but that no wheel satisfies."""
    have = {normalize_name(p.name.split("-")[0]) for p in wheels}
    env = target.marker_environment()
    wanted_extras = ["", *extras]
    missing: dict[str, str] = {}
    for wheel in wheels:
        text = _read_wheel_member(wheel, "METADATA", required=False) or ""
        msg = email.parser.Parser().parsestr(text, headersonly=True)
        for line in msg.get_all("Requires-Dist") or []:
            try:
                req = Requirement(str(line))
            except InvalidRequirement:
                continue
            if req.marker is None or normalize_name(req.name) in have:
                continue
            if any(req.marker.evaluate({**env, "extra": e}) for e in wanted_extras):
                req.marker = None
                missing.setdefault(normalize_name(req.name), str(req))
    return sorted(missing.values())


def _download_once(
    pip: _Pip,
    requirements: Sequence[str],
    wheels: Path,
    built: Path,
    target: GuestTarget,
) -> list[Path]:
    """One ``pip download`` of ``requirements`` for ``target``; build pure wheels for sdist-only deps."""
    attempted: set[str] = set()
    while True:
        args = ["download", "--dest", str(wheels), *target.pip_options(), *pip.index_options()]
        args += ["--find-links", str(built)]
        try:
            proc = pip.run([*args, *requirements], "resolving " + ", ".join(requirements))
        except PackageError as exc:
            match = _NOT_FOUND.search(exc.stderr)
            if match is None:
                raise
            missing = match.group(1)
            key = _project_key(missing)
            if key in attempted or len(attempted) >= MAX_BUILT_FROM_SDIST:
                raise PackageError(
                    f"{missing} has no wheel for the guest ({target.describe()}) and none could be built",
                    command=exc.command,
                    stderr=exc.stderr,
                ) from exc
            attempted.add(key)
            _build_from_sdist(pip, missing, built, target)
            continue
        saved = [Path(m) for m in _SAVED.findall(proc.stdout)]
        saved = [p if p.is_absolute() else wheels / p.name for p in saved]
        if not saved or not all(p.exists() for p in saved):  # an unexpected pip output format
            saved = sorted(wheels.glob("*.whl"))
        return saved


def _download_sdist(pip: _Pip, requirement: str, out: Path, what: str) -> Path:
    """``requirement``'s sdist (only that project is taken from source; build tools stay wheels)."""
    args = ["download", "--no-deps", "--no-binary", _project_key(requirement), "--dest", str(out)]
    if not pip.build_isolation:
        args.append("--no-build-isolation")
    pip.run([*args, *pip.index_options(), requirement], what)
    sdists = sorted(p for p in out.iterdir() if p.name.endswith(_SDIST_SUFFIXES))
    if len(sdists) != 1:
        raise PackageError(f"{what}: expected one sdist, got {[p.name for p in out.iterdir()]}")
    return sdists[0]


def _build_from_sdist(pip: _Pip, requirement: str, built: Path, target: GuestTarget) -> Path:
    """Download ``requirement``'s sdist and build a wheel on the host.

    A pure-Python wheel is used as it is. A compiled one fits only the host, so the sdist goes to the
    guest, which builds it at install time: a stand-in wheel (the built wheel's metadata, no code,
    tagged ``py3-none-any``) lets pip resolve its dependencies here, and :func:`_swap_stand_ins` puts
    the sdist and its build requirements in the wheelhouse in its place.
    """
    with _fresh_dir(built / ".sdist") as tmp:
        what = f"{requirement} has no wheel for the guest"
        try:
            sdist = _download_sdist(pip, requirement, tmp, f"{what}; getting its sdist")
        except PackageError as exc:
            if not _NOT_FOUND.search(exc.stderr):
                raise
            raise PackageError(
                f"{what} ({target.describe()}) and no sdist either: check its name and version",
                command=exc.command,
                stderr=exc.stderr,
            ) from exc
        wheel = pip.build_wheel(sdist, built, f"{requirement} has no wheel for the guest; building one")
        if target.supports(wheel) and wheel.name.endswith("-none-any.whl"):
            return wheel
        kept = built / _GUEST_SDISTS / sdist.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(sdist, kept)
    stand_in = _stand_in_wheel(wheel, built)
    wheel.unlink()
    return stand_in


_GUEST_SDISTS: Final = "guest-sdists"
_STAND_IN_MARK: Final = "PYTI-BUILT-IN-THE-GUEST"


def _stand_in_wheel(wheel: Path, out: Path) -> Path:
    """A ``py3-none-any`` wheel with ``wheel``'s METADATA only: resolution sees the dependencies."""
    name, version = wheel_metadata(wheel)
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    metadata = _read_wheel_member(wheel, "METADATA", required=True) or ""
    record = _read_wheel_member(wheel, "RECORD", required=False) or ""  # for the import names
    target = out / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as zf:
        zf.writestr(f"{stem}.dist-info/METADATA", metadata)
        zf.writestr(
            f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{stem}.dist-info/{_STAND_IN_MARK}", "")
        zf.writestr(f"{stem}.dist-info/RECORD", record)
    return target


def _is_stand_in(wheel: Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return any(n.endswith(f".dist-info/{_STAND_IN_MARK}") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _build_requires(sdist: Path) -> list[str]:
    """``[build-system] requires`` of an sdist's ``pyproject.toml`` (setuptools' default without one)."""
    default = ["setuptools>=40.8.0", "wheel"]
    try:
        with tarfile.open(sdist) as tf:
            member = next(
                (m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml")),
                None,
            )
            if member is None or member.size > 1 << 20:
                return default
            fh = tf.extractfile(member)
            data = tomllib.loads(fh.read().decode("utf-8", "replace")) if fh is not None else {}
    except (OSError, tarfile.TarError, tomllib.TOMLDecodeError):
        return default
    requires = data.get("build-system", {}).get("requires")
    return [str(r) for r in requires] if isinstance(requires, list) else default


def _swap_stand_ins(
    saved: list[Path], wheels: Path, built: Path, pip: _Pip, target: GuestTarget
) -> list[Path]:
    """Replace stand-in wheels in the wheelhouse by their sdists, plus those sdists' build requirements."""
    out = [p for p in saved if not _is_stand_in(p)]
    sdists = sorted((built / _GUEST_SDISTS).glob("*")) if (built / _GUEST_SDISTS).is_dir() else []
    stand_ins = [p for p in saved if _is_stand_in(p)]
    if not stand_ins:
        return out
    for stand_in in stand_ins:
        stand_in.unlink()
    requires: list[str] = []
    for sdist in sdists:
        shutil.copyfile(sdist, wheels / sdist.name)
        out.append(wheels / sdist.name)
        requires += _build_requires(sdist)
    if requires:
        out += _download(pip, sorted(set(requires)), wheels, built, target)
    return sorted(set(out))


def _fetch_sources(pip: _Pip, requirement: str, dest: Path) -> Path | None:
    """The requirement's sdist unpacked under ``dest``, or None when the project publishes none."""
    with _fresh_dir(dest.parent / ".sdist-download") as tmp:
        try:
            sdist = _download_sdist(
                pip, requirement, tmp, f"downloading the sdist of {requirement} (its tests)"
            )
        except PackageError as exc:
            if _NOT_FOUND.search(exc.stderr):
                return None
            raise
        shutil.rmtree(dest, ignore_errors=True)
        return unpack_sdist(sdist, dest)


def download_wheels(
    requirements: Sequence[str],
    dest: Path,
    target: GuestTarget,
    *,
    cache_dir: Path | None = None,
    index_url: str | None = None,
    no_index: bool = False,
    find_links: Iterable[Path] = (),
    timeout: float = 900.0,
) -> list[Path]:
    """Wheels of ``requirements`` and everything they need on ``target``, into ``dest``.

    Conditional dependencies are evaluated for the target, not for this host. Raises
    :class:`PackageError`.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    pip = _Pip(
        index_url=index_url,
        no_index=no_index,
        find_links=tuple(Path(p).resolve() for p in find_links),
        cache_dir=Path(cache_dir).resolve() if cache_dir is not None else None,
        build_isolation=True,
        timeout=timeout,
    )
    return _download(pip, requirements, dest, dest / ".built", target)


def prepare_distribution(
    spec: str | Path,
    dest: Path,
    *,
    requirements: Iterable[str] = ("pytest",),
    target: GuestTarget = DEBIAN_12,
    cache_dir: Path | None = None,
    index_url: str | None = None,
    no_index: bool = False,
    find_links: Iterable[Path] = (),
    pip_wheel: Path | None = None,
    build_isolation: bool = True,
    sources: bool = True,
    timeout: float = 900.0,
) -> Distribution:
    """Fetch ``spec`` and everything the guest needs into ``dest`` (``dest/wheels``, ``dest/src``).

    ``spec`` is a requirement (``"attrs==23.2.0"``), or the path of an sdist, a wheel or a project folder
    (sdists and folders are built into a wheel on the host with ``pip wheel --no-deps``).
    ``requirements`` are what the recipe needs in the guest besides the distribution (pytest).
    pip is downloaded as a wheel unless ``pip_wheel`` gives one (e.g. :func:`bundled_pip_wheel`).
    ``no_index`` with ``find_links`` resolves from local folders only. ``cache_dir`` is pip's cache.
    ``sources=False`` skips downloading the sdist of a requirement. Raises :class:`PackageError`.
    """
    kind = _classify(spec)
    dest = Path(dest).resolve()
    wheels = dest / "wheels"
    built = dest / "built"
    for folder in (wheels, built):
        folder.mkdir(parents=True, exist_ok=True)
    pip = _Pip(
        index_url=index_url,
        no_index=no_index,
        find_links=tuple(Path(p).resolve() for p in find_links),
        cache_dir=Path(cache_dir).resolve() if cache_dir is not None else None,
        build_isolation=build_isolation,
        timeout=timeout,
    )
    source_dir: Path | None = None
    extras: tuple[str, ...] = ()
    if kind == "requirement":
        root = str(spec).strip()
        root_key = _project_key(root)
        extras = _extras(root)
    else:
        path = Path(spec).resolve()
        if kind == "wheel":
            own = built / path.name
            if own != path:
                shutil.copyfile(path, own)
        else:
            if kind == "sdist":
                shutil.rmtree(dest / "src", ignore_errors=True)
                source_dir = unpack_sdist(path, dest / "src")
            else:
                source_dir = path
            own = pip.build_wheel(path, built, f"building a wheel of {path}")
        if not target.supports(own):
            raise PackageError(
                f"{own.name} does not install on the guest ({target.python_tag}, "
                f"glibc {target.glibc[0]}.{target.glibc[1]}, {target.arch})"
            )
        root_key = normalize_name(wheel_metadata(own)[0])
        root = str(own)  # the file itself: an index holding the same name and version cannot replace it
    wanted = [root, *requirements]
    if pip_wheel is None:
        wanted.append("pip")
    else:
        if not Path(pip_wheel).name.startswith("pip-") or not target.supports(pip_wheel):
            raise PackageError(f"{pip_wheel}: not a pip wheel that runs on the guest")
        shutil.copyfile(pip_wheel, wheels / Path(pip_wheel).name)
    saved = _download(pip, wanted, wheels, built, target, extras)
    if pip_wheel is not None:
        saved.append(wheels / Path(pip_wheel).name)
    by_name = {normalize_name(p.name.split("-")[0]): p for p in saved}
    if root_key not in by_name or "pip" not in by_name:
        raise PackageError(
            f"pip download did not produce a wheel of {root_key} and of pip: got {sorted(by_name)}"
        )
    own_wheel = by_name[root_key]
    name, version = wheel_metadata(own_wheel)
    import_names = import_names_of_wheel(own_wheel)
    saved = _swap_stand_ins(saved, wheels, built, pip, target)  # sdists the guest builds itself
    if not own_wheel.exists():
        own_wheel = next(p for p in saved if normalize_name(p.name.split("-")[0]) == root_key)
    if kind == "requirement" and sources:
        source_dir = _fetch_sources(pip, f"{name}=={version}", dest / "src")
    return Distribution(
        name=name,
        version=version,
        extras=extras,
        wheel=own_wheel,
        wheels=tuple(sorted(set(saved))),
        pip_wheel=by_name["pip"],
        wheelhouse=wheels,
        sources=source_dir,
        import_names=import_names,
    )
