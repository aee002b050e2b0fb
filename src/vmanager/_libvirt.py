"""The one module that imports libvirt.

It owns:

* libvirt's own log lines: before libvirt is loaded, ``LIBVIRT_LOG_OUTPUTS`` points libvirt's log at a
  pipe this module reads, and each line becomes a record of the ``vmanager.libvirt`` logger (libvirt
  otherwise writes "libvirt version: ..." and "Domain ... is tainted: high-privileges" straight to
  file descriptor 2). A ``LIBVIRT_LOG_OUTPUTS`` the user set is left alone;
* the libvirt event loop: ``virEventRegisterDefaultImpl()`` once, then a daemon thread looping
  ``virEventRunDefaultImpl()``, both before the first ``libvirt.open`` (``qemu:///embed`` needs it to
  watch its QEMU processes, remote URIs need it for keep-alives);
* the process's one embedded QEMU driver (see :func:`default_uri`);
* :class:`Connection`, :class:`Domain` and :class:`DomainSnapshot`: typed wrappers whose methods
  translate ``libvirt.libvirtError`` once, through :func:`translate` (the single mapping to
  :mod:`vmanager.errors`, always chained). No other module sees a raw libvirt object or catches
  ``libvirtError``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

from .errors import (
    ConfigError,
    DomainNotFoundError,
    HypervisorConnectionError,
    HypervisorError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
    VManagerError,
    VMTimeoutError,
)

_log = logging.getLogger("vmanager.libvirt")
logging.getLogger("vmanager").addHandler(logging.NullHandler())  # a library never prints by itself

# libvirt log line: "2026-12-03 15:54:22.604+0000: 12891: warning : func:123 : message"
_LOG_LINE: Final = re.compile(rb"^\S+ \S+: \d+: (debug|info|warning|error) : (?:\S+ : )?(.*)$")
_LOG_LEVELS: Final = {
    b"debug": logging.DEBUG,
    b"info": logging.INFO,
    b"warning": logging.WARNING,
    # every libvirt error that matters reaches the caller as an exception; the log copy is detail
    b"error": logging.DEBUG,
}


def _forward_log(fd: int) -> None:
    """Turn libvirt's log lines read from ``fd`` into ``vmanager.libvirt`` log records."""
    level = logging.DEBUG
    with open(fd, "rb", buffering=0, closefd=True) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                match = _LOG_LINE.match(line)
                text = line
                if match is not None:
                    level = _LOG_LEVELS[match.group(1)]
                    text = match.group(2)
                if text.strip():  # continuation lines keep their record's level
                    _log.log(level, "%s", text.decode("utf-8", "replace"))


def _route_libvirt_log() -> bool:
    """Point libvirt's log output at a pipe read into :mod:`logging` (libvirt reads it when loaded)."""
    if "libvirt" in sys.modules or "LIBVIRT_LOG_OUTPUTS" in os.environ:
        return False  # too late, or the user chose where libvirt logs
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, False)
    # level 3: warnings and errors (libvirt adds its "libvirt version" header lines itself)
    os.environ["LIBVIRT_LOG_OUTPUTS"] = f"3:file:/proc/self/fd/{write_fd}"
    threading.Thread(target=_forward_log, args=(read_fd,), name="libvirt-log", daemon=True).start()
    return True


#: Whether libvirt's log lines go to the ``vmanager.libvirt`` logger in this process.
LOG_ROUTED: Final = _route_libvirt_log()
try:
    import libvirt
finally:
    if os.environ.get("LIBVIRT_LOG_OUTPUTS", "").startswith("3:file:/proc/self/fd/"):
        del os.environ["LIBVIRT_LOG_OUTPUTS"]  # meaningless in a child process


__all__ = [
    "Connection",
    "Domain",
    "DomainSnapshot",
    "Hypervisor",
    "LibvirtError",
    "connect",
    "default_uri",
    "hypervisor_family",
    "translate",
]

