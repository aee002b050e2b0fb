"""Fixtures for vmanager: an isolated libvirt test driver per test, one embedded QEMU root per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmanager import Connection


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    """A fresh, empty libvirt test driver.

    ``test:///default`` is one fake hypervisor shared by every connection in the process (state leaks
    between tests); a ``test:///<file>`` URI gets a new instance per connection, built from the file.
    """
    node = tmp_path / "node.xml"
    node.write_text("<node/>\n")
    return f"test://{node}"


@pytest.fixture
def conn(test_uri: str) -> Iterator[Connection]:
    with Connection(test_uri) as c:
        yield c


@pytest.fixture(scope="session")
def embed_root(libvirt_root: Path) -> Path:
    """The embedded QEMU driver's root for this session (libvirt allows one embedded root per process)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return libvirt_root
