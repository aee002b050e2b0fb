"""VirtualMachine: one libvirt domain — definition, lifecycle and the entry points of everything else.

::

    from vmanager import VirtualMachine, VMConfig

    config = VMConfig(name="demo", memory=256, hd_location="disk.qcow2", serial_log="serial.log")
    with VirtualMachine("demo", "test:///default", config=config) as vm:
        vm.start()
        vm.snapshot("clean", description="fresh install")
        ...
        vm.rollback("clean")      # back to the snapshot, in the run state it was taken in

The first argument is the libvirt domain name and wins over ``config.name``, which becomes the domain's
``<title>`` when the two differ. With a config, the domain is defined (persistently) unless a domain of
that name already exists: then the VM attaches to it when its hardware matches the config, and a
:class:`ConfigError` says what differs when it does not. :meth:`VirtualMachine.define` and
:meth:`VirtualMachine.attach` say which of the two is meant. Everything else (disks, overlays, serial
log) is read back from the domain's own XML, so a VM attached by name alone works the same.

Snapshots live in :mod:`vmanager._snapshots`, the console in :mod:`vmanager._console`, overlays in
:mod:`vmanager._overlays`, the camelCase names in :mod:`vmanager.compat`.
"""

from __future__ import annotations

import html
import os
import re
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import attrs

from . import _console, _domain_info, _overlays, _snapshots
from . import _libvirt as lv
from ._accel import detect_accelerator
from ._domain_xml import plan_disks, render
from ._snapshots import Snapshot
from .compat import PyTICompat
from .config import VMConfig, check_text
from .errors import (
    ConfigError,
    DiskInUseError,
    DiskNotFoundError,
    DomainNotFoundError,
    UnsupportedOperationError,
    VManagerError,
    VMStateError,
    VMTimeoutError,
)
from .state import ACTIVE, STATES, STOPPED, RunState

__all__ = ["VirtualMachine"]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_DESCRIPTION_MAX: Final = 64 << 10
_STATES: Final = STATES

Hypervisor = str | lv.Connection | Any | None


def _check_name(kind: str, name: object) -> str:
    if type(name) is not str or not _NAME_RE.fullmatch(name):
        raise ConfigError(kind, f"{name!r} is not a valid name (1-64 of letters, digits, '._+-')")
    return name


