"""Tasks and recipes: what the guest does with a distribution, and the ``job.json`` the agent reads.

A :class:`Task` is one step (install, import check, pytest, unittest, or a command); a :class:`Recipe`
is a named list of them plus what the guest must install besides the distribution (pytest)::

    job = to_agent_job(dist, RECIPES["default"], GuestLayout())
    # {"distribution": "attrs==23.2.0", "output_cap": 65536, "tasks": [
    #   {"id": "1", "name": "install", "argv": ["python3", "/mnt/disk/wheels/pip-24.0-py3-none-any.whl/pip",
    #    "install", "--no-index", "--find-links", "/mnt/disk/wheels", "attrs==23.2.0"], ...},
    #   {"id": "2", "name": "install-requirements", ...}, {"id": "3", "name": "import", ...},
    #   {"id": "4", "name": "pytest", "parse": "junit:/mnt/disk/results/junit-4.xml", ...}]}

The guest has no pip: it runs pip from its wheel file (a wheel is a zip that Python can import from).
Test tasks run in the unpacked sources with ``PYTHONSAFEPATH=1``, so the tests import the *installed*
distribution, not the source tree. :func:`stage_io_folder` lays out a host folder exactly as the IO disk
must look (wheels, sources, the agent, ``job.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Final, Literal, get_args

import attrs

from pyti_core.errors import TaskError
from pyti_core.guest import agent, livechannel, pyti_live
from pyti_core.guest.protocol import (
    AGENT_FILE,
    CHANNEL_MODULE_FILE,
    CHANNEL_PORT,
    IO_MOUNT,
    JOB_FILE,
    PLUGIN_DIR,
    PLUGIN_MODULE,
    AgentChannel,
    AgentJob,
    AgentTask,
)
from pyti_core.packages import Distribution

__all__ = [
    "RECIPES",
    "GuestLayout",
    "Recipe",
    "Task",
    "TaskKind",
    "get_recipe",
    "stage_io_folder",
    "to_agent_job",
]

TaskKind = Literal["install", "import", "pytest", "unittest", "command"]
_KINDS: Final = frozenset(get_args(TaskKind))
DEFAULT_TIMEOUT: Final = 600.0
#: Environment of pip in the guest: no network, no prompts, root in a system Python is expected.
_PIP_ENV: Final = {
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_INPUT": "1",
    "PIP_ROOT_USER_ACTION": "ignore",
    "PIP_BREAK_SYSTEM_PACKAGES": "1",
}
_TEST_ENV: Final = {"PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _env_items(value: Mapping[str, object] | Iterable[tuple[str, object]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


def _argv(value: Iterable[object]) -> tuple[str, ...]:
    return tuple(str(x) for x in value)


def _tasks(value: Iterable[Task]) -> tuple[Task, ...]:
    return tuple(value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(x) for x in value)


def _check_kind(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in _KINDS:
        raise TaskError(f"task kind must be one of {sorted(_KINDS)}, got {value!r}")


def _check_timeout(_: object, __: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise TaskError(f"a task timeout must be > 0 seconds, got {value!r}")


@attrs.frozen
class Task:
    """One step of a recipe.

    ``argv`` is the whole command of a ``command`` task (run in the sources folder, or ``cwd`` relative
    to it), and extra arguments for ``pytest``/``unittest``. ``stop_on_failure`` skips the remaining tasks
    when this one does not pass (the default for installs).
    """

    name: str
    kind: TaskKind = attrs.field(validator=_check_kind)
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, converter=float, validator=_check_timeout)
    argv: tuple[str, ...] = attrs.field(default=(), converter=_argv)
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_env_items)
    stop_on_failure: bool | None = None

    def __attrs_post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise TaskError("a task needs a non-empty name")
        if self.kind == "command" and not self.argv:
            raise TaskError(f"task {self.name!r}: a command task needs a non-empty argv")

    @property
    def stops_on_failure(self) -> bool:
        return self.kind == "install" if self.stop_on_failure is None else self.stop_on_failure


@attrs.frozen
class Recipe:
    """A named list of tasks; ``requirements`` are installed in the guest after the distribution."""

    name: str
    tasks: tuple[Task, ...] = attrs.field(converter=_tasks)
    requirements: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def __attrs_post_init__(self) -> None:
        if not self.tasks:
            raise TaskError(f"recipe {self.name!r} has no tasks")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise TaskError(f"recipe {self.name!r}: task names must be unique, got {names}")


RECIPES: Final[Mapping[str, Recipe]] = {
    "default": Recipe(
        "default",
        (Task("install", "install"), Task("import", "import", 120), Task("pytest", "pytest", 1800)),
        ("pytest",),
    ),
    "unittest": Recipe(
        "unittest",
        (Task("install", "install"), Task("import", "import", 120), Task("unittest", "unittest", 1800)),
    ),
    "install-only": Recipe("install-only", (Task("install", "install"), Task("import", "import", 120))),
}


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name; :class:`TaskError` lists the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise TaskError(f"unknown recipe {name!r}; built-in recipes: {', '.join(sorted(RECIPES))}") from None


@attrs.frozen
class GuestLayout:
    """Where things are in the guest: the IO disk's mount point and its folders, and the Python to run.

    ``pip_installed``: the guest's Python has pip (``python3 -m pip``); otherwise pip runs from its wheel
    on the IO disk.
    """

    io_dir: str = IO_MOUNT
    python: str = "python3"
    wheels: str = "wheels"
    sources: str = "src"
    results: str = "results"
    work: str = "work"
    pip_installed: bool = False

    def __attrs_post_init__(self) -> None:
        if not PurePosixPath(self.io_dir).is_absolute():
            raise TaskError(f"the IO disk's mount point must be an absolute path, got {self.io_dir!r}")
        for name in ("wheels", "sources", "results", "work"):
            value = getattr(self, name)
            parts = PurePosixPath(value).parts
            if len(parts) != 1 or parts[0] in (".", "..", "/"):
                raise TaskError(f"layout.{name} must be one folder name inside the IO disk, got {value!r}")

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.io_dir, *parts))


def _pip(dist: Distribution, layout: GuestLayout, *requirements: str) -> list[str]:
    wheels = layout.path(layout.wheels)
    pip = ["-m", "pip"] if layout.pip_installed else [str(PurePosixPath(wheels, dist.pip_wheel.name, "pip"))]
    return [
        layout.python,
        *pip,
        "install",
        "--no-index",
        "--no-cache-dir",
        "--find-links",
        wheels,
        *requirements,
    ]


def to_agent_job(
    distribution: Distribution,
    recipe: Recipe,
    layout: GuestLayout | None = None,
    *,
    output_cap: int = agent.DEFAULT_OUTPUT_CAP,
    heartbeat: float | None = None,
) -> AgentJob:
    """The ``job.json`` the guest agent runs for ``recipe`` on ``distribution`` (guest paths from ``layout``).

    An ``install`` task also installs the recipe's requirements (as a separate ``install-requirements``
    task, so a failure there is not blamed on the distribution). An ``import`` task with no import names
    is left out. A test task without sources: pytest runs ``--pyargs`` on the import names; unittest is a
    :class:`TaskError`.

    ``heartbeat`` (seconds) turns the live channel on: the job gets its ``channel`` object and pytest
    tasks load the ``pyti_live`` plugin, which reports each test's outcome as it happens. Without it the
    job is exactly as it was before the channel existed.
    """
    layout = layout or GuestLayout()
    sources = layout.path(layout.sources) if distribution.sources is not None else None
    work = layout.path(layout.work)
    results = layout.path(layout.results)
    tasks: list[AgentTask] = []

    def add(
        task: Task, name: str, argv: list[str], *, cwd: str, env: Mapping[str, str], parse: str | None
    ) -> None:
        task_id = str(len(tasks) + 1)
        tasks.append(
            {
                "id": task_id,
                "name": name,
                "argv": argv,
                "timeout": task.timeout,
                "cwd": cwd,
                "parse": parse.replace("{id}", task_id) if parse else None,
                "env": {**env, **dict(task.env)},
                "stop_on_failure": task.stops_on_failure,
            }
        )

    for task in recipe.tasks:
        if task.kind == "install":
            add(
                task,
                task.name,
                _pip(distribution, layout, distribution.requirement),
                cwd=work,
                env=_PIP_ENV,
                parse=None,
            )
            if recipe.requirements:
                # test tooling (pytest and its dependencies) is not byte-compiled at install: under
                # emulation compiling every module costs more than compiling those pytest imports
                # (measured on six 1.16.0 under TCG: install-requirements 12.9 s -> 4.8 s, pytest
                # 4.8 s -> 7.3 s, the whole tasks phase 25.8 s -> 19.8 s)
                argv = _pip(distribution, layout, "--no-compile", *recipe.requirements)
                add(task, f"{task.name}-requirements", argv, cwd=work, env=_PIP_ENV, parse=None)
        elif task.kind == "import":
            if distribution.import_names:
                code = "import " + ", ".join(distribution.import_names)
                add(task, task.name, [layout.python, "-c", code], cwd=work, env={}, parse=None)
        elif task.kind == "pytest":
            junit = str(PurePosixPath(results, "junit-{id}.xml"))
            argv = [
                layout.python,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                *(("-p", PLUGIN_MODULE) if heartbeat is not None else ()),
                f"--junitxml={junit}",
                *task.argv,
            ]
            if sources is None:
                argv += ["--pyargs", *distribution.import_names]
            add(task, task.name, argv, cwd=sources or work, env=_TEST_ENV, parse=f"junit:{junit}")
            tasks[-1]["argv"] = [a.replace("{id}", tasks[-1]["id"]) for a in argv]
        elif task.kind == "unittest":
            if sources is None:
                raise TaskError(
                    f"task {task.name!r} runs unittest in the sources, "
                    f"but {distribution.requirement} has none"
                )
            argv = [layout.python, "-m", "unittest", *(task.argv or ("discover",))]
            add(task, task.name, argv, cwd=sources, env=_TEST_ENV, parse="unittest")
        else:
            add(task, task.name, list(task.argv), cwd=sources or work, env={}, parse=None)
    job: AgentJob = {"distribution": distribution.requirement, "output_cap": output_cap, "tasks": tasks}
    if heartbeat is not None:
        channel: AgentChannel = {
            "port": CHANNEL_PORT,
            "heartbeat_s": heartbeat,
            "plugin_dir": layout.path(PLUGIN_DIR),
        }
        job["channel"] = channel
    return job


#: Left out when a project folder is copied as the sources: version control, virtualenvs, caches.
_IGNORED_ANYWHERE: Final = frozenset(
    {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"}
)
_IGNORED_AT_TOP: Final = frozenset(
    {".git", ".hg", ".svn", ".venv", "venv", ".tox", ".nox", ".eggs", "build", "dist"}
)


def _ignore_in_sources(directory: str, names: list[str]) -> set[str]:
    top = (
        _IGNORED_AT_TOP
        if os.path.exists(os.path.join(directory, "pyproject.toml"))
        or os.path.exists(os.path.join(directory, "setup.py"))
        else frozenset()
    )
    return {n for n in names if n in _IGNORED_ANYWHERE or n in top}


def stage_io_folder(
    folder: Path,
    distribution: Distribution,
    recipe: Recipe,
    layout: GuestLayout | None = None,
    *,
    heartbeat: float | None = None,
) -> AgentJob:
    """Lay out ``folder`` as the IO disk must look; return the job written to ``folder/job.json``.

    ``folder`` gets ``wheels/`` (every wheel), ``src/`` (the sources, without version-control folders,
    virtualenvs, ``build``/``dist`` and caches), an empty ``work/`` and ``results/`` (emptied if they
    existed), ``agent.py`` (the guest agent) and ``job.json``. Guest paths come from ``layout``
    (to run the agent on this host, use ``GuestLayout(io_dir=str(folder), python=...)``). With a
    ``heartbeat`` (the live channel on, see :func:`to_agent_job`) it also gets the channel's module
    beside the agent and the pytest plugin in ``pyti-live/``.
    """
    layout = layout or GuestLayout()
    job = to_agent_job(distribution, recipe, layout, heartbeat=heartbeat)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (layout.wheels, layout.sources, layout.work, layout.results):  # nothing stale survives
        shutil.rmtree(folder / name, ignore_errors=True)
        (folder / name).mkdir()
    for wheel in distribution.wheels:
        shutil.copyfile(wheel, folder / layout.wheels / wheel.name)
    if distribution.sources is not None:
        target = folder / layout.sources
        target.rmdir()
        shutil.copytree(distribution.sources, target, symlinks=True, ignore=_ignore_in_sources)
    shutil.copyfile(agent.__file__, folder / AGENT_FILE)
    if heartbeat is not None:
        shutil.copyfile(livechannel.__file__, folder / CHANNEL_MODULE_FILE)
        (folder / PLUGIN_DIR).mkdir(exist_ok=True)
        shutil.copyfile(pyti_live.__file__, folder / PLUGIN_DIR / f"{PLUGIN_MODULE}.py")
    (folder / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
    return job