#: libvirt's exception class (only this module catches it).
LibvirtError: Final = libvirt.libvirtError

#: libvirt objects have no type information; this alias documents what a value is.
RawConnection = Any
RawDomain = Any
RawSnapshot = Any

Hypervisor = Literal["qemu", "kvm", "vbox", "xen", "test"]

# Domain states (virDomainState), in the order libvirt numbers them.
DOMAIN_STATES: Final = (
    libvirt.VIR_DOMAIN_NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED,
)

UNDEFINE_FLAGS: Final = (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
)
REVERT_RUNNING: Final = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
REVERT_PAUSED: Final = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
SNAPSHOT_DELETE_METADATA_ONLY: Final = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
SNAPSHOT_DELETE_CHILDREN: Final = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN
LIST_ACTIVE: Final = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
XML_INACTIVE: Final = libvirt.VIR_DOMAIN_XML_INACTIVE
SNAPSHOT_CREATE_REDEFINE: Final = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
SNAPSHOT_CREATE_CURRENT: Final = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
SNAPSHOT_CREATE_DISK_ONLY: Final = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
_AFFECT_CONFIG: Final = libvirt.VIR_DOMAIN_AFFECT_CONFIG
SAVE_RUNNING: Final = libvirt.VIR_DOMAIN_SAVE_RUNNING
SAVE_PAUSED: Final = libvirt.VIR_DOMAIN_SAVE_PAUSED

_UNSUPPORTED_CODES: Final = frozenset(
    {
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    }
)
_CONNECTION_CODES: Final = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
_XML_CODES: Final = frozenset({libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL})

_MISSING_QEMU_USER = "Failed to parse user 'libvirt-qemu'"


def translate(
    exc: Exception,
    *,
    uri: str = "",
    vm: str = "",
    operation: str = "",
    snapshot: str | None = None,
    connecting: bool = False,
) -> VManagerError:
    """Map a ``libvirt.libvirtError`` to the most specific :class:`VManagerError`.

    The caller raises the result ``from exc``. ``operation`` prefixes the message (``"start"``,
    ``"snapshot"``...); ``connecting`` marks errors raised by ``libvirt.open``, which all mean the
    hypervisor cannot be reached.
    """
    if not isinstance(exc, libvirt.libvirtError):  # pragma: no cover - programming error
        raise TypeError(f"translate() takes a libvirtError, not {type(exc).__name__}")
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    where = f"{operation}: {message}" if operation else message
    if _MISSING_QEMU_USER in message:
        return HypervisorConnectionError(
            uri,
            f"{message}. libvirt's QEMU driver runs guests as the system user 'libvirt-qemu' when "
            "started as root; create it with `useradd -r libvirt-qemu` (or run as an ordinary user)",
        )
    if connecting or code in _CONNECTION_CODES:
        return HypervisorConnectionError(uri, message)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFoundError(vm, uri)
    if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return SnapshotNotFoundError(vm, snapshot or "?", ())
    if code in _UNSUPPORTED_CODES:
        return UnsupportedOperationError(f"VM {vm!r} on {uri!r}: {where}")
    if code in _XML_CODES:
        return ConfigError(None, where)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return VMTimeoutError(vm, operation or "operation", 0.0, message)
    return HypervisorError(f"VM {vm!r} on {uri!r}: {where}" if vm else where, code)


