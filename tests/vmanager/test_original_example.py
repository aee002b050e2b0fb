"""The original PyTI example, as written, with only the URI changed to libvirt's fake hypervisor."""

from __future__ import annotations

from vmanager import *  # noqa: F403 - exactly what the example does


def test_original_pyti_example_runs_as_written() -> None:
    config = {
        "name": "test123",
        "memory": "123",
        "disk_location": "dsl-4.4.10.iso",
        "hd_location": "disk.vdi",
    }
    a = VirtualMachine("hey", "test:///default", config=config)  # noqa: F405
    try:
        a.start()
        a.createSnapshot("hello", "blah")
        a.rollback("hello")
        assert a.state is RunState.RUNNING  # noqa: F405 - the snapshot was of a running VM
        a.stop()
        assert a.state is RunState.SHUTOFF  # noqa: F405
        info = a.snapshot_info("hello")
        assert info.description == "blah"
        assert info.state is RunState.RUNNING  # noqa: F405
    finally:
        # test:///default is shared by every connection in the process: leave it as found
        a.undefine()
        a.close()