def _check_file(field: str, path: Path) -> None:
    """A file the VM reads must exist and be a regular file or a block device (a FIFO would hang QEMU)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DiskNotFoundError(field, path) from None
    except OSError as exc:
        raise ConfigError(field, f"cannot use {path}: {exc.strerror}") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(field, f"{path} is {kind}; give an image file")


def _coerce_config(name: str, config: VMConfig | Mapping[str, Any] | None) -> VMConfig | None:
    if isinstance(config, Mapping):
        return VMConfig.from_dict({"name": name, **config})
    if config is not None and not isinstance(config, VMConfig):
        raise ConfigError("config", f"expected a VMConfig or a dict, got {type(config).__name__}")
    return config


class VirtualMachine(PyTICompat):
    """A libvirt domain with a run-state guard, snapshots, overlay rollback and a serial console.

    ``uri`` is a hypervisor URI (``None``: ``qemu:///embed`` under the user cache dir, see
    :func:`vmanager.default_uri`), an open ``libvirt.virConnect`` or a :class:`vmanager.Connection`. A
    connection given as a URI is owned and closed by :meth:`close` / the ``with`` block; an injected one
    is left open. ``config`` is a :class:`VMConfig` or a dict for :meth:`VMConfig.from_dict`.

    Used as a context manager the VM is shut down on exit (ACPI, then forced after
    ``shutdown_timeout`` seconds), so no running domain is left behind; the definition stays.
    """

    __slots__ = ("_console", "_dom", "_owns_connection", "_undefined", "config", "connection", "name",
                 "shutdown_timeout")  # fmt: skip

    def __init__(
        self,
        name: str,
        uri: Hypervisor = None,
        config: VMConfig | Mapping[str, Any] | None = None,
        *,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.name: str = _check_name("name", name)
        self.config: VMConfig | None = _coerce_config(name, config)
        self.shutdown_timeout = shutdown_timeout
        if uri is None or type(uri) is str:
            self.connection = lv.Connection(uri)
            self._owns_connection = True
        else:
            self.connection = uri if isinstance(uri, lv.Connection) else lv.Connection.wrap(uri)
            self._owns_connection = False
        self._undefined = False
        try:
            dom = self.connection.find(name)
            if dom is None:
                if self.config is None:
                    raise DomainNotFoundError(name, self.connection.uri)
                dom = self._define(self.config)
            elif self.config is not None:
                self._check_same_hardware(dom, self.config)
        except BaseException:
            if self._owns_connection:
                self.connection.close()
            raise
        self._dom: lv.Domain = dom
        self._console = _console.SerialConsole(dom, lambda: self.state)

    @classmethod
    def define(
        cls, config: VMConfig | Mapping[str, Any], uri: Hypervisor = None, *, shutdown_timeout: float = 30.0
    ) -> VirtualMachine:
        """Define a VM named ``config.name`` from ``config``.

        A domain of that name that already exists is attached to when its hardware is the config's;
        otherwise :class:`ConfigError` says what differs.
        """
        if isinstance(config, Mapping):
            if "name" not in config:
                raise ConfigError("name", "the config needs a name")
            config = VMConfig.from_dict(config)
        if not isinstance(config, VMConfig):
            raise ConfigError("config", f"expected a VMConfig or a dict, got {type(config).__name__}")
        return cls(config.name, uri, config, shutdown_timeout=shutdown_timeout)

    @classmethod
    def attach(cls, name: str, uri: Hypervisor = None, *, shutdown_timeout: float = 30.0) -> VirtualMachine:
        """The existing domain called ``name``; :class:`DomainNotFoundError` when there is none."""
        return cls(name, uri, None, shutdown_timeout=shutdown_timeout)

    @classmethod
    def with_overlay(
        cls,
        name: str,
        uri: Hypervisor = None,
        config: VMConfig | Mapping[str, Any] | None = None,
        *,
        overlay_dir: str | Path | None = None,
        shutdown_timeout: float = 30.0,
    ) -> VirtualMachine:
        """A VM whose system disk is a read-only base under a throwaway qcow2 overlay (QEMU only).

        :meth:`rollback` without a name then discards every change since the base (milliseconds when
        the VM is shut off), whatever the base's format (raw, VDI, VMDK, VHD, qcow2). The overlay is
        made on this machine, so the hypervisor must be local too.
        """
        config = _coerce_config(name, config)
        if config is None:
            raise ConfigError("config", "with_overlay needs a config with hd_location")
        changes: dict[str, Any] = {"rollback": "overlay"}
        if overlay_dir is not None:
            changes["overlay_dir"] = Path(overlay_dir)
        return cls(name, uri, attrs.evolve(config, **changes), shutdown_timeout=shutdown_timeout)

    # -- definition ---------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.connection.uri

    def _validate_paths(self, config: VMConfig) -> bool:
        if config.validate_paths is not None:
            return config.validate_paths
        return self.connection.family != "test" and self.connection.is_local

    def _domain_type(self, config: VMConfig) -> str | None:
        if self.connection.family != "qemu":
            return None
        if config.accel == "kvm":
            return "kvm"
        if config.accel == "tcg":
            return "qemu"
        if self.connection.is_local:
            cache = lv.user_cache_dir() / "pyti" / "accel.json"
            return "kvm" if detect_accelerator(cache) == "kvm" else "qemu"
        caps = self.connection.capabilities()
        return "kvm" if "<domain type='kvm'" in caps or '<domain type="kvm"' in caps else "qemu"

    def _overlay_dir(self, config: VMConfig | None = None) -> Path:
        """Where this VM's overlays (and external snapshot layers) go."""
        config = self.config if config is None else config
        if config is not None and config.overlay_dir is not None:
            return config.overlay_dir.absolute()
        return lv.user_cache_dir() / "pyti" / "overlays"

    def _render(self, config: VMConfig, overlays: Mapping[str, Path]) -> str:
        family = self.connection.family
        return render(
            config, family, name=self.name, domain_type=self._domain_type(config), overlays=overlays
        )

    def _check_same_hardware(self, dom: lv.Domain, config: VMConfig) -> None:
        live, chains = _domain_info.hardware(dom.xml_desc(inactive=True))
        wanted, _ = _domain_info.hardware(self._render(config, {}))
        if self.connection.is_local:
            # a disk under overlays or external snapshots: its file is further down the backing chain,
            # which the inactive definition does not list; read it from the images themselves
            for target, _device, path in wanted.disks:
                top = next((p for t, _d, p in live.disks if t == target), None)
                if top and path not in chains.get(target, set()):
                    chains[target] = chains.get(target, set()) | {
                        os.path.abspath(p) for p in _snapshots.backing_chain(Path(top))
                    }
        differences = wanted.differences(live, chains)
        if differences:
            raise ConfigError(
                "config",
                f"a VM named {self.name!r} already exists on {self.uri!r} with other hardware: "
                f"{'; '.join(differences)}. Attach to it without a config (VirtualMachine.attach), "
                "or undefine it first to define it anew",
            )

    def _define(self, config: VMConfig) -> lv.Domain:
        family = self.connection.family
        if self._validate_paths(config):
            for field, path in config.files():
                _check_file(field, path)
        overlays: dict[str, Path] = {}
        if config.rollback == "overlay":
            if family != "qemu" or not self.connection.is_local:
                raise UnsupportedOperationError(
                    f"overlay rollback needs a local QEMU hypervisor, not {self.uri!r}; use snapshots"
                )
            system = next(p for p in plan_disks(config, family) if p.field == "hd_location")
            overlays[system.target] = (
                self._overlay_dir(config) / f"{self.name}-{system.target}{_overlays.OVERLAY_SUFFIX}"
            )
        xml = self._render(config, overlays)
        self._check_disks_free(xml, active_only=False)
        for target, overlay in overlays.items():
            base = next(p for p in plan_disks(config, family) if p.target == target)
            _overlays.create_overlay(overlay, base.path, base.format)
        try:
            return self.connection.define(self.name, xml)
        except VManagerError:
            for overlay in overlays.values():
                overlay.unlink(missing_ok=True)
            raise

    def _check_disks_free(self, xml: str, *, active_only: bool) -> None:
        """Raise :class:`DiskInUseError` if another domain uses one of our disks and either side writes."""
        mine = _domain_info.disk_uses(xml)
        if not mine:
            return
        for text in self.connection.domain_xmls(active_only=active_only):
            other = _domain_info.parse(text).findtext("name", "")
            if other == self.name:
                continue
            for path, writes in _domain_info.disk_uses(text).items():
                if path in mine and (mine[path] or writes):
                    raise DiskInUseError(path, self.name, other)

    # -- state ------------------------------------------------------------------------------------

    def xml_desc(self) -> str:
        """The domain's current libvirt XML (what ``virsh dumpxml`` prints)."""
        return self._dom.xml_desc()

    def _xml(self) -> ET.Element:
        return _domain_info.parse(self._dom.xml_desc())

    def disks(self) -> dict[str, Path]:
        """The file-backed disks (not CD-ROMs) the domain uses now, by target name (``vda``, ``hdb``...).

        With overlays or external snapshots these are the top layers: the files holding the disks'
        current state (their backing files below hold the rest).
        """
        return {
            d.target: d.path
            for d in _domain_info.disks(self._dom.xml_desc())
            if d.device == "disk" and d.path is not None
        }

    @property
    def state(self) -> RunState:
        """The current run state, asked from the hypervisor."""
        try:
            return _STATES[self._dom.state()]
        except IndexError:
            return RunState.NOSTATE

    @property
    def is_running(self) -> bool:
        """True unless the VM is shut off (paused and shutting down count as running)."""
        return self.state in ACTIVE

    def _require(self, operation: str, *allowed: RunState) -> RunState:
        state = self.state
        if state not in allowed:
            raise VMStateError(self.name, operation, state, allowed)
        return state

    def wait_for(self, state: RunState, timeout: float = 60.0) -> None:
        """Wait until the VM is in ``state``; :class:`VMTimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.state
            if current is state:
                return
            if time.monotonic() >= deadline:
                raise VMTimeoutError(self.name, f"wait for {state.name}", timeout, f"still {current.name}")
            time.sleep(_console.POLL)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the VM. It must be shut off; its disks must not be in use by a running domain."""
        self._require("start", *STOPPED)
        xml = self._dom.xml_desc()
        self._check_disks_free(xml, active_only=True)
        _overlays.ensure(xml)
        self._console.reset()
        self._dom.create()

    def stop(self) -> None:
        """Power the VM off at once (like pulling the plug); a no-op when it is shut off."""
        if self._undefined:
            return
        self._console.reset()
        try:
            self._dom.destroy()  # no state query first: destroy() is the cheap call, failure is rare
        except VManagerError:
            if self.state in STOPPED:  # it went away by itself meanwhile
                return
            raise

    def shutdown(self, timeout: float | None = None) -> bool:
        """Ask the guest to power off (ACPI); force it off after ``timeout`` seconds.

        Returns True when the guest shut down by itself, False when it had to be forced. A no-op (True)
        when the VM is already shut off. ``timeout`` defaults to ``shutdown_timeout``.
        """
        timeout = self.shutdown_timeout if timeout is None else timeout
        if self._undefined:
            return True
        state = self.state
        if state in STOPPED:
            return True
        cause: VManagerError
        try:
            if state is RunState.PAUSED:
                self._dom.resume()
            self._dom.shutdown()
        except VManagerError as exc:
            if self.state in STOPPED:
                return True
            cause = exc
        else:
            try:
                self.wait_for(RunState.SHUTOFF, timeout)
                self._console.reset()
                return True
            except VMTimeoutError as exc:
                cause = exc
        try:
            self.stop()
        except VManagerError as exc:
            raise VMTimeoutError(self.name, "shutdown", timeout, f"forced stop failed too: {exc}") from cause
        return False

    def pause(self) -> None:
        """Freeze the running VM's CPUs."""
        self._require("pause", RunState.RUNNING, RunState.BLOCKED)
        self._dom.suspend()

    def resume(self) -> None:
        """Let a paused VM run again."""
        self._require("resume", RunState.PAUSED)
        self._dom.resume()

    def reboot(self) -> None:
        """Ask the guest to reboot (ACPI)."""
        self._require("reboot", RunState.RUNNING, RunState.BLOCKED)
        self._dom.reboot()

    def undefine(self) -> None:
        """Stop the VM and remove it: definition, snapshots and every file vmanager created for it.

        Overlays, external snapshot layers and saved memory go; the disks named in the config never do.
        Idempotent; afterwards only :meth:`stop`, :meth:`shutdown` and :meth:`close` (all no-ops) work.
        """
        if self._undefined:
            return
        self.stop()
        overlays = [overlay for overlay, _, _ in _overlays.overlay_bases(self._dom.xml_desc())]
        files = _snapshots.delete_all(self)
        self._dom.undefine()
        self._undefined = True
        for overlay in overlays:
            overlay.unlink(missing_ok=True)
        _snapshots.remove_files(self, files)

    def close(self) -> None:
        """Close the console stream and, if this VM opened it, the connection. Idempotent."""
        self._console.reset()
        if self._owns_connection and not self.connection.closed:
            self.connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self.connection.closed:
                self.shutdown()
        finally:
            self.close()

    # -- overlays ------------------------------------------------------------------------------------

    @property
    def uses_overlay(self) -> bool:
        """True when the system disk is a throwaway overlay (``rollback="overlay"``)."""
        return bool(_overlays.overlay_bases(self._dom.xml_desc()))

    def discard_overlay(self) -> None:
        """Throw the overlay away and start over from the base image; the VM must be shut off.

        Snapshots taken on the overlay go with it (their metadata is deleted).
        """
        _overlays.discard(self)

    # -- snapshots -----------------------------------------------------------------------------------

    def snapshot(self, name: str, description: str = "") -> Snapshot:
        """Take a snapshot called ``name`` (running: memory and disks; shut off: disks)."""
        _check_name("snapshot name", name)
        if type(description) is not str:
            raise ConfigError("description", f"expected a string, got {type(description).__name__}")
        check_text("description", description, lines=True, limit=_DESCRIPTION_MAX)
        return _snapshots.take(self, name, description)

    def snapshots(self) -> list[Snapshot]:
        """All snapshots, oldest first, with parent, children and which one is current."""
        return _snapshots.listing(self)

    def snapshot_info(self, name: str) -> Snapshot:
        """One snapshot by name; :class:`SnapshotNotFoundError` names the ones that exist."""
        return _snapshots.info(_snapshots.lookup(self, name))

    def current_snapshot(self) -> Snapshot | None:
        """The snapshot the VM last took or reverted to, if any."""
        return _snapshots.current(self)

    def delete_snapshot(self, name: str, *, children: bool = False) -> None:
        """Delete snapshot ``name`` (and its descendants when ``children``); its children move up."""
        _snapshots.delete(self, name, children=children)

    def rollback(self, name: str | None = None) -> None:
        """Go back to snapshot ``name`` and to the run state it was taken in.

        A snapshot of a running VM leaves the VM running, one of a shut-off VM leaves it shut off.
        Without a name: on an overlay VM, discard the overlay (the disk is the base image again; a
        running VM is restarted fresh, a shut-off one stays off); otherwise revert to the current
        snapshot.
        """
        _snapshots.rollback(self, name)

    # -- console -------------------------------------------------------------------------------------

    @property
    def serial_log(self) -> Path | None:
        """The file the serial console is logged to, if the domain has one."""
        return _domain_info.serial_log(self._xml())

    def console_output(self) -> str:
        """Everything the guest wrote to its serial console this run (from the serial log file)."""
        log = self.serial_log
        if log is None:
            raise ConfigError("serial_log", f"VM {self.name!r} has no serial log; set VMConfig.serial_log")
        return _console.read_log(log)

    def wait_for_output(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until the serial log matches ``pattern`` (e.g. a boot marker); returns the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_output()
            match = regex.search(text)
            if match is not None:
                return match
            if time.monotonic() >= deadline:
                raise VMTimeoutError(
                    self.name, f"wait for {regex.pattern!r} on the serial log", timeout, _console.tail(text)
                )
            if self.state in STOPPED:
                raise VMStateError(self.name, "wait for console output of", self.state, (RunState.RUNNING,))
            time.sleep(_console.POLL)

    def console_write(self, text: str | bytes, timeout: float = 10.0) -> None:
        """Type ``text`` on the serial console (through libvirt's console stream)."""
        self._console.write(text, timeout)

    def console_expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait for ``pattern`` in console output read since the last match; returns the match.

        Output is read through the console stream, which sees what the guest writes after the stream is
        opened (the first :meth:`console_write` or :meth:`console_expect` of a run). For boot messages use
        :meth:`wait_for_output`, which reads the serial log from the start.
        """
        return self._console.expect(pattern, timeout)

    # -- display -------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        try:
            if self._undefined:
                state = "undefined"
            else:
                state = self.state.name if not self.connection.closed else "closed"
        except (VManagerError, AttributeError):  # AttributeError: repr of a half-built VM
            state = "unknown"
        return f"<VirtualMachine {self.name!r} {state} on {self.uri!r}>"

    def _repr_html_(self) -> str:
        try:
            state = self.state.name
            snaps = self.snapshots()
        except VManagerError as exc:
            return f"<b>VirtualMachine {html.escape(self.name)}</b>: {html.escape(str(exc))}"
        rows = "".join(
            f"<tr><td>{html.escape(s.name)}{' *' if s.is_current else ''}</td>"
            f"<td>{html.escape(s.description)}</td><td>{s.state.name}</td>"
            f"<td>{html.escape(s.parent or '')}</td><td>{s.created:%Y-%m-%d %H:%M:%S}</td></tr>"
            for s in snaps
        )
        table = (
            "<table><tr><th>snapshot</th><th>description</th><th>state</th><th>parent</th><th>created</th>"
            f"</tr>{rows}</table>"
            if snaps
            else "<i>no snapshots</i>"
        )
        return (
            f"<div><b>VirtualMachine {html.escape(self.name)}</b> — {state} on "
            f"<code>{html.escape(self.uri)}</code>{table}</div>"
        )