# -- event loop ----------------------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; vmanager raises them instead."""


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and start its daemon thread, once per process."""
    global _loop_thread  # noqa: PLW0603 - one loop per process is libvirt's own rule
    if _loop_thread is not None:
        return
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-event-loop", daemon=True)
        thread.start()
        _loop_thread = thread


# -- URIs ------------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME`` or ``~/.cache``, read when called (never at import)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else Path.home() / ".cache"


def default_uri() -> str:
    """The URI used when none is given: libvirt's QEMU driver inside this process (``qemu:///embed``).

    The root directory is the root of the embedded driver this process already runs (libvirt runs one
    per process), else ``$PYTI_LIBVIRT_ROOT`` or ``<user cache dir>/pyti/libvirt`` — unless another
    process's embedded driver holds that one (libvirt locks it), in which case this process gets a
    private ``<root>-XXXX`` beside it, removed when it exits.
    Read when called, never at import.
    """
    with _embedded_lock:
        if _embedded is not None:
            return _embedded[0]
        global _private_root  # noqa: PLW0603 - chosen once per process, like the driver itself
        if _private_root is not None:
            return embed_uri(_private_root)
        env = os.environ.get("PYTI_LIBVIRT_ROOT")
        root = Path(env) if env else user_cache_dir() / "pyti" / "libvirt"
        if not _held_by_another_process(root):
            return embed_uri(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        for stale in root.parent.glob(f"{root.name}-*"):  # private roots of processes that are gone
            if not _held_by_another_process(stale):
                shutil.rmtree(stale, ignore_errors=True)
        _private_root = Path(tempfile.mkdtemp(prefix=f"{root.name}-", dir=root.parent))
        atexit.register(shutil.rmtree, _private_root, ignore_errors=True)
        return embed_uri(_private_root)


def _held_by_another_process(root: Path) -> bool:
    """Whether another process's embedded QEMU driver runs on ``root`` (it write-locks driver.pid)."""
    try:
        fd = os.open(root / "run" / "qemu" / "driver.pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        result = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
        return bool(struct.unpack("hhqqi", result)[0] != fcntl.F_UNLCK)
    except OSError:
        return False
    finally:
        os.close(fd)


_embedded_lock = threading.RLock()
_embedded: tuple[str, Path, RawConnection] | None = None
_private_root: Path | None = None


def _open_embedded(uri: str, root: Path) -> RawConnection:
    """The process's embedded QEMU driver: opened once, shared by every Connection, never closed.

    libvirt runs one embedded driver per process, and each ``open`` of one registers a new driver
    (several at once crash libvirt 9.0 in ``defineXML``; repeated ones run out of driver slots), so
    every Connection to it shares the first raw connection, which stays open until the process ends.
    """
    global _embedded  # noqa: PLW0603 - one embedded driver per process is libvirt's own rule
    with _embedded_lock:
        if _embedded is not None:
            open_uri, open_root, raw = _embedded
            if Path(os.path.realpath(root)) != open_root:
                raise HypervisorConnectionError(
                    uri,
                    f"this process already runs libvirt's embedded QEMU driver on {open_root}, and libvirt "
                    f"allows one per process; use {open_uri!r} (vmanager.default_uri() returns it) or "
                    "another process",
                )
            return raw
        _prepare_embed_root(root)
        try:
            raw = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise translate(exc, uri=uri, connecting=True) from exc
        _embedded = (uri, Path(os.path.realpath(root)), raw)
        return raw


def embed_uri(root: str | Path) -> str:
    """The ``qemu:///embed`` URI for an embedded-driver root directory."""
    return "qemu:///embed?root=" + urllib.parse.quote(str(Path(root).absolute()), safe="/")


def _embed_root(uri: str) -> Path | None:
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "qemu" or parsed.path != "/embed":
        return None
    roots = urllib.parse.parse_qs(parsed.query).get("root")
    return Path(roots[0]) if roots else None


_CONF_MARKER = "# Written by vmanager"


def _prepare_embed_root(root: Path) -> None:
    """Write ``etc/qemu.conf`` so that serial logs are written by QEMU itself.

    The embedded driver otherwise hands stdio and character-device logs to ``virtlogd``, a daemon that
    an embedded setup does not have. As root, QEMU runs as root too (see below). A qemu.conf that
    vmanager did not write is left alone; one it wrote is brought up to date.
    """
    conf = root / "etc" / "qemu.conf"
    text = f"{_CONF_MARKER}: no virtlogd in an embedded driver, QEMU writes its logs itself.\n"
    text += 'stdio_handler = "file"\n'
    if os.geteuid() == 0:
        # As root, libvirt would run QEMU as 'libvirt-qemu', which cannot reach files under a private
        # home such as /root/.cache. The embedded driver belongs to the calling program: run QEMU with
        # the caller's own rights, as running qemu-system-* directly would.
        # libvirt logs a "tainted: high-privileges" warning to stderr for each such start; set
        # LIBVIRT_LOG_OUTPUTS="3:file:/some/file" in the environment before Python starts to move it.
        text += 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
    # No private /dev per guest: needs device-mapper and buys nothing for a local test VM.
    text += "namespaces = []\n"
    try:
        current = conf.read_text()
    except FileNotFoundError:
        current = None
    if current == text or (current is not None and not current.startswith(_CONF_MARKER)):
        return
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)


