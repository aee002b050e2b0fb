"""libvirt's own log lines reach Python logging (the ``vmanager`` logger), never file descriptor 2.

Run in a child process: libvirt reads its log setting once, when it is loaded, and this test process
loaded it long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.name, record.levelname, record.getMessage()])
logging.getLogger("vmanager").addHandler(Keep())
logging.getLogger("vmanager").setLevel(logging.DEBUG)
from vmanager import Connection, DomainNotFoundError, VirtualMachine, VMConfig
kernel, initrd, root = sys.argv[1:4]
with Connection("test:///default") as conn:
    try:
        VirtualMachine.attach("no-such-vm", conn)
    except DomainNotFoundError:
        pass
if kernel:
    from vmanager._libvirt import embed_uri
    with Connection(embed_uri(root)) as conn:
        config = VMConfig(name="logged", memory=64, kernel=kernel, initrd=initrd, accel="tcg")
        vm = VirtualMachine("logged", conn, config)
        vm.start()
        vm.stop()
        vm.undefine()
import time; time.sleep(0.3)  # the log pipe is read by a thread
print(json.dumps(records))
"""


def _run_child(tmp_path: Path, kernel: str = "", initrd: str = "") -> tuple[list[list[str]], str]:
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_LOG_OUTPUTS"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kernel, initrd, str(tmp_path / "root")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_libvirt_log_lines_go_to_logging_not_stderr(tmp_path: Path) -> None:
    records, stderr = _run_child(tmp_path)
    assert stderr == ""
    assert all(name == "vmanager.libvirt" for name, _, _ in records)
    messages = [m for _, _, m in records]
    assert any("libvirt version" in m for m in messages), records
    # the error vmanager raised as DomainNotFoundError is kept as detail, not shouted
    assert any("Domain not found" in m and level == "DEBUG" for _, level, m in records), records


def test_a_user_choice_of_libvirt_log_output_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "libvirt.log"
    env = {**os.environ, "LIBVIRT_LOG_OUTPUTS": f"3:file:{log}"}
    code = (
        "import os, vmanager; from vmanager import Connection\n"
        "c = Connection('test:///default'); c.find('x'); c.close()\n"
        "print(os.environ['LIBVIRT_LOG_OUTPUTS'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == f"3:file:{log}"
    assert "libvirt version" in log.read_text()
