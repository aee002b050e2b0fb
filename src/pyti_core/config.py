"""Job files: what to test, how, and where the results go, in TOML.

::

    # attrs.toml
    distribution = "attrs==23.2.0"     # a requirement, or a path: "./dist/x-1.0.tar.gz", "./x.whl", "./proj"
    recipe = "default"                 # default | unittest | install-only, or [[tasks]] below
    timeout = 3600                     # the whole job, seconds (optional)

    [timeouts]                         # per task of the recipe, seconds (optional)
    pytest = 900

    [guest]                            # the guest's Python and platform (defaults: Debian 12)
    python = "3.11"
    glibc = "2.36"

    [packages]                         # how the host fetches wheels (optional)
    index_url = "https://pypi.org/simple"
    find_links = ["./wheels"]
    no_index = false                   # true: resolve from find_links only, no index at all
    cache_dir = "~/.cache/pyti"

    [channel]                          # the live channel (optional; see docs/channel.md)
    enabled = true                     # false: no live events, no stall detection
    stall_timeout = 30                 # seconds of silence before the guest counts as stuck
    heartbeat = 2                      # how often the agent sends a heartbeat, seconds

    [results]
    report = "attrs-report.json"       # written on the host (relative to this file)

    [[tasks]]                          # instead of recipe: your own list
    name = "smoke"
    kind = "command"                   # install | import | pytest | unittest | command
    argv = ["python3", "-c", "import attr"]
    timeout = 60

Relative paths are relative to the job file. A ``distribution`` is a path when it starts with ``./``,
``../``, ``/`` or ``~``, or ends in ``.whl``, ``.tar.gz``, ``.zip``; anything else is a requirement.
Unknown keys are errors (a typo must not be silently ignored): :class:`~pyti_core.errors.ConfigError`
names the file and the key.
"""

from __future__ import annotations

import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from pyti_core.channel import ChannelConfig
from pyti_core.errors import ConfigError, TaskError
from pyti_core.packages import DEBIAN_12, Distribution, GuestTarget, prepare_distribution
from pyti_core.tasks import RECIPES, Recipe, Task

__all__ = ["JobConfig"]

MAX_JOB_FILE_BYTES: Final = 1 << 20
_TOP: Final = frozenset(
    {
        "distribution",
        "recipe",
        "requirements",
        "timeout",
        "timeouts",
        "guest",
        "packages",
        "results",
        "tasks",
        "channel",
    }
)
_PATH_SUFFIXES: Final = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2", ".tar.xz")


