"""config: TOML job files, and errors that name the file and the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pyti_core.config import JobConfig
from pyti_core.errors import ConfigError
from pyti_core.packages import DEBIAN_12, GuestTarget
from pyti_core.tasks import RECIPES


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_full_job_file(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    path = write(
        tmp_path,
        """
        distribution = "attrs==23.2.0"
        recipe = "default"
        timeout = 3600

        [timeouts]
        pytest = 900

        [guest]
        python = "3.12"
        glibc = "2.39"

        [packages]
        index_url = "https://pypi.org/simple"
        find_links = ["./wheels"]
        cache_dir = "cache"

        [results]
        report = "out/report.json"
        """,
    )
    config = JobConfig.from_toml(path)
    assert config.distribution == "attrs==23.2.0"
    assert [t.name for t in config.recipe.tasks] == ["install", "import", "pytest"]
    assert config.recipe.tasks[2].timeout == 900
    assert config.recipe.tasks[0].timeout == RECIPES["default"].tasks[0].timeout
    assert config.recipe.requirements == ("pytest",)
    assert config.job_timeout == 3600
    assert config.target == GuestTarget(python_version=(3, 12), glibc=(2, 39))
    assert config.index_url == "https://pypi.org/simple"
    assert config.find_links == (tmp_path / "wheels",)
    assert config.cache_dir == tmp_path / "cache"
    assert config.report == tmp_path / "out" / "report.json"
    assert config.source == path


def test_minimal_job_and_local_paths(tmp_path: Path) -> None:
    config = JobConfig.from_toml(write(tmp_path, 'distribution = "six"\n'))
    assert (config.distribution, config.recipe, config.target) == ("six", RECIPES["default"], DEBIAN_12)
    assert (config.report, config.job_timeout) == (None, None)
    (tmp_path / "proj").mkdir()
    (tmp_path / "x-1.0.tar.gz").write_bytes(b"")
    assert JobConfig.from_toml(write(tmp_path, 'distribution = "./proj"\n')).distribution == tmp_path / "proj"
    sdist = JobConfig.from_toml(write(tmp_path, 'distribution = "x-1.0.tar.gz"\n')).distribution
    assert sdist == tmp_path / "x-1.0.tar.gz"


def test_custom_tasks(tmp_path: Path) -> None:
    config = JobConfig.from_toml(
        write(
            tmp_path,
            """
            distribution = "six==1.16.0"

            [[tasks]]
            kind = "install"

            [[tasks]]
            name = "smoke"
            kind = "command"
            argv = ["python3", "-c", "import six"]
            timeout = 60
            env = {LANG = "C.UTF-8"}

            [[tasks]]
            kind = "pytest"
            argv = ["-x"]
            """,
        )
    )
    install, smoke, tests = config.recipe.tasks
    assert (install.name, install.kind, install.stops_on_failure) == ("install", "install", True)
    assert (smoke.argv, smoke.timeout, smoke.env) == (
        ("python3", "-c", "import six"),
        60.0,
        (("LANG", "C.UTF-8"),),
    )
    assert (tests.name, tests.argv) == ("pytest", ("-x",))
    assert config.recipe.requirements == ("pytest",)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("recipe = 'default'\n", "distribution", "is required"),
        ("distribution = 3\n", "distribution", "non-empty string"),
        ("distribution = 'x'\nrecipie = 'default'\n", "recipie", "unknown key"),
        ("distribution = 'x'\nrecipe = 'fast'\n", "recipe", "unknown recipe 'fast'"),
        ("distribution = './nope'\n", "distribution", "does not exist"),
        ("distribution = '--index-url=http://evil'\n", "distribution", "must be a requirement"),
        ("distribution = 'x'\ntimeout = -1\n", "timeout", "seconds > 0"),
        ("distribution = 'x'\ntimeout = true\n", "timeout", "seconds > 0"),
        ("distribution = 'x'\n[timeouts]\nunittest = 5\n", "timeouts.unittest", "unknown key"),
        ("distribution = 'x'\n[guest]\npython = 3.11\n", "guest.python", "MAJOR.MINOR"),
        ("distribution = 'x'\n[guest]\nos = 'win'\n", "guest.os", "unknown key"),
        ("distribution = 'x'\n[packages]\nfind_links = './w'\n", "packages.find_links", "list of"),
        ("distribution = 'x'\n[results]\nmaster = 'http://m/'\n", "results.master", "pyti farm run"),
        ("distribution = 'x'\nresults = 5\n", "results", "must be a table"),
        ("distribution = 'x'\nrecipe = 'default'\n[[tasks]]\nkind = 'pytest'\n", "tasks", "not both"),
        ("distribution = 'x'\n[[tasks]]\nkind = 'shell'\n", "tasks[0]", "kind must be one of"),
        ("distribution = 'x'\n[[tasks]]\nkind = 'command'\n", "tasks[0]", "non-empty argv"),
        ("distribution = 'x'\n[[tasks]]\nkind = 'pytest'\nargv = [1]\n", "tasks[0].argv", "list of"),
        ("distribution = 'x'\n[[tasks]]\nkind = 'pytest'\n[[tasks]]\nkind = 'pytest'\n", "tasks", "unique"),
        ("distribution = 'x'\ntasks = []\n", "tasks", "non-empty array"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        JobConfig.from_toml(path)
    assert info.value.key == key
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the job file") as info:
        JobConfig.from_toml(tmp_path / "missing.toml")
    assert info.value.key is None
    with pytest.raises(ConfigError, match="not valid TOML"):
        JobConfig.from_toml(write(tmp_path, "distribution = \n"))
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"distribution = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        JobConfig.from_toml(bad)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        JobConfig.from_toml(big)
    assert isinstance(info.value, ValueError)


def test_prepare_with_the_job_settings_offline(tmp_path: Path) -> None:
    from pyti_core.packages import bundled_pip_wheel

    from .test_packages import make_sdist, make_wheel, tiny_pair

    pip_wheel = bundled_pip_wheel()
    if pip_wheel is None:
        pytest.skip("this Python has no ensurepip-bundled pip wheel")
    main, dep = tiny_pair(tmp_path / "projects")
    make_wheel(dep, tmp_path / "wheels")
    make_sdist(main, tmp_path / "dist")
    path = write(
        tmp_path,
        """
        distribution = "dist/pytiny-0.3.tar.gz"
        recipe = "install-only"
        [packages]
        no_index = true
        find_links = ["wheels"]
        """,
    )
    config = JobConfig.from_toml(path)
    assert config.no_index
    dist = config.prepare(tmp_path / "out", pip_wheel=pip_wheel)
    assert dist.requirement == "pytiny==0.3"
    assert sorted(p.name.split("-")[0] for p in dist.wheels) == ["pip", "pytiny", "pytiny_dep"]
    with pytest.raises(ConfigError, match="true or false"):
        JobConfig.from_toml(write(tmp_path, "distribution = 'x'\n[packages]\nno_index = 'yes'\n"))


def test_the_live_channel_table(tmp_path: Path) -> None:
    from pyti_core.channel import ChannelConfig

    job = tmp_path / "job.toml"
    job.write_text('distribution = "attrs==23.2.0"\n')
    assert JobConfig.from_toml(job).channel == ChannelConfig()  # on by default
    job.write_text('distribution = "attrs==23.2.0"\n[channel]\nstall_timeout = 12\nheartbeat = 0.5\n')
    assert JobConfig.from_toml(job).channel == ChannelConfig(stall_timeout=12, heartbeat=0.5)
    job.write_text('distribution = "attrs==23.2.0"\n[channel]\nenabled = false\n')
    assert JobConfig.from_toml(job).channel is None
    for bad, key in (
        ("enabled = 1", "channel.enabled"),
        ("stall_timeout = -3", "channel.stall_timeout"),
        ("stall_timeout = 2\nheartbeat = 5", "channel"),
        ("stal_timeout = 2", "channel.stal_timeout"),
    ):
        job.write_text(f'distribution = "attrs==23.2.0"\n[channel]\n{bad}\n')
        with pytest.raises(ConfigError) as info:
            JobConfig.from_toml(job)
        assert info.value.key == key, info.value
