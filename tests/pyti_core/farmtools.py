"""Real Dask clusters for the farm's tests: `dask scheduler` and `pyti farm worker` as processes.

Every process listens on 127.0.0.1 only, runs in its own process group (so a test can kill a whole
"host" with SIGKILL) and is stopped at the end of the test, whatever happened.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define
class Proc:
    """A process of the cluster, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process and every process of its group (a whole host going away)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}):\n{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout} s:\n{self.text()[-4000:]}")


@attrs.define
class Cluster:
    """A scheduler and its workers, all stopped by :meth:`stop`."""

    folder: Path
    procs: list[Proc] = attrs.Factory(list)
    address: str = ""

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log = self.folder / f"{name}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: a test can kill the whole "host"
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def scheduler(self, *extra: str, env: dict[str, str] | None = None, protocol: str = "tcp") -> Proc:
        port = free_port()
        self.address = f"{protocol}://127.0.0.1:{port}"
        proc = self.start(
            "scheduler",
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
             *(["--protocol", protocol] if protocol != "tcp" else []), *extra],
            env,
        )  # fmt: skip
        proc.wait_for(r"Scheduler at:", timeout=60)
        return proc

    def worker(self, name: str, *extra: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
        """A `pyti farm worker` joined to the scheduler; returns it and the worker's address."""
        proc = self.start(name, [str(BIN / "pyti"), "farm", "worker", self.address, *extra], env)
        match = proc.wait_for(r"pyti farm worker: (\S+) joined", timeout=120)
        return proc, match.group(1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.kill_group(signal.SIGTERM)


def cluster_in(folder: Path) -> Iterator[Cluster]:
    folder.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(folder)
    try:
        yield cluster
    finally:
        cluster.stop()


def pyti(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the `pyti` command in a new process."""
    return subprocess.run(
        [str(BIN / "pyti"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


# -- TLS: a certificate authority and certificates made here ---------------------------------------


def make_ca_and_certs(folder: Path, names: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    """A CA (``ca.pem``) and, per name, a certificate + key it signed, valid for 127.0.0.1/localhost.

    Returns ``{name: (cert, key)}`` and ``{"ca": (ca.pem, ca.key)}``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pyti test CA {folder.name}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": (folder / "ca.pem", pem_key(ca_key, folder / "ca.key"))}
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    import ipaddress

    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = folder / f"{name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[name] = (cert_path, pem_key(key, folder / f"{name}.key"))
    return out
