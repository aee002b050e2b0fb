"""Run hostile cases in a child process with a memory cap and a time limit.

A case that hangs (a FIFO opened for reading), eats memory (a header claiming a 2**60-entry table) or
crashes the interpreter must fail one test, not hang or kill the whole test session. The child runs
``module:function`` on each case in turn, under ``RLIMIT_AS`` and a per-case ``SIGALRM``, and reports
one JSON line per case: what the call returned or raised.

    results = run_cases("tests.diskhandler.test_image_files:open_case", ["a.qcow2", "b.vmdk"])
    assert results["a.qcow2"].raised == "SpecialFileError"
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
MEMORY_CAP = 768 << 20  # address space of the child; the interpreter and diskhandler need ~80 MiB
FILE_SIZE_CAP = 1 << 30  # no file a case writes grows past this


class CaseTimeout(BaseException):
    """Raised in the child by SIGALRM when one case runs past its time limit."""


@attrs.frozen
class CaseResult:
    """What one case did in the child: ``raised`` is the exception class name or ``None``.

    ``mro`` lists the exception's classes (to check it is a ``DiskHandlerError`` and an ``OSError``),
    ``message`` its text, ``value`` the ``repr`` of what the call returned.
    """

    case: str
    raised: str | None
    mro: tuple[str, ...] = ()
    message: str = ""
    value: str = ""
    seconds: float = 0.0

    @property
    def hung(self) -> bool:
        return self.raised == "CaseTimeout"


def run_cases(
    target: str,
    cases: Sequence[str],
    *,
    per_case: float = 5.0,
    memory: int = MEMORY_CAP,
    cwd: Path | None = None,
) -> dict[str, CaseResult]:
    """Call ``target`` (``"module:function"``) on each case in one child; the results by case.

    A case the child never reported (it crashed the interpreter, or the child was killed) is missing
    from the result and the whole child's stderr is raised in an AssertionError.
    """
    payload = json.dumps({"target": target, "cases": list(cases), "per_case": per_case, "memory": memory})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.childrun"],
        input=payload.encode(),
        capture_output=True,
        timeout=per_case * len(cases) + 60,
        cwd=cwd or ROOT,
        env=env,
        check=False,
    )
    results: dict[str, CaseResult] = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            data["mro"] = tuple(data["mro"])
            results[data["case"]] = CaseResult(**data)
    missing = [c for c in cases if c not in results]
    if missing:
        raise AssertionError(
            f"the child died (exit {proc.returncode}) before reporting {missing[:5]}:\n"
            + proc.stderr.decode(errors="replace")[-4000:]
        )
    return results


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout


def _child() -> None:
    import time

    request = json.loads(sys.stdin.read())
    resource.setrlimit(resource.RLIMIT_AS, (request["memory"], request["memory"]))
    # A write at an absurd file offset fails with EFBIG instead of filling the disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_CAP, FILE_SIZE_CAP))
    module, _, name = request["target"].partition(":")
    func = getattr(importlib.import_module(module), name)
    signal.signal(signal.SIGALRM, _alarm)
    out = sys.stdout
    for case in request["cases"]:
        start = time.monotonic()
        result: dict[str, Any] = {"case": case, "raised": None, "mro": [], "message": "", "value": ""}
        signal.setitimer(signal.ITIMER_REAL, request["per_case"])
        try:
            result["value"] = repr(func(case))[:500]
        except BaseException as exc:
            result["raised"] = type(exc).__name__
            result["mro"] = [c.__name__ for c in type(exc).__mro__]
            result["message"] = str(exc)[:2000]
            if not isinstance(exc, (OSError, ValueError, CaseTimeout, LookupError, ImportError)):
                result["message"] += "\n" + "".join(traceback.format_exception(exc))[-3000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        result["seconds"] = round(time.monotonic() - start, 3)
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    _child()
