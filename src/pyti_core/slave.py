"""The slave's side of the master protocol: take jobs, post their raw-data records back.

A slave is a machine that can run test VMs. It asks the master for work with the JSON-RPC 2.0 call
``jobs.take``, runs the job (``run_job``: a function given by the caller, which boots the VM and returns
the records), and posts the records with ``jobs.submit`` (see :mod:`pyti_core.master`)::

    slave = Slave("http://master.example:8080/")
    stop = threading.Event()
    slave.run_forever(run_job, poll_interval=10, stop_event=stop)

Only the standard library is used (:mod:`urllib.request`). Transport failures raise
:class:`~pyti_core.errors.MasterUnreachableError`, error answers :class:`~pyti_core.errors.RpcError`.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from pyti_core.errors import ConfigError, MasterUnreachableError, RpcError, TaskError
from pyti_core.master import MAX_BODY_BYTES, Job
from pyti_core.rawdata import RawDataRecord

__all__ = ["RunJob", "Slave", "error_record"]

log = logging.getLogger(__name__)

#: What the slave calls for each job: run it (in a VM) and return its records.
RunJob = Callable[[Job], Sequence[RawDataRecord]]
_TRACEBACK_CAP: Final = 64 * 1024


def error_record(job: Job, exc: BaseException, started: datetime, duration_s: float) -> RawDataRecord:
    """The record sent for a job whose run failed on the slave itself (no VM records to send)."""
    text = "".join(traceback.format_exception(exc))[-_TRACEBACK_CAP:]
    return RawDataRecord(
        task_id="pyti",
        task="pyti",
        status="error",
        exit_code=None,
        stdout="",
        stderr=f"pyti could not run job {job.job_id} ({job.distribution}):\n{text}",
        started_at=started,
        duration_s=max(0.0, duration_s),
        max_rss_kb=0,
        cpu_user_s=0.0,
        cpu_system_s=0.0,
    )


class Slave:
    """A JSON-RPC 2.0 client of a master at ``master_url``; ``name`` identifies this slave to it."""

    def __init__(
        self,
        master_url: str,
        *,
        name: str | None = None,
        timeout: float = 60.0,
        max_response: int = MAX_BODY_BYTES,
    ) -> None:
        parsed = urllib.parse.urlsplit(master_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(None, "master_url", f"must be an http:// or https:// URL, got {master_url!r}")
        self.url = master_url
        self.name = name if name is not None else socket.gethostname()
        self.timeout = timeout
        self.max_response = max_response
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """One JSON-RPC 2.0 request; its ``result``. :class:`RpcError` carries an error answer."""
        with self._ids_lock:
            rid = next(self._ids)
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid}).encode()
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read(self.max_response + 1)
        except urllib.error.HTTPError as exc:
            with exc:
                data = exc.read(self.max_response + 1)
            answer = _decode(data)
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                err = answer["error"]
                raise RpcError(
                    int(err.get("code", -32000)), str(err.get("message", "")), err.get("data")
                ) from exc
            raise MasterUnreachableError(self.url, f"HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise MasterUnreachableError(self.url, f"cannot reach the master: {reason}") from exc
        if len(data) > self.max_response:
            raise MasterUnreachableError(self.url, f"answer larger than {self.max_response} bytes")
        answer = _decode(data)
        if not isinstance(answer, dict) or answer.get("jsonrpc") != "2.0" or answer.get("id") != rid:
            raise MasterUnreachableError(self.url, f"not a JSON-RPC 2.0 answer to request {rid}")
        if "error" in answer:
            err = answer["error"]
            if not isinstance(err, dict) or not isinstance(err.get("code"), int):
                raise MasterUnreachableError(self.url, "malformed JSON-RPC error object")
            raise RpcError(err["code"], str(err.get("message", "")), err.get("data"))
        if "result" not in answer:
            raise MasterUnreachableError(self.url, "JSON-RPC answer has neither result nor error")
        return answer["result"]

    def take_job(self) -> Job | None:
        """The next job for this slave, or ``None`` when the queue is empty."""
        result = self.call("jobs.take", {"slave": self.name})
        if result is None:
            return None
        try:
            return Job.from_dict(result)
        except TaskError as exc:
            raise MasterUnreachableError(self.url, f"the master sent an invalid job: {exc}") from exc

    def submit(self, job_id: str, records: Sequence[RawDataRecord]) -> int:
        """Post a job's records (as ``rawdata.report`` notification objects); how many the master stored."""
        result = self.call("jobs.submit", {"job_id": job_id, "records": [r.to_jsonrpc() for r in records]})
        if not isinstance(result, dict) or not isinstance(result.get("accepted"), int):
            raise MasterUnreachableError(self.url, "jobs.submit answered without an 'accepted' count")
        return int(result["accepted"])

    def run_forever(
        self,
        run_job: RunJob,
        *,
        poll_interval: float = 10.0,
        stop_event: threading.Event | None = None,
        max_jobs: int | None = None,
    ) -> int:
        """Take, run and submit jobs until ``stop_event`` is set (or ``max_jobs`` are done); how many ran.

        An empty queue or an unreachable master is waited out (``poll_interval`` seconds). An exception
        from ``run_job`` does not stop the loop: the job gets one ``error`` record with the traceback.
        A submission the master refuses (the job was given to another slave after its lease ran out) is
        logged and dropped.
        """
        stop = stop_event or threading.Event()
        done = 0
        while not stop.is_set() and (max_jobs is None or done < max_jobs):
            try:
                job = self.take_job()
            except MasterUnreachableError as exc:
                log.warning("%s", exc)
                stop.wait(poll_interval)
                continue
            if job is None:
                stop.wait(poll_interval)
                continue
            started = datetime.now(UTC)
            t0 = time.monotonic()
            try:
                records = list(run_job(job))
            except Exception as exc:
                log.exception("job %s (%s) failed on this slave", job.job_id, job.distribution)
                records = [error_record(job, exc, started, time.monotonic() - t0)]
            self._submit_with_retries(job, records, stop, poll_interval)
            done += 1
        return done

    def _submit_with_retries(
        self, job: Job, records: Sequence[RawDataRecord], stop: threading.Event, poll_interval: float
    ) -> None:
        for attempt in itertools.count(1):
            try:
                self.submit(job.job_id, records)
                return
            except MasterUnreachableError as exc:
                log.warning("submitting job %s, attempt %d: %s", job.job_id, attempt, exc)
                if attempt >= 5 or stop.wait(poll_interval):
                    log.error("job %s: records dropped, the master stayed unreachable", job.job_id)
                    return
            except RpcError as exc:
                log.error("job %s: the master refused the records: %s", job.job_id, exc)
                return


def _decode(data: bytes) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
