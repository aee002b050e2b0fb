"""Detection: a format qemu-img knows is opened or refused by name; raw only when nothing matches."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diskhandler import UnsupportedImageError, detect_format, open_image
from diskhandler.formats._detect import _REGISTRY, SIGNATURES, identify
from tests.diskhandler.imagetools import qemu_img, sha256_of_file

MiB = 1 << 20


def _qemu_made(tmp_path: Path, fmt: str, *extra: str) -> Path:
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", *extra, "-f", fmt, path, "4M")
    return path


def _luks(tmp_path: Path) -> Path:
    secret = tmp_path / "key"
    secret.write_text("correct horse")
    return _qemu_made(
        tmp_path, "luks", "--object", f"secret,id=s0,file={secret}", "-o", "key-secret=s0,iter-time=10"
    )


QEMU_MADE = {
    "QED": lambda tmp: _qemu_made(tmp, "qed"),
    "Parallels": lambda tmp: _qemu_made(tmp, "parallels"),
    "qcow (version 1)": lambda tmp: _qemu_made(tmp, "qcow"),
    "LUKS": _luks,
}


@pytest.mark.parametrize("name", sorted(QEMU_MADE))
def test_qemu_made_unsupported_format_is_refused_by_name(tmp_path: Path, name: str) -> None:
    path = QEMU_MADE[name](tmp_path)
    before = sha256_of_file(path)
    with pytest.raises(UnsupportedImageError, match=f"this is a {re.escape(name)} image") as excinfo:
        detect_format(path)
    assert excinfo.value.field == "format"
    assert "qemu-img convert" in str(excinfo.value)
    for writable in (False, True):
        with pytest.raises(UnsupportedImageError, match=re.escape(name)):
            open_image(path, writable=writable)
    assert sha256_of_file(path) == before  # a refused writable open changed nothing
    with open_image(path, format="raw") as image:  # the explicit escape hatch still works
        assert image.format == "raw"


def _crafted(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "crafted"
    body = bytearray(64 * 1024)
    if name == "bochs":  # bochs.c: magic, type "Redolog", subtype "Growing", version 2
        body[0:23] = b"Bochs Virtual HD Image\x00"
        body[32:40] = b"Redolog\x00"
        body[48:56] = b"Growing\x00"
        body[64:68] = (0x00020000).to_bytes(4, "little")
    elif name == "cloop":  # cloop.c: the shell-script preamble of a version 2 cloop
        body[0:] = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
        body += bytes(64 * 1024 - len(body))
    elif name == "DMG":  # dmg.c: a 512-byte "koly" trailer, big-endian
        body[-512:-508] = b"koly"
        body[-508:-504] = (4).to_bytes(4, "big")
        body[-504:-500] = (512).to_bytes(4, "big")
    path.write_bytes(bytes(body))
    return path


@pytest.mark.parametrize("name", ["bochs", "cloop", "DMG"])
def test_crafted_headers_of_formats_qemu_cannot_create(tmp_path: Path, name: str) -> None:
    path = _crafted(tmp_path, name)
    with pytest.raises(UnsupportedImageError, match=rf"this is a {name} image"):
        open_image(path, writable=True)


@pytest.mark.skipif(shutil.which("xz") is None or shutil.which("gzip") is None, reason="needs xz and gzip")
@pytest.mark.parametrize(("tool", "name"), [("xz", "xz-compressed"), ("gzip", "gzip-compressed")])
def test_compressed_image_is_not_raw(tmp_path: Path, tool: str, name: str) -> None:
    raw = tmp_path / "disk.img"
    qemu_img("create", "-f", "qcow2", raw, "1M")
    subprocess.run([tool, "-k", str(raw)], check=True)
    packed = next(p for p in tmp_path.iterdir() if p.name != "disk.img")
    with pytest.raises(UnsupportedImageError, match=rf"{name} file.*decompress it first"):
        open_image(packed)


def test_ova_tar_is_not_raw(tmp_path: Path) -> None:
    disk = tmp_path / "disk.vmdk"
    qemu_img("create", "-f", "vmdk", disk, "1M")
    ova = tmp_path / "appliance.ova"
    subprocess.run(["tar", "-cf", str(ova), "-C", str(tmp_path), "disk.vmdk"], check=True)
    with pytest.raises(UnsupportedImageError, match=r"tar archive.*tar xf"):
        open_image(ova)


@pytest.mark.parametrize(
    "content",
    [bytes(MiB), b"\xeb\x63\x90" + bytes(509) + bytes(MiB - 512), bytes(range(256)) * 4096],
    ids=["zeros", "boot-sector", "bytes"],
)
def test_raw_is_what_remains(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    assert detect_format(path) == "raw"


def test_a_tiny_file_is_raw_and_no_tail_signature_reads_before_its_start(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    path.write_bytes(b"koly")  # too short to hold a DMG trailer
    assert detect_format(path) == "raw"
    assert identify(b"", b"", 0) is None


def test_signatures_are_data_and_supported_ones_name_a_registered_format() -> None:
    assert all(sig.name in _REGISTRY for sig in SIGNATURES if sig.supported)
    assert all(sig.advice for sig in SIGNATURES if not sig.supported)
    assert all(sig.magic for sig in SIGNATURES)
    # probing order: a specific magic is never shadowed by a shorter one at the same offset before it
    for i, early in enumerate(SIGNATURES):
        for late in SIGNATURES[i + 1 :]:
            shadowed = early.offset == late.offset and late.magic.startswith(early.magic)
            assert not shadowed, f"{late.name} is unreachable behind {early.name}"


def test_detection_imports_no_parser(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    code = (
        "import sys; from pathlib import Path; from diskhandler import detect_format;"
        f"assert detect_format(Path({str(path)!r})) == 'qcow2';"
        "names = ('qcow2', 'vdi', 'vhd', 'vmdk', 'raw');"
        "loaded = [m for m in names if 'diskhandler.formats.' + m in sys.modules];"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
