"""Debian's archive through a private apt configuration: package lists, dependency closures, downloads.

Guests are built from the Debian suite that ships their interpreter (bullseye's CPython 3.9, sid's
3.14, ...), whatever the host runs. :class:`Archive` keeps one apt state per suite in its own folder
(its own ``sources.list``, lists, cache and an empty dpkg status), so the host's sources, lists and
installed packages are never read nor touched::

    archive = Archive(cache / "apt", "bullseye")
    archive.update()                                        # when the lists are missing or old
    versions = archive.closure(["python3.9-minimal"])       # {"libc6": "2.31-13+deb11u11", ...}
    debs = archive.download(versions, cache / "debs")       # {"libc6": Path(".../libc6_2.31-...deb")}

Everything is signed by Debian's archive keyring (``debian-archive-keyring``: the ``signed-by`` of each
source); apt refuses anything else. Tools: ``apt-get`` (any Debian-like host has it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from pyti_core.errors import GuestImageError

__all__ = ["DEFAULT_MIRROR", "KEYRING", "LISTS_MAX_AGE_S", "Archive"]

DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
KEYRING: Final = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Package lists older than this are fetched again (a week: builds stay reusable, security fixes come).
LISTS_MAX_AGE_S: Final = 7 * 24 * 3600.0
_TIMEOUT: Final = 900.0
_INST: Final = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ", re.MULTILINE)
_SUITE: Final = re.compile(r"^[a-z][a-z0-9-]{1,30}$")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def deb_name(package: str, version: str) -> str:
    """The file name a ``.deb`` of ``package`` at ``version`` is stored under (``:`` escaped as apt does)."""
    return f"{package}_{version.replace(':', '%3a')}.deb"


class Archive:
    """One Debian suite, reached through apt with private state under ``root/<suite>``.

    ``mirror`` is the archive's URL; ``keyring`` the OpenPGP keyring its Release file must be signed
    with. Safe to share between processes: updates are serialised by a lock file.
    """

    def __init__(
        self, root: Path, suite: str, *, mirror: str = DEFAULT_MIRROR, keyring: str = KEYRING
    ) -> None:
        if not _SUITE.match(suite):
            raise ValueError(f"not a Debian suite name: {suite!r}")
        self.suite = suite
        self.mirror = mirror
        self.keyring = keyring
        self.root = Path(root) / suite

    # -- apt with private state ---------------------------------------------------------------------

    def _options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::sourcelist": r / "sources.list",
            "Dir::Etc::sourceparts": "/dev/null",
            "Dir::Etc::preferences": "/dev/null",
            "Dir::Etc::preferencesparts": "/dev/null",
            "Dir::State": r / "state",
            "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache",
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "APT::Install-Recommends": "false",
            "Acquire::Languages": "none",
            "Debug::NoLocking": "true",
        }
        if os.geteuid() == 0:  # apt would fetch as _apt, which cannot write our folders
            opts["APT::Sandbox::User"] = "root"
        return [f"-o{key}={value}" for key, value in opts.items()]

    def _apt(
        self, args: Sequence[str], what: str, *, cwd: Path | None = None, merge_stderr: bool = False
    ) -> str:
        argv = ["apt-get", "-q", *self._options(), *args]
        try:
            proc = subprocess.run(
                argv, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT, check=False
            )
        except FileNotFoundError as exc:
            raise GuestImageError(
                f"{what}: apt-get not found; building a guest needs a Debian-like host with apt and dpkg",
                command=argv,
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise GuestImageError(f"{what}: timed out after {_TIMEOUT:.0f} s", command=argv) from exc
        if proc.returncode != 0:
            raise GuestImageError(
                f"{what}: apt-get failed with exit status {proc.returncode}",
                command=argv,
                output=(proc.stderr + proc.stdout)[-4000:],
            )
        return proc.stdout + proc.stderr if merge_stderr else proc.stdout

    def _prepare(self) -> None:
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        source = f"deb [signed-by={self.keyring}] {self.mirror} {self.suite} main\n"
        path = self.root / "sources.list"
        if not path.is_file() or path.read_text() != source:
            path.write_text(source)
        (self.root / "status").touch()

    @property
    def _stamp(self) -> Path:
        return self.root / "updated"

    def has_lists(self) -> bool:
        """Whether package lists were fetched for this suite (at any time)."""
        return self._stamp.is_file()

    def update(self, *, max_age: float = LISTS_MAX_AGE_S, force: bool = False) -> bool:
        """Fetch the suite's package lists when they are missing, older than ``max_age`` or ``force``.

        Returns True when the lists were fetched. When the archive cannot be reached and older lists are
        there, they are kept and used (False); without any lists, :class:`GuestImageError` names the suite.
        """
        if not Path(self.keyring).is_file():
            raise GuestImageError(
                f"Debian {self.suite}: the archive keyring {self.keyring} is missing; install the "
                "debian-archive-keyring package"
            )
        with _locked(self.root.parent / f".{self.suite}.lock"):
            self._prepare()
            if self.has_lists() and not force and time.time() - self._stamp.stat().st_mtime < max_age:
                return False
            try:
                what = f"fetching the package lists of Debian {self.suite} from {self.mirror}"
                out = self._apt(["update"], what, merge_stderr=True)
                # apt-get update exits 0 when a source cannot be fetched; it says so in Err:/W: lines
                if re.search(r"^(?:Err:|W: Failed to fetch|E: )", out, re.MULTILINE):
                    raise GuestImageError(f"{what}: it failed", output=out[-4000:])
            except GuestImageError as exc:
                if self.has_lists():
                    return False
                raise GuestImageError(
                    f"Debian {self.suite} cannot be reached at {self.mirror}: {exc}",
                    command=exc.command,
                    output=exc.output,
                ) from exc
            self._stamp.write_text(f"{time.time()}\n")
            return True

    def closure(self, packages: Sequence[str], *, exclude: Sequence[str] = ()) -> dict[str, str]:
        """``packages`` and everything they depend on (no recommends): package name -> version.

        Resolved by apt itself against an empty system; ``exclude`` drops packages from the result
        (tools a guest never runs, e.g. ``perl-base``), not their dependencies.
        """
        if not self.has_lists():
            self.update()
        material = json.dumps([list(packages), sorted(exclude), self._stamp.stat().st_mtime_ns, self.mirror])
        memo = self.root / "resolved" / (hashlib.sha256(material.encode()).hexdigest()[:24] + ".json")
        try:  # resolved before from the same lists: apt would say the same, only slower (seconds)
            cached = json.loads(memo.read_text())
            if isinstance(cached, dict) and all(isinstance(v, str) for v in cached.values()):
                return {str(k): v for k, v in cached.items()}
        except (OSError, ValueError):
            pass
        try:
            out = self._apt(
                ["-s", "install", *packages], f"resolving {', '.join(packages)} in Debian {self.suite}"
            )
        except GuestImageError as exc:
            unknown = re.findall(r"Unable to locate package (\S+)", exc.output)
            if not unknown:
                raise
            raise GuestImageError(
                f"Debian {self.suite} has no package {', '.join(unknown)}",
                command=exc.command,
                output=exc.output,
            ) from exc
        found = dict(_INST.findall(out))
        missing = [p for p in packages if p not in found]
        if missing:
            raise GuestImageError(f"Debian {self.suite} has no package {', '.join(missing)}", output=out)
        result = {name: version for name, version in found.items() if name not in exclude}
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".resolved-")
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh)
        os.replace(tmp, memo)  # atomic: concurrent resolvers never read half a file
        return result

    def download(self, packages: Mapping[str, str], deb_dir: Path) -> dict[str, Path]:
        """Each package's ``.deb`` in ``deb_dir`` (shared by every suite), fetching the missing ones.

        Files appear atomically (fetched into a temporary folder, then renamed), so concurrent builders
        never see half a package.
        """
        deb_dir.mkdir(parents=True, exist_ok=True)
        paths = {name: deb_dir / deb_name(name, version) for name, version in packages.items()}
        missing = [name for name, path in paths.items() if not path.is_file()]
        if missing:
            with tempfile.TemporaryDirectory(dir=deb_dir, prefix=".download-") as tmp:
                os.chmod(tmp, 0o755)
                specs = [f"{name}={packages[name]}" for name in missing]
                self._apt(["download", *specs], f"downloading from Debian {self.suite}", cwd=Path(tmp))
                got = {p.name.split("_", 1)[0]: p for p in Path(tmp).glob("*.deb")}
                for name in missing:
                    if name not in got:
                        raise GuestImageError(f"apt-get download printed no error but fetched no {name} .deb")
                    os.replace(got[name], paths[name])
        return paths