@attrs.frozen
class JobConfig:
    """A validated job file. ``distribution`` is a requirement string or an absolute :class:`Path`."""

    distribution: str | Path
    recipe: Recipe
    target: GuestTarget = DEBIAN_12
    job_timeout: float | None = None
    index_url: str | None = None
    no_index: bool = False
    find_links: tuple[Path, ...] = ()
    cache_dir: Path | None = None
    report: Path | None = None
    source: Path | None = None
    channel: ChannelConfig | None = ChannelConfig()  # noqa: RUF009 (frozen: safe to share)

    def prepare(self, dest: Path, **overrides: Any) -> Distribution:
        """Fetch the distribution into ``dest`` with this job's settings (:func:`prepare_distribution`).

        ``overrides`` replace keyword arguments of :func:`prepare_distribution` (e.g. ``pip_wheel``).
        """
        kwargs: dict[str, Any] = {
            "requirements": self.recipe.requirements,
            "target": self.target,
            "cache_dir": self.cache_dir,
            "index_url": self.index_url,
            "no_index": self.no_index,
            "find_links": self.find_links,
        }
        kwargs.update(overrides)
        return prepare_distribution(self.distribution, dest, **kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> JobConfig:
        """Read and validate a TOML job file."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_JOB_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(path, None, f"cannot read the job file: {exc.strerror or exc}") from exc
        if len(raw) > MAX_JOB_FILE_BYTES:
            raise ConfigError(path, None, f"larger than {MAX_JOB_FILE_BYTES} bytes; is this a job file?")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(path, None, f"not UTF-8 text: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, None, f"not valid TOML: {exc}") from exc
        return cls.from_dict(data, base_dir=path.resolve().parent, source=path)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: Path | None = None, source: Path | None = None
    ) -> JobConfig:
        """Validate an already-parsed job (``base_dir`` anchors relative paths; ``source`` names errors)."""
        reader = _Reader(source, (base_dir or Path.cwd()).resolve())
        reader.only(data, _TOP, "")
        distribution = reader.distribution(reader.string(data, "distribution", required=True))
        recipe = reader.recipe(data)
        job_timeout = reader.seconds(data, "timeout")
        guest = reader.table(data, "guest", {"python", "glibc", "arch"})
        target = GuestTarget(
            python_version=reader.version(guest, "guest.python", DEBIAN_12.python_version),
            glibc=reader.version(guest, "guest.glibc", DEBIAN_12.glibc),
            arch=reader.string(guest, "arch", key="guest.arch") or DEBIAN_12.arch,
        )
        packages = reader.table(data, "packages", {"index_url", "no_index", "find_links", "cache_dir"})
        index_url = reader.url(packages, "index_url", "packages.index_url")
        no_index = packages.get("no_index", False)
        if not isinstance(no_index, bool):
            raise reader.fail("packages.no_index", f"must be true or false, got {no_index!r}")
        find_links = tuple(
            reader.path(p, f"packages.find_links[{i}]")
            for i, p in enumerate(reader.strings(packages, "find_links", "packages.find_links"))
        )
        cache = reader.string(packages, "cache_dir", key="packages.cache_dir")
        results = reader.table(data, "results", {"report", "master"})
        if "master" in results:
            raise reader.fail(
                "results.master",
                "the master is gone: run many jobs with `pyti farm run --ledger FILE` (see docs/farm.md)",
            )
        report = reader.string(results, "report", key="results.report")
        live = reader.table(data, "channel", {"enabled", "stall_timeout", "heartbeat"})
        enabled = live.get("enabled", True)
        if not isinstance(enabled, bool):
            raise reader.fail("channel.enabled", f"must be true or false, got {enabled!r}")
        channel: ChannelConfig | None = None
        if enabled:
            stall = reader.seconds(live, "stall_timeout", "channel.stall_timeout")
            beat = reader.seconds(live, "heartbeat", "channel.heartbeat")
            try:
                channel = ChannelConfig(
                    stall_timeout=30.0 if stall is None else stall, heartbeat=2.0 if beat is None else beat
                )
            except ConfigError as exc:
                raise reader.fail("channel", str(exc)) from None
        return cls(
            channel=channel,
            distribution=distribution,
            recipe=recipe,
            target=target,
            job_timeout=job_timeout,
            index_url=index_url,
            no_index=no_index,
            find_links=find_links,
            cache_dir=reader.path(cache, "packages.cache_dir") if cache is not None else None,
            report=reader.path(report, "results.report") if report is not None else None,
            source=source,
        )


@attrs.frozen
class _Reader:
    """Typed getters that raise :class:`ConfigError` naming the file and the dotted key."""

    source: Path | None
    base: Path

    def fail(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def only(self, table: Mapping[str, Any], allowed: frozenset[str] | set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(
                    f"{prefix}{key}", f"unknown key; known keys here: {', '.join(sorted(allowed))}"
                )

    def table(self, data: Mapping[str, Any], name: str, allowed: set[str]) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table ([{name}]), got {type(value).__name__}")
        self.only(value, allowed, f"{name}.")
        return value

    def string(
        self, table: Mapping[str, Any], name: str, *, key: str | None = None, required: bool = False
    ) -> str | None:
        key = key or name
        if name not in table:
            if required:
                raise self.fail(key, "is required")
            return None
        value = table[name]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def strings(self, table: Mapping[str, Any], name: str, key: str) -> list[str]:
        value = table.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(key, "must be a list of non-empty strings")
        return [v.strip() for v in value]

    def seconds(self, table: Mapping[str, Any], name: str, key: str | None = None) -> float | None:
        if name not in table:
            return None
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 30 * 86400:
            raise self.fail(
                key or name, f"must be a number of seconds > 0 (and under 30 days), got {value!r}"
            )
        return float(value)

    def version(self, table: Mapping[str, Any], key: str, default: tuple[int, int]) -> tuple[int, int]:
        name = key.rsplit(".", maxsplit=1)[-1]
        if name not in table:
            return default
        value = table[name]
        parts = value.split(".") if isinstance(value, str) else []
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            raise self.fail(key, f'must be a "MAJOR.MINOR" string such as "3.11", got {value!r}')
        return int(parts[0]), int(parts[1])

    def url(self, table: Mapping[str, Any], name: str, key: str) -> str | None:
        value = self.string(table, name, key=key)
        if value is None:
            return None
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https", "file") or not (parsed.netloc or parsed.scheme == "file"):
            raise self.fail(key, f"must be an http:// or https:// URL, got {value!r}")
        return value

    def path(self, value: str, key: str) -> Path:
        if "\x00" in value:
            raise self.fail(key, "must not contain NUL characters")
        return (self.base / Path(value).expanduser()).resolve()

    def distribution(self, value: str | None) -> str | Path:
        assert value is not None  # required
        if value.startswith(("./", "../", "/", "~")) or value.endswith(_PATH_SUFFIXES):
            path = self.path(value, "distribution")
            if not path.exists():
                raise self.fail("distribution", f"{path} does not exist (a path, since it looks like one)")
            return path
        if value.startswith("-"):
            raise self.fail("distribution", f"must be a requirement such as 'attrs==23.2.0', got {value!r}")
        return value

    def recipe(self, data: Mapping[str, Any]) -> Recipe:
        has_tasks = "tasks" in data
        if has_tasks and "recipe" in data:
            raise self.fail("tasks", 'give either recipe = "..." or [[tasks]], not both')
        if has_tasks:
            recipe = self.custom_recipe(data)
        else:
            name = self.string(data, "recipe") or "default"
            if name not in RECIPES:
                raise self.fail(
                    "recipe", f"unknown recipe {name!r}; built-in recipes: {', '.join(sorted(RECIPES))}"
                )
            recipe = RECIPES[name]
        if "requirements" in data:
            recipe = attrs.evolve(recipe, requirements=self.strings(data, "requirements", "requirements"))
        timeouts = self.table(data, "timeouts", {t.name for t in recipe.tasks})
        if timeouts:
            tasks = []
            for task in recipe.tasks:
                seconds = self.seconds(timeouts, task.name, f"timeouts.{task.name}")
                tasks.append(task if seconds is None else attrs.evolve(task, timeout=seconds))
            recipe = attrs.evolve(recipe, tasks=tasks)
        return recipe

    def custom_recipe(self, data: Mapping[str, Any]) -> Recipe:
        raw = data["tasks"]
        if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) for t in raw):
            raise self.fail("tasks", "must be a non-empty array of tables ([[tasks]])")
        tasks = []
        needs_pytest = False
        for i, item in enumerate(raw):
            key = f"tasks[{i}]"
            self.only(item, {"name", "kind", "argv", "timeout", "env", "stop_on_failure"}, f"{key}.")
            kind = self.string(item, "kind", key=f"{key}.kind", required=True)
            name = self.string(item, "name", key=f"{key}.name") or kind
            env = item.get("env", {})
            if not isinstance(env, dict) or not all(isinstance(v, str | int | float) for v in env.values()):
                raise self.fail(f"{key}.env", "must be a table of strings")
            stop = item.get("stop_on_failure")
            if stop is not None and not isinstance(stop, bool):
                raise self.fail(f"{key}.stop_on_failure", "must be true or false")
            timeout = self.seconds(item, "timeout", f"{key}.timeout")
            try:
                task = Task(
                    name=str(name),
                    kind=kind,  # type: ignore[arg-type]  # checked by Task
                    timeout=timeout if timeout is not None else 600.0,
                    argv=self.strings(item, "argv", f"{key}.argv"),
                    env=env,
                    stop_on_failure=stop,
                )
            except TaskError as exc:
                raise self.fail(key, str(exc)) from exc
            needs_pytest = needs_pytest or task.kind == "pytest"
            tasks.append(task)
        try:
            return Recipe("custom", tasks, ("pytest",) if needs_pytest else ())
        except TaskError as exc:
            raise self.fail("tasks", str(exc)) from exc