def hypervisor_family(uri: str) -> Hypervisor:
    """The domain XML family for a URI, from its scheme (``qemu+ssh`` -> ``qemu``, ``libxl`` -> ``xen``)."""
    scheme = urllib.parse.urlsplit(uri).scheme.split("+", 1)[0].lower()
    if scheme == "qemu":
        return "qemu"
    if scheme in {"xen", "libxl"}:
        return "xen"
    if scheme == "vbox":
        return "vbox"
    if scheme == "test":
        return "test"
    raise ConfigError("uri", f"unsupported hypervisor URI {uri!r}; use qemu://, test://, vbox:// or xen://")


def is_local_uri(uri: str) -> bool:
    """True when the hypervisor sees this machine's files (no host part in the URI)."""
    return not urllib.parse.urlsplit(uri).netloc


# -- connections -----------------------------------------------------------------------------------


class Connection:
    """An open hypervisor connection.

    ``Connection(uri)`` opens ``uri`` (``None``: :func:`default_uri`) and owns it: :meth:`close` (or
    leaving the ``with`` block) closes it. :meth:`wrap` adopts a ``libvirt.virConnect`` the caller
    opened; the caller keeps ownership and :meth:`close` leaves it open. Nothing is closed by ``__del__``.
    """

    __slots__ = ("_closed", "_owned", "_running_xml", "family", "raw", "uri")

    def __init__(self, uri: str | None = None) -> None:
        uri = default_uri() if uri is None else uri
        if type(uri) is not str or not uri.isprintable() or not uri.isascii():
            raise ConfigError(
                "uri", f"{uri!r} is not a hypervisor URI (printable ASCII; percent-encode the rest)"
            )
        family = hypervisor_family(uri)
        root = _embed_root(uri)
        ensure_event_loop()
        if root is not None:
            raw = _open_embedded(uri, root)
        else:
            try:
                raw = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise translate(exc, uri=uri, connecting=True) from exc
        self.uri: str = uri
        self.family: Hypervisor = family
        self.raw: RawConnection = raw
        # the process-wide embedded driver is shared and stays open (see _open_embedded)
        self._owned = root is None
        self._closed = False
        self._running_xml: dict[int, str] = {}

    @classmethod
    def wrap(cls, raw: RawConnection) -> Connection:
        """Adopt an open ``libvirt.virConnect``; the caller keeps ownership."""
        if not isinstance(raw, libvirt.virConnect):
            raise TypeError(f"expected a libvirt.virConnect, got {type(raw).__name__}")
        self = cls.__new__(cls)
        try:
            self.uri = raw.getURI()
        except libvirt.libvirtError as exc:
            raise translate(exc, connecting=True) from exc
        self.family = hypervisor_family(self.uri)
        self.raw = raw
        self._owned = False
        self._closed = False
        self._running_xml = {}
        return self

    @property
    def is_local(self) -> bool:
        """True when the hypervisor runs on this machine (it sees the same files)."""
        return is_local_uri(self.uri)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection if this object opened it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owned:
            try:
                self.raw.close()
            except libvirt.libvirtError as exc:
                raise translate(exc, uri=self.uri) from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("owned" if self._owned else "borrowed")
        return f"<vmanager.Connection {self.uri!r} ({state})>"

    # -- calls ------------------------------------------------------------------------------------

    def _err(self, exc: libvirt.libvirtError, operation: str, vm: str = "") -> VManagerError:
        return translate(exc, uri=self.uri, vm=vm, operation=operation)

    def lookup(self, name: str) -> Domain:
        """The domain called ``name``; :class:`DomainNotFoundError` when there is none."""
        try:
            return Domain(self.raw.lookupByName(name), name, self.uri)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "lookup", name) from exc

    def find(self, name: str) -> Domain | None:
        """The domain called ``name``, or ``None``."""
        try:
            return Domain(self.raw.lookupByName(name), name, self.uri)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._err(exc, "lookup", name) from exc

    def define(self, name: str, xml: str) -> Domain:
        """Define (or redefine) a persistent domain from its XML."""
        try:
            return Domain(self.raw.defineXML(xml), name, self.uri)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "define", name) from exc

    def domain_xmls(self, *, active_only: bool = False) -> list[str]:
        """The XML of every domain (of every running one with ``active_only``).

        A running domain's XML is remembered by its domain ID (a new ID at every start), so checking
        the running domains before each start costs one listing, not one XML per domain.
        """
        try:
            raws = self.raw.listAllDomains(LIST_ACTIVE if active_only else 0)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "list domains") from exc
        out = []
        cache = self._running_xml
        seen = {}
        for raw in raws:
            try:
                ident = raw.ID()
                text = cache.get(ident) if ident > 0 else None
                if text is None:
                    text = raw.XMLDesc(0)
                if ident > 0:
                    seen[ident] = text
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # else it vanished while we looked
                    raise self._err(exc, "list domains") from exc
                continue
            out.append(text)
        if active_only:
            self._running_xml = seen
        return out

    def domain_names(self) -> list[str]:
        """The names of every domain on this connection, defined or running, sorted."""
        try:
            return sorted(str(raw.name()) for raw in self.raw.listAllDomains(0))
        except libvirt.libvirtError as exc:
            raise self._err(exc, "list domains") from exc

    def capabilities(self) -> str:
        try:
            return str(self.raw.getCapabilities())
        except libvirt.libvirtError as exc:
            raise self._err(exc, "capabilities") from exc

    def lib_version(self) -> tuple[int, int, int]:
        """The version of libvirt serving this connection (major, minor, micro)."""
        try:
            number = int(self.raw.getLibVersion())
        except libvirt.libvirtError as exc:
            raise self._err(exc, "version") from exc
        return number // 1_000_000, number // 1000 % 1000, number % 1000

    def saved_domain_xml(self, path: Path, vm: str) -> str:
        """The domain XML stored in a saved memory image (``virsh save-image-dumpxml``)."""
        try:
            return str(self.raw.saveImageGetXMLDesc(str(path), 0))
        except libvirt.libvirtError as exc:
            raise self._err(exc, "read saved memory", vm) from exc

    def restore(self, path: Path, xml: str, vm: str, *, paused: bool = False) -> None:
        """Start a domain from saved memory, with ``xml`` (ABI-compatible) as its definition."""
        try:
            self.raw.restoreFlags(str(path), xml, SAVE_PAUSED if paused else SAVE_RUNNING)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "restore memory", vm) from exc


