"""Session-wide set-up shared by every package's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def libvirt_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One embedded-QEMU root for the whole test session, away from the user's own.

    libvirt runs one embedded QEMU driver per process, so every test that boots a guest — vmanager's
    and pyti_core's alike — shares this root through ``PYTI_LIBVIRT_ROOT``.
    """
    root = tmp_path_factory.mktemp("libvirt-embed")
    old = os.environ.get("PYTI_LIBVIRT_ROOT")
    os.environ["PYTI_LIBVIRT_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("PYTI_LIBVIRT_ROOT", None)
    else:
        os.environ["PYTI_LIBVIRT_ROOT"] = old
