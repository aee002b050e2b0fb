"""The guest agent: runs a job's tasks inside the VM and writes one raw-data record per task.

This module is copied verbatim onto the IO disk and run by the guest's Python
(``python3 agent.py /path/to/io``). It must therefore use the standard library only, and run on the
oldest Python a guest may have (3.8; CPython and PyPy): no imports from pyti, no ``match``, no
``X | Y`` annotations at run time, no ``datetime.UTC``. What it shares with the host (the job's schema,
the record method, the records file) is defined in :mod:`pyti_core.guest.protocol`; the tests check
that the copies here agree with it.

Job file (``job.json`` in the IO folder, :class:`pyti_core.guest.protocol.AgentJob`)::

    {"distribution": "attrs==23.2.0",
     "output_cap": 65536,
     "tasks": [{"id": "1", "name": "install", "argv": ["python3", "-m", "pip", ...],
                "timeout": 600, "cwd": "work", "parse": "junit:report.xml" | "unittest" | null}]}

Each task runs in its own session (process group), so a timeout kills the whole tree. Its wall time
comes from a monotonic clock, its peak RSS and user/system CPU from ``os.wait4`` of a per-task runner
process, whose rusage covers every descendant it waited for: the task's whole process tree.
Records are appended to ``results/records.jsonl`` and fsync'd one by one, so a guest that dies
mid-job still leaves the records of the tasks it finished.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any

try:  # on the IO disk, the live channel's module lies beside the agent
    import livechannel  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover (on the host: the package's copy)
    try:
        from pyti_core.guest import livechannel
    except ImportError:
        livechannel = None

__all__ = ["environment", "main", "parse_junit", "parse_unittest", "run_job", "run_task"]

METHOD = "rawdata.report"  # pyti_core.rawdata.METHOD
RECORDS_FILE = "results/records.jsonl"  # pyti_core.guest.protocol.RECORDS_FILE
JOB_FILE = "job.json"  # pyti_core.guest.protocol.JOB_FILE
DEFAULT_OUTPUT_CAP = 64 * 1024
TRUNCATED = "\n[... output truncated by pyti: {n} more bytes ...]\n"


def _cap(data: bytes, cap: int) -> str:
    text = data.decode("utf-8", errors="replace")
    raw = text.encode("utf-8")
    if len(raw) <= cap:
        return text
    head = raw[:cap].decode("utf-8", errors="ignore")
    return head + TRUNCATED.format(n=len(raw) - cap)


def parse_junit(path: str) -> dict[str, int] | None:
    """Test counts from a JUnit XML file (pytest's ``--junitxml``), or None if unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        tests = int(suite.get("tests", 0))
        failures = int(suite.get("failures", 0))
        errors = int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts["failed"] += failures
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += max(0, tests - failures - errors - skipped)
    return counts


_RAN = re.compile(r"^Ran (\d+) tests? in ", re.MULTILINE)
_RESULT = re.compile(r"^(OK|FAILED)(?: \(([^)]*)\))?\s*$", re.MULTILINE)


def parse_unittest(stderr: str) -> dict[str, int] | None:
    """Test counts from unittest's closing lines (``Ran N tests`` / ``FAILED (failures=1)``)."""
    ran = _RAN.findall(stderr)
    result = _RESULT.findall(stderr)
    if not ran or not result:
        return None
    total = int(ran[-1])
    detail = dict.fromkeys(("failures", "errors", "skipped", "expected failures", "unexpected successes"), 0)
    for part in filter(None, (p.strip() for p in result[-1][1].split(","))):
        key, _, value = part.partition("=")
        if key in detail and value.isdigit():
            detail[key] = int(value)
    failed = detail["failures"] + detail["unexpected successes"]
    return {
        "passed": max(0, total - failed - detail["errors"] - detail["skipped"]),
        "failed": failed,
        "errors": detail["errors"],
        "skipped": detail["skipped"],
    }


def _os_release(paths: tuple[str, ...] = ("/etc/os-release", "/usr/lib/os-release")) -> dict[str, str]:
    """The ``KEY=value`` pairs of os-release(5), quotes removed; empty when there is none."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(65536)
        except OSError:
            continue
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key and not key.startswith("#"):
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                out[key] = value
        return out
    return {}


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(4096).strip()
    except OSError:
        return ""


def _memory_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def environment() -> dict[str, Any]:
    """Where the tasks run, measured here (``environment`` of every record; see docs/rawdata.md)."""
    release = _os_release()
    return {
        "implementation": sys.implementation.name,
        "python_version": platform.python_version(),
        "os_name": release.get("NAME", ""),
        "os_version": release.get("VERSION_ID") or release.get("VERSION_CODENAME", ""),
        "os_pretty_name": release.get("PRETTY_NAME", ""),
        "kernel": platform.uname().release,
        "init": _read_first_line("/proc/1/comm"),
        "cpus": os.cpu_count() or 0,
        "memory_mib": _memory_mib(),
    }


def _runner(argv: list[str], cwd: str | None, env: dict[str, str], timeout: float, out: str) -> None:
    """In the forked runner: run the task, wait for it (so wait4 of us covers its tree), report."""
    status: dict[str, Any] = {"exit_code": None, "timed_out": False, "error": None}
    try:
        with open(out + ".stdout", "wb") as so, open(out + ".stderr", "wb") as se:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=so,
                stderr=se,
                start_new_session=True,
            )
            try:
                status["exit_code"] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status["timed_out"] = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # reap any grandchildren left in the group so their usage is counted too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    except OSError as exc:
        status["error"] = "cannot run {!r}: {}".format(argv[0] if argv else "", exc)
    with open(out + ".status", "w") as f:
        json.dump(status, f)


def run_task(
    task: dict[str, Any],
    io_dir: str,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    live: Any = None,
    env_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one task; return its JSON-RPC 2.0 raw-data record (``live``: the job's live channel;
    ``env_info``: the environment every record carries)."""
    argv = [str(a) for a in task["argv"]]
    cwd = task.get("cwd")
    if cwd is not None and not os.path.isabs(cwd):
        cwd = os.path.join(io_dir, cwd)
    timeout = float(task.get("timeout", 600))
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in task.get("env", {}).items()})
    if live is not None:
        env = live.task_env(env, argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyti-task-") as tmp:
        out = os.path.join(tmp, "task")
        pid = os.fork()
        if pid == 0:  # the runner: its rusage, seen by wait4, is the task's whole tree
            code = 0
            try:
                _runner(argv, cwd, env, timeout, out)
            except BaseException:
                code = 1
            os._exit(code)
        if live is not None:
            live.task_started(str(task["id"]), str(task.get("name", task["id"])), out)
        _, _, usage = os.wait4(pid, 0)
        duration = time.monotonic() - t0
        with open(out + ".stdout", "rb") as f:
            stdout = f.read()
        with open(out + ".stderr", "rb") as f:
            stderr = f.read()
        with open(out + ".status") as f:
            status = json.load(f)
    record_status = "passed"
    if status["error"] is not None:
        record_status = "error"
        stderr += status["error"].encode()
    elif status["timed_out"]:
        record_status = "timeout"
        stderr += f"\n[pyti: killed after the {timeout:g} s timeout]\n".encode()
    elif status["exit_code"] != 0:
        record_status = "failed"
    params: dict[str, Any] = {
        "task_id": str(task["id"]),
        "task": str(task.get("name", task["id"])),
        "status": record_status,
        "exit_code": status["exit_code"],
        "stdout": _cap(stdout, output_cap),
        "stderr": _cap(stderr, output_cap),
        "started_at": started.isoformat().replace("+00:00", "Z"),
        "duration_s": round(duration, 6),
        "max_rss_kb": int(usage.ru_maxrss),
        "cpu_user_s": round(usage.ru_utime, 6),
        "cpu_system_s": round(usage.ru_stime, 6),
    }
    parse = task.get("parse")
    counts = None
    if isinstance(parse, str) and parse.startswith("junit:"):
        counts = parse_junit(os.path.join(cwd or io_dir, parse[len("junit:") :]))
    elif parse == "unittest":
        counts = parse_unittest(stderr.decode("utf-8", errors="replace"))
    if counts is not None:
        params["tests"] = counts
    if env_info is not None:
        params["environment"] = env_info
    return {"jsonrpc": "2.0", "method": METHOD, "params": params}


def run_job(io_dir: str) -> int:
    """Run every task of ``io_dir/job.json``; records go to ``io_dir/results/records.jsonl``."""
    with open(os.path.join(io_dir, JOB_FILE)) as f:
        job = json.load(f)
    records = os.path.join(io_dir, *RECORDS_FILE.split("/"))
    os.makedirs(os.path.dirname(records), exist_ok=True)
    cap = int(job.get("output_cap", DEFAULT_OUTPUT_CAP))
    failures = 0
    # The live channel (when the job has one) only tells the host what happens: the records below are
    # the results, and nothing here waits for the channel.
    live = livechannel.AgentLive(job.get("channel")) if livechannel is not None else None
    if live is not None and live.error:
        sys.stderr.write(f"pyti agent: running without the live channel: {live.error}\n")
    env_info = environment()
    try:
        with open(records, "a") as out:
            for task in job["tasks"]:
                record = run_task(task, io_dir, cap, live, env_info)
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
                if live is not None:
                    live.task_finished(record["params"])
                if record["params"]["status"] != "passed":
                    failures += 1
                    if task.get("stop_on_failure"):
                        break
    finally:
        if live is not None:
            live.close(1 if failures else 0)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: agent.py IO_DIR\n")
        return 2
    return run_job(args[0])


if __name__ == "__main__":
    sys.exit(main())