def connect(uri: str | None = None) -> Connection:
    """Open ``uri`` (default: :func:`default_uri`); use as ``with connect(...) as conn:``."""
    return Connection(uri)


# -- domains ---------------------------------------------------------------------------------------


class Domain:
    """One libvirt domain; every method translates libvirt's errors (named after the VM) once."""

    __slots__ = ("name", "raw", "uri")

    def __init__(self, raw: RawDomain, name: str, uri: str) -> None:
        self.raw = raw
        self.name = name
        self.uri = uri

    def _err(self, exc: libvirt.libvirtError, operation: str, snapshot: str | None = None) -> VManagerError:
        return translate(exc, uri=self.uri, vm=self.name, operation=operation, snapshot=snapshot)

    def xml_desc(self, *, inactive: bool = False) -> str:
        try:
            return str(self.raw.XMLDesc(XML_INACTIVE if inactive else 0))
        except libvirt.libvirtError as exc:
            raise self._err(exc, "read definition") from exc

    def state(self) -> int:
        """libvirt's ``virDomainState`` code."""
        try:
            return self.raw.state()[0]  # type: ignore[no-any-return]
        except libvirt.libvirtError as exc:
            raise self._err(exc, "state") from exc

    def create(self) -> None:
        try:
            self.raw.create()
        except libvirt.libvirtError as exc:
            raise self._err(exc, "start") from exc

    def destroy(self) -> None:
        try:
            self.raw.destroy()
        except libvirt.libvirtError as exc:
            raise self._err(exc, "stop") from exc

    def shutdown(self) -> None:
        try:
            self.raw.shutdown()
        except libvirt.libvirtError as exc:
            raise self._err(exc, "shutdown") from exc

    def suspend(self) -> None:
        try:
            self.raw.suspend()
        except libvirt.libvirtError as exc:
            raise self._err(exc, "pause") from exc

    def resume(self) -> None:
        try:
            self.raw.resume()
        except libvirt.libvirtError as exc:
            raise self._err(exc, "resume") from exc

    def reboot(self) -> None:
        try:
            self.raw.reboot(0)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "reboot") from exc

    def undefine(self) -> None:
        """Remove the definition (with its managed save and snapshot metadata)."""
        try:
            self.raw.undefineFlags(UNDEFINE_FLAGS)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "undefine") from exc

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot_create(self, xml: str, name: str, flags: int = 0) -> DomainSnapshot:
        try:
            return DomainSnapshot(self.raw.snapshotCreateXML(xml, flags), name, self)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "snapshot", snapshot=name) from exc

    def snapshot(self, name: str) -> DomainSnapshot | None:
        """The snapshot called ``name``, or ``None``."""
        try:
            return DomainSnapshot(self.raw.snapshotLookupByName(name, 0), name, self)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise self._err(exc, "snapshot lookup", snapshot=name) from exc

    def snapshots(self) -> list[DomainSnapshot]:
        try:
            return [DomainSnapshot(raw, raw.getName(), self) for raw in self.raw.listAllSnapshots(0)]
        except libvirt.libvirtError as exc:
            raise self._err(exc, "list snapshots") from exc

    def snapshot_names(self) -> list[str]:
        try:
            return [str(n) for n in self.raw.snapshotListNames(0)]
        except libvirt.libvirtError as exc:
            raise self._err(exc, "list snapshots") from exc

    def current_snapshot(self) -> DomainSnapshot | None:
        try:
            if not self.raw.hasCurrentSnapshot(0):
                return None
            raw = self.raw.snapshotCurrent(0)
            return DomainSnapshot(raw, raw.getName(), self)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "current snapshot") from exc

    def revert(self, snap: DomainSnapshot, flags: int = 0) -> None:
        try:
            self.raw.revertToSnapshot(snap.raw, flags)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "rollback", snapshot=snap.name) from exc

    def open_console(self) -> ConsoleStream:
        return ConsoleStream(self)

    # -- application metadata (kept in the persistent definition) ------------------------------

    def metadata(self, namespace: str) -> str | None:
        """The ``<metadata>`` element vmanager keeps under ``namespace``, or ``None``."""
        try:
            return str(self.raw.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, _AFFECT_CONFIG))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise self._err(exc, "read metadata") from exc

    def set_metadata(self, namespace: str, prefix: str, xml: str | None) -> None:
        """Replace (``None``: remove) vmanager's ``<metadata>`` element under ``namespace``."""
        try:
            self.raw.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, prefix, namespace, _AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "write metadata") from exc

    # -- block jobs -------------------------------------------------------------------------------

    def block_copy(self, disk: str, dest_xml: str) -> None:
        """Start copying a running disk's whole chain into the file ``dest_xml`` describes."""
        try:
            self.raw.blockCopy(disk, dest_xml, None, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
        except libvirt.libvirtError as exc:
            raise self._err(exc, f"copy disk {disk}") from exc

    def block_job_progress(self, disk: str) -> tuple[int, int] | None:
        """(done, total) of the disk's block job, ``None`` when it has none."""
        try:
            info = self.raw.blockJobInfo(disk, 0)
        except libvirt.libvirtError as exc:
            raise self._err(exc, f"block job of {disk}") from exc
        return (int(info["cur"]), int(info["end"])) if info else None

    def block_job_finish(self, disk: str, *, pivot: bool) -> None:
        """End the disk's block job; ``pivot`` switches the guest to the copy."""
        try:
            self.raw.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT if pivot else 0)
        except libvirt.libvirtError as exc:
            raise self._err(exc, f"finish the block job of {disk}") from exc


