"""Connections, URIs, the embedded driver's root and the accelerator cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import libvirt
import pytest

from vmanager import Connection, HypervisorConnectionError, _libvirt, connect, default_uri
from vmanager._accel import _cache_key, detect_accelerator, probe_accelerator
from vmanager._libvirt import _prepare_embed_root, embed_uri, hypervisor_family, is_local_uri


def test_default_uri_is_embedded_under_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_libvirt, "_embedded", None)  # as in a process that has opened none yet
    monkeypatch.delenv("PYTI_LIBVIRT_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "my cache"))
    assert default_uri() == f"qemu:///embed?root={tmp_path}/my%20cache/pyti/libvirt"
    monkeypatch.setenv("PYTI_LIBVIRT_ROOT", str(tmp_path / "elsewhere"))
    assert default_uri() == embed_uri(tmp_path / "elsewhere")


def test_default_uri_follows_the_embedded_driver_this_process_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_libvirt, "_embedded", ("qemu:///embed?root=/running", Path("/running"), object()))
    monkeypatch.setenv("PYTI_LIBVIRT_ROOT", str(tmp_path / "ignored"))
    assert default_uri() == "qemu:///embed?root=/running"
    with pytest.raises(HypervisorConnectionError, match="allows one per process"):
        Connection(embed_uri(tmp_path / "another"))


def test_a_root_held_by_another_process_gives_a_private_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import fcntl
    import subprocess
    import sys

    monkeypatch.setattr(_libvirt, "_embedded", None)
    monkeypatch.setattr(_libvirt, "_private_root", None)
    monkeypatch.delenv("PYTI_LIBVIRT_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pid_file = tmp_path / "pyti" / "libvirt" / "run" / "qemu" / "driver.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text("1\n")
    holder = subprocess.Popen(  # another process holding the lock, as a running embedded driver does
        [
            sys.executable,
            "-c",
            f"import fcntl,sys,time; f=open({str(pid_file)!r},'r+'); "
            f"fcntl.lockf(f, {fcntl.LOCK_EX}); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        uri = default_uri()
        assert uri.startswith(f"qemu:///embed?root={tmp_path}/pyti/libvirt-")
        assert default_uri() == uri  # chosen once per process
        monkeypatch.setattr(_libvirt, "_private_root", None)
        monkeypatch.setenv("PYTI_LIBVIRT_ROOT", str(tmp_path / "pyti" / "libvirt"))  # held as well
        assert default_uri().startswith(f"qemu:///embed?root={tmp_path}/pyti/libvirt-")
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


@pytest.mark.parametrize(
    ("uri", "family", "local"),
    [
        ("qemu:///system", "qemu", True),
        ("qemu:///embed?root=/x", "qemu", True),
        ("qemu+ssh://host/system", "qemu", False),
        ("test:///default", "test", True),
        ("vbox:///session", "vbox", True),
        ("xen:///system", "xen", True),
        ("libxl:///system", "xen", True),
    ],
)
def test_family_from_uri_scheme(uri: str, family: str, local: bool) -> None:
    assert hypervisor_family(uri) == family
    assert is_local_uri(uri) is local


def test_embed_root_config_written_once(tmp_path: Path) -> None:
    _prepare_embed_root(tmp_path)
    conf = tmp_path / "etc" / "qemu.conf"
    text = conf.read_text()
    assert 'stdio_handler = "file"' in text
    assert "namespaces = []" in text
    conf.write_text(text.replace("namespaces = []\n", ""))  # written by an older vmanager
    _prepare_embed_root(tmp_path)
    assert conf.read_text() == text  # brought up to date
    conf.write_text("# mine\n")
    _prepare_embed_root(tmp_path)
    assert conf.read_text() == "# mine\n"  # a user's qemu.conf is never overwritten


def test_connection_ownership(test_uri: str) -> None:
    with connect(test_uri) as conn:
        assert repr(conn) == f"<vmanager.Connection {test_uri!r} (owned)>"
        assert conn.is_local
        raw = conn.raw
    assert conn.closed
    conn.close()  # idempotent
    with pytest.raises(libvirt.libvirtError):
        raw.getURI()  # really closed

    raw = libvirt.open(test_uri)
    try:
        with Connection.wrap(raw) as borrowed:
            assert "borrowed" in repr(borrowed)
            assert borrowed.family == "test"
        assert raw.isAlive()  # the owner's connection stays open
    finally:
        raw.close()
    with pytest.raises(TypeError):
        Connection.wrap("test:///default")


def test_connection_refused_names_uri() -> None:
    uri = "qemu+tcp://127.0.0.1:1/system"
    with pytest.raises(HypervisorConnectionError, match=r"127\.0\.0\.1:1"):
        connect(uri)


def test_accelerator_cache_is_used(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    cache = tmp_path / "accel.json"
    cache.write_text(json.dumps({"key": _cache_key(qemu), "accel": "kvm"}))
    assert detect_accelerator.__wrapped__(cache) == "kvm"  # answered from the cache, no probe
    cache.write_text(json.dumps({"key": _cache_key(qemu), "accel": "tcg"}))
    assert detect_accelerator.__wrapped__(cache) == "tcg"


@pytest.mark.qemu
def test_accelerator_probe_runs_and_caches(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    answer = probe_accelerator(qemu)
    assert answer in {"kvm", "tcg"}
    if not Path("/dev/kvm").exists():
        assert answer == "tcg"
    cache = tmp_path / "accel.json"
    cache.write_text("not json")  # a broken cache is probed again and rewritten
    assert detect_accelerator.__wrapped__(cache) == answer
    assert json.loads(cache.read_text())["accel"] == answer