class DomainSnapshot:
    """One snapshot of a :class:`Domain`."""

    __slots__ = ("domain", "name", "raw")

    def __init__(self, raw: RawSnapshot, name: str, domain: Domain) -> None:
        self.raw = raw
        self.name = name
        self.domain = domain

    def _err(self, exc: libvirt.libvirtError, operation: str) -> VManagerError:
        return self.domain._err(exc, operation, snapshot=self.name)

    def xml_desc(self) -> str:
        try:
            return str(self.raw.getXMLDesc(0))
        except libvirt.libvirtError as exc:
            raise self._err(exc, "read snapshot") from exc

    def parent_name(self) -> str | None:
        try:
            return str(self.raw.getParent(0).getName())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise self._err(exc, "read snapshot") from exc

    def children_names(self) -> list[str]:
        try:
            return [str(n) for n in self.raw.listChildrenNames(0)]
        except libvirt.libvirtError as exc:
            raise self._err(exc, "read snapshot") from exc

    def is_current(self) -> bool:
        try:
            return bool(self.raw.isCurrent(0))
        except libvirt.libvirtError as exc:
            raise self._err(exc, "read snapshot") from exc

    def delete(self, flags: int = 0) -> None:
        try:
            self.raw.delete(flags)
        except libvirt.libvirtError as exc:
            raise self._err(exc, "delete snapshot") from exc


# -- console stream --------------------------------------------------------------------------------


class ConsoleStream:
    """A non-blocking libvirt stream bound to a domain's serial console."""

    __slots__ = ("_stream", "closed")

    def __init__(self, dom: Domain) -> None:
        try:
            stream = dom.raw.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
            dom.raw.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except libvirt.libvirtError as exc:
            raise dom._err(exc, "open console") from exc
        self._stream = stream
        self.closed = False

    def read_available(self, limit: int = 1 << 16) -> bytes | None:
        """Bytes waiting on the console (``b""`` if none yet), ``None`` at end of stream."""
        chunks: list[bytes] = []
        total = 0
        while total < limit:
            try:
                got = self._stream.recv(4096)
            except libvirt.libvirtError:
                # A console stream errors out when the guest goes away; treat it as end of stream.
                self.closed = True
                return b"".join(chunks) or None
            if got == -2:  # would block
                break
            if not got:
                self.closed = True
                return b"".join(chunks) or None
            chunks.append(got)
            total += len(got)
        return b"".join(chunks)

    def send(self, data: bytes) -> int:
        """Send what the stream takes now; returns the byte count (0 when it would block)."""
        try:
            sent = self._stream.send(data)
        except libvirt.libvirtError as exc:
            self.closed = True
            raise translate(exc, operation="console write") from exc
        return 0 if sent == -2 else int(sent)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._stream.finish()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
