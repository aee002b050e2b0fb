"""VDI: qemu-made images, VirtualBox-style layouts and differencing chains, the .vbox registry, damage.

qemu cannot open differencing VDIs, VDIs with blocks other than 1 MiB, or honour cbBlockExtra, so those
are checked against an in-memory model; every base image is also checked by qemu-img.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskhandler import (
    ChainError,
    DiskImage,
    ImageFormatError,
    ImageWarning,
    UnsupportedImageError,
    create_image,
    open_image,
)
from diskhandler.formats._vbox import current_disks, read_media_registry
from diskhandler.formats.vdi import BLOCK_FREE, BLOCK_ZERO, VDIImage
from tests.diskhandler.imagetools import (
    assert_reads_like_qemu,
    compare_with_raw,
    fill_with_pattern,
    power_cut_at_every_write,
    qemu_check,
    qemu_flatten,
    qemu_img,
    qemu_io,
    read_field,
    sha256_of_file,
)
from tests.diskhandler.imagetools import patch_file as patch

MiB = 1 << 20
KiB = 1 << 10

# absolute offsets of v1 header fields (VDICore.h VDIHEADER1 after the 72-byte pre-header)
OFF_VERSION = 0x44
OFF_TYPE = 0x4C
OFF_BLOCKS = 0x154
OFF_DATA = 0x158
OFF_DISK_SIZE = 0x170
OFF_BLOCK_SIZE = 0x178
OFF_BLOCK_EXTRA = 0x17C
OFF_CBLOCKS = 0x180
OFF_ALLOCATED = 0x184
OFF_UUID_CREATE = 0x188
OFF_UUID_MODIFY = 0x198
OFF_UUID_LINKAGE = 0x1A8
OFF_UUID_PARENT_MODIFY = 0x1B8


def u32(path: Path, offset: int) -> int:
    return read_field(path, offset, "<I")


def raw16(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(16)


def random_writes(image: DiskImage, model: bytearray, rng: random.Random, count: int, block: int) -> None:
    """Writes of awkward lengths at unaligned offsets, many straddling block boundaries."""
    for _ in range(count):
        length = rng.choice([1, 511, 4097, block, block + 3, rng.randrange(1, 3 * block)])
        length = min(length, len(model) - 1)
        if rng.random() < 0.5:  # straddle a block boundary
            boundary = rng.randrange(1, len(model) // block) * block
            offset = max(0, min(boundary - rng.randrange(1, length + 1), len(model) - length))
        else:
            offset = rng.randrange(0, len(model) - length)
        data = rng.randbytes(length) if rng.random() < 0.85 else bytes(length)
        assert image.write_at(offset, data) == length
        model[offset : offset + length] = data


def block_map(path: Path) -> list[int]:
    off, count = u32(path, OFF_BLOCKS), u32(path, OFF_CBLOCKS)
    with path.open("rb") as f:
        f.seek(off)
        return list(struct.unpack(f"<{count}I", f.read(4 * count)))


# -- images qemu made -------------------------------------------------------------------------------


@pytest.mark.parametrize("static", ["off", "on"], ids=["dynamic", "static"])
def test_qemu_made_images_read_like_qemu(tmp_path: Path, static: str) -> None:
    path = tmp_path / "qemu.vdi"
    qemu_img("create", "-f", "vdi", "-o", f"static={static}", path, "64M")
    fill_with_pattern(path, "vdi")
    with open_image(path) as image:
        assert isinstance(image, VDIImage)
        assert image.header.type_name == ("fixed" if static == "on" else "dynamic")
        assert image.header.header_size == 384
        assert image.header.lchs is None
        assert image.header.off_blocks == 512
    assert_reads_like_qemu(path, "vdi", tmp_path)


def test_qemu_made_odd_size_image(tmp_path: Path) -> None:
    path = tmp_path / "odd.vdi"
    qemu_img("create", "-f", "vdi", path, str(5 * MiB + 512 * 3))
    qemu_io(path, "vdi", ["write -P 0x7e 4194000 1000000"])
    assert_reads_like_qemu(path, "vdi", tmp_path)


# -- images diskhandler made, read by qemu ------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("header", ["virtualbox", "qemu"])
def test_diskhandler_images_pass_qemu(tmp_path: Path, subformat: str, header: str) -> None:
    size = 24 * MiB
    path = tmp_path / "dh.vdi"
    rng = random.Random(f"{subformat}-{header}")
    model = bytearray(size)
    with create_image(path, size, subformat=subformat, header=header) as image:
        assert isinstance(image, VDIImage)
        random_writes(image, model, rng, 30, MiB)
        image.write_at(3 * MiB - 100, b"\xab" * 300)  # for qemu-io's pattern check below
        model[3 * MiB - 100 : 3 * MiB + 200] = b"\xab" * 300
    if header == "virtualbox":
        assert u32(path, 0x48) == 400
        assert u32(path, OFF_BLOCKS) == MiB
        assert u32(path, OFF_DATA) % MiB == 0
    else:
        assert u32(path, 0x48) == 384
        assert u32(path, OFF_BLOCKS) == 512
        assert u32(path, OFF_DATA) == 1024
    assert u32(path, OFF_TYPE) == (2 if subformat == "fixed" else 1)
    qemu_check(path, "vdi")
    flat = qemu_flatten(path, "vdi", tmp_path / "flat.raw")
    assert flat.read_bytes() == model
    compare_with_raw(path, flat)
    qemu_io(path, "vdi", ["read -P 0xab 3145628 300"])
    # and the other way round: what qemu writes into our image, we read
    qemu_io(path, "vdi", ["write -P 0x5a 1048000 2000000"])
    model[1048000 : 1048000 + 2000000] = b"\x5a" * 2000000
    with open_image(path) as image:
        assert image.read() == model
    qemu_check(path, "vdi")


def test_odd_block_size_and_block_extra_against_model(tmp_path: Path) -> None:
    """qemu refuses block sizes other than 1 MiB and ignores cbBlockExtra: check against a model and
    against the physical layout VDICore.h prescribes."""
    size = 3 * MiB + 1234
    bs, extra = 64 * KiB, 4096
    path = tmp_path / "odd.vdi"
    rng = random.Random(7)
    model = bytearray(size)
    with create_image(path, size, "vdi", block_size=bs, block_extra=extra) as image:
        random_writes(image, model, rng, 60, bs)
        image.seek(0)
        assert image.read() == model
    assert u32(path, OFF_BLOCK_SIZE) == bs
    assert u32(path, OFF_BLOCK_EXTRA) == extra
    assert u32(path, OFF_CBLOCKS) == -(-size // bs)
    with open_image(path, writable=True) as image:
        random_writes(image, model, rng, 20, bs)
    with open_image(path) as image:
        assert image.read() == model
    # each allocated block's data lies cbBlockExtra bytes into its slot
    off_data = u32(path, OFF_DATA)
    raw = path.read_bytes()
    entries = block_map(path)
    allocated = [(i, e) for i, e in enumerate(entries) if e < BLOCK_ZERO]
    assert allocated
    assert u32(path, OFF_ALLOCATED) == len(allocated)
    for index, slot in allocated:
        start = off_data + slot * (bs + extra)
        assert raw[start : start + extra] == bytes(extra)
        end = min(size, (index + 1) * bs)
        assert raw[start + extra : start + extra + end - index * bs] == model[index * bs : end]


def test_hex_patched_qemu_image_with_block_extra(tmp_path: Path) -> None:
    """A qemu image rewritten by hand to a 512 KiB block with 512 bytes of per-block extra data."""
    path = tmp_path / "patched.vdi"
    qemu_img("create", "-f", "vdi", path, "2M")
    qemu_io(path, "vdi", ["write -P 0x31 0 1M", "write -P 0x32 1M 1M"])
    raw = bytearray(path.read_bytes())
    off_data = u32(path, OFF_DATA)
    payload = raw[off_data:]
    # rebuild: 4 blocks of 512 KiB, slots in reverse order, each prefixed by 512 bytes of junk
    bs, extra = 512 * KiB, 512
    data = bytearray()
    blocks = [payload[i * bs : (i + 1) * bs] for i in range(4)]
    for block in reversed(blocks):
        data += b"\xee" * extra + block
    struct.pack_into("<IIII", raw, OFF_BLOCK_SIZE, bs, extra, 4, 4)
    struct.pack_into("<4I", raw, u32(path, OFF_BLOCKS), 3, 2, 1, 0)
    path.write_bytes(bytes(raw[:off_data]) + bytes(data))
    with open_image(path) as image:
        assert image.read() == b"\x31" * MiB + b"\x32" * MiB


def test_disk_size_not_a_multiple_of_512(tmp_path: Path) -> None:
    size = 2 * MiB + 777
    model = bytearray(size)
    path = tmp_path / "odd.vdi"
    with create_image(path, size, "vdi") as image:
        image.write_at(size - 1000, b"\x42" * 1000)
        model[size - 1000 :] = b"\x42" * 1000
    with open_image(path) as image:
        assert image.size == size
        assert image.read() == model


# -- differencing chains ----------------------------------------------------------------------------


def _vm_with_snapshots(tmp_path: Path, rng: random.Random, size: int) -> tuple[list[Path], list[bytearray]]:
    """A VirtualBox-style machine folder: VM/base.vdi, VM/Snapshots/{uuid}.vdi twice; returns the
    files base first and a model of what each level shows."""
    vm = tmp_path / "VM"
    (vm / "Snapshots").mkdir(parents=True)
    model = bytearray(size)
    base = vm / "base.vdi"
    with create_image(base, size) as image:
        assert isinstance(image, VDIImage)
        random_writes(image, model, rng, 25, MiB)
    files = [base]
    models = [bytearray(model)]
    for _ in range(2):
        tmp = vm / "Snapshots" / "new.vdi"
        with create_image(tmp, parent=files[-1]) as child:
            assert isinstance(child, VDIImage)
            assert child.read() == model  # an empty child shows its parent
            random_writes(child, model, rng, 25, MiB)
            name = f"{{{child.uuid}}}.vdi"
        final = tmp.rename(tmp.with_name(name))
        files.append(final)
        models.append(bytearray(model))
    return files, models


def test_virtualbox_style_chain_three_levels(tmp_path: Path) -> None:
    rng = random.Random("chain")
    size = 20 * MiB
    files, models = _vm_with_snapshots(tmp_path, rng, size)
    base, diff1, diff2 = files
    model = models[-1]
    for level, (path, expect) in enumerate(zip(files, models, strict=True)):
        with open_image(path) as image:
            assert len(image.chain) == level + 1
            assert image.read() == expect, f"level {level} reads wrong"
    for child, parent in ((diff1, base), (diff2, diff1)):
        assert u32(child, 0x48) == 400
        assert u32(child, OFF_TYPE) == 4
        assert u32(child, OFF_BLOCKS) == MiB
        assert raw16(child, OFF_UUID_LINKAGE) == raw16(parent, OFF_UUID_CREATE)
        assert raw16(child, OFF_UUID_PARENT_MODIFY) == raw16(parent, OFF_UUID_MODIFY)
    digests = {p: sha256_of_file(p) for p in (base, diff1)}

    with open_image(diff2) as image:
        assert image.chain == (diff2, diff1, base)
        assert image.read() == model
    with open_image(diff2, writable=True) as leaf:
        modify_before = raw16(diff2, OFF_UUID_MODIFY)
        random_writes(leaf, model, rng, 30, MiB)
        assert raw16(diff2, OFF_UUID_MODIFY) != modify_before  # changed on the first write
        assert leaf.read_at(0, size) == model
    with open_image(diff2) as image:
        assert image.read() == model
    for p, digest in digests.items():
        assert sha256_of_file(p) == digest, f"{p.name} changed although only the leaf was written"
    # the base alone is a plain VDI qemu can check
    qemu_check(base, "vdi")


def test_diff_zero_and_free_blocks(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    with create_image(base, 4 * MiB) as image:
        image.write_at(0, b"\x11" * (4 * MiB))
    with create_image(child, parent=base) as image:
        image.write_at(MiB, bytes(MiB))  # whole block of zeros: ZERO entry, no allocation
        image.write_at(2 * MiB + 10, b"\x22" * 10)  # partial write into FREE: rest from the parent
        image.write_at(MiB + 5, b"\x33")  # partial write into ZERO: rest is zeros, not the parent
        image.write_at(3 * MiB + 7, bytes(100))  # zeros into FREE over the parent: allocates
        image.write_at(MiB + 9, bytes(10))  # zeros into an allocated block: in place
    entries = block_map(child)
    assert entries == [BLOCK_FREE, 1, 0, 2]  # block 2 was allocated first, then 1, then 3
    assert u32(child, OFF_ALLOCATED) == 3
    expect = bytearray(b"\x11" * (4 * MiB))
    expect[MiB : 2 * MiB] = bytes(MiB)
    expect[MiB + 5] = 0x33
    expect[3 * MiB + 7 : 3 * MiB + 107] = bytes(100)
    expect[2 * MiB + 10 : 2 * MiB + 20] = b"\x22" * 10
    with open_image(child) as image:
        assert image.read() == expect
    # a zero block in a base image stays unallocated
    other = tmp_path / "other.vdi"
    with create_image(other, 2 * MiB) as image:
        image.write_at(0, bytes(MiB))
        image.write_at(MiB + 3, bytes(1000))  # partial zeros: nothing to store either
    assert block_map(other) == [BLOCK_FREE, BLOCK_FREE]
    # and a ZERO entry written by someone else reads as zeros in a base image
    patch(other, u32(other, OFF_BLOCKS), struct.pack("<I", BLOCK_ZERO))
    with open_image(other) as image:
        assert image.read() == bytes(2 * MiB)


def test_child_larger_than_parent_reads_zeros_beyond(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    with create_image(base, 2 * MiB) as image:
        image.write_at(0, b"\x44" * (2 * MiB))
    with create_image(child, 3 * MiB + 5, parent=base) as image:
        image.write_at(2 * MiB - 2, b"\x55" * 4)
    with open_image(child) as image:
        expect = b"\x44" * (2 * MiB - 2) + b"\x55" * 4 + bytes(MiB + 3)
        assert image.read() == expect


def _vbox_xml(media: str, attached: str, snapshot: str = "", namespace: bool = True) -> str:
    ns = ' xmlns="http://www.virtualbox.org/"' if namespace else ""
    return f"""<?xml version="1.0"?>
<VirtualBox{ns} version="1.19-linux">
  <Machine uuid="{{7d9e2e5c-0c1b-4b6f-9e57-1a2b3c4d5e6f}}" name="vm" OSType="Debian_64"
           snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
{media}
      </HardDisks>
    </MediaRegistry>
{snapshot}
    <Hardware><Memory RAMSize="512"/></Hardware>
    <StorageControllers>
      <StorageController name="SATA" type="AHCI" PortCount="2">
{attached}
      </StorageController>
    </StorageControllers>
  </Machine>
</VirtualBox>
"""


def test_chain_found_through_vbox_registry(tmp_path: Path) -> None:
    """The base lives where no folder scan would find it; only the .vbox registry knows it."""
    elsewhere = tmp_path / "pool" / "disks"
    elsewhere.mkdir(parents=True)
    vm = tmp_path / "machines" / "vm"
    (vm / "Snapshots").mkdir(parents=True)
    base = elsewhere / "base.vdi"
    with create_image(base, 4 * MiB) as image:
        assert isinstance(image, VDIImage)
        image.write_at(0, b"\x61" * (4 * MiB))
        base_uuid = image.uuid
    tmp = vm / "Snapshots" / "x.vdi"
    with create_image(tmp, parent=base) as child:
        assert isinstance(child, VDIImage)
        child.write_at(MiB, b"\x62" * 100)
        leaf_uuid = child.uuid
    leaf = tmp.rename(vm / "Snapshots" / f"{{{leaf_uuid}}}.vdi")
    other = vm / "data.vdi"
    with create_image(other, MiB, header="qemu") as image:
        assert isinstance(image, VDIImage)
        other_uuid = image.uuid
    media = f"""
        <HardDisk uuid="{{{base_uuid}}}" location="../../pool/disks/base.vdi" format="VDI" type="Normal">
          <HardDisk uuid="{{{leaf_uuid}}}" location="Snapshots/{{{leaf_uuid}}}.vdi" format="VDI"/>
        </HardDisk>
        <HardDisk uuid="{{{other_uuid}}}" location="{other}" format="VDI" type="Normal"/>"""
    attached = f"""
        <AttachedDevice type="HardDisk" hotpluggable="false" port="1" device="0">
          <Image uuid="{{{other_uuid}}}"/>
        </AttachedDevice>
        <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
          <Image uuid="{{{leaf_uuid}}}"/>
        </AttachedDevice>"""
    old_state = f"""
    <Snapshot uuid="{{{uuid.uuid4()}}}" name="s1" timeStamp="2024-01-01T00:00:00Z">
      <StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
        <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{{{base_uuid}}}"/></AttachedDevice>
      </StorageController></StorageControllers>
    </Snapshot>"""
    (vm / "vm.vbox").write_text(_vbox_xml(media, attached, old_state))

    with open_image(leaf) as image:
        assert image.chain == (leaf, base)
        assert image.read_at(MiB - 1, 102) == b"\x61" + b"\x62" * 100 + b"\x61"
    assert current_disks(vm / "vm.vbox") == [leaf, other]
    registry = read_media_registry(vm / "vm.vbox")
    assert registry[leaf_uuid].parent == base_uuid
    assert registry[base_uuid].children == (leaf_uuid,)
    # without the registry the parent cannot be found
    (vm / "vm.vbox").unlink()
    with pytest.raises(ChainError) as excinfo:
        open_image(leaf)
    assert excinfo.value.field == "uuidLinkage"
    assert str(base_uuid) in str(excinfo.value)


def test_vbox_without_namespace_and_old_layout(tmp_path: Path) -> None:
    disk = tmp_path / "d.vdi"
    with create_image(disk, MiB) as image:
        assert isinstance(image, VDIImage)
        disk_uuid = image.uuid
    xml = f"""<VirtualBox version="1.3-windows"><Machine name="old">
      <MediaRegistry><HardDisks>
        <HardDisk uuid="{{{disk_uuid}}}" location="d.vdi" format="vdi"/>
      </HardDisks></MediaRegistry>
      <Hardware><StorageControllers><StorageController name="IDE">
        <AttachedDevice type="DVD" port="0" device="1"><Image uuid="{{{uuid.uuid4()}}}"/></AttachedDevice>
        <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{{{disk_uuid}}}"/></AttachedDevice>
      </StorageController></StorageControllers></Hardware>
    </Machine></VirtualBox>"""
    (tmp_path / "old.vbox").write_text(xml)
    assert current_disks(tmp_path / "old.vbox") == [disk]


def test_vbox_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vbox"
    bad.write_text("<VirtualBox><Machine>")
    with pytest.raises(ImageFormatError, match="not a readable VirtualBox machine file"):
        current_disks(bad)
    bad.write_text("<html/>")
    with pytest.raises(ImageFormatError, match="not <VirtualBox>"):
        read_media_registry(bad)
    bad.write_text(
        _vbox_xml("", f'<AttachedDevice type="HardDisk"><Image uuid="{{{uuid.uuid4()}}}"/></AttachedDevice>')
    )
    with pytest.raises(ImageFormatError, match="not in this file's media registry") as excinfo:
        current_disks(bad)
    assert excinfo.value.field == "AttachedDevice"
    bad.write_text(_vbox_xml('<HardDisk uuid="nope" location="x.vdi"/>', ""))
    with pytest.raises(ImageFormatError, match="not a UUID"):
        read_media_registry(bad)
    # a broken machine file next to an image warns but does not stop the image from opening
    disk = tmp_path / "d.vdi"
    create_image(disk, MiB).close()
    with pytest.warns(ImageWarning, match="ignoring VirtualBox machine file"), open_image(disk) as image:
        assert image.read(4) == bytes(4)


@pytest.mark.parametrize("declaration", ['encoding="no-such-codec"', 'encoding="utf-32"'])
def test_vbox_file_in_an_unreadable_encoding(tmp_path: Path, declaration: str) -> None:
    bad = tmp_path / "bad.vbox"
    bad.write_text(f'<?xml version="1.0" {declaration}?><VirtualBox/>')
    with pytest.raises(ImageFormatError, match="not a readable VirtualBox machine file") as excinfo:
        read_media_registry(bad)
    assert excinfo.value.path == bad
    disk = tmp_path / "d.vdi"
    create_image(disk, MiB).close()
    with pytest.warns(ImageWarning, match="ignoring VirtualBox machine file"), open_image(disk) as image:
        assert image.read(4) == bytes(4)


def test_deeply_nested_registry_is_read_without_recursion(tmp_path: Path) -> None:
    ids = [uuid.uuid4() for _ in range(3000)]  # far deeper than Python's recursion limit
    opening = "".join(
        f'<HardDisk uuid="{{{u}}}" location="d{i}.vdi" format="VDI">' for i, u in enumerate(ids)
    )
    (tmp_path / "m.vbox").write_text(_vbox_xml(opening + "</HardDisk>" * len(ids), ""))
    media = read_media_registry(tmp_path / "m.vbox")
    assert len(media) == len(ids)
    assert media[ids[-1]].parent == ids[-2]
    assert media[ids[0]].children == (ids[1],)
    disk = tmp_path / "d.vdi"
    create_image(disk, MiB).close()
    with open_image(disk) as image:
        assert image.read(4) == bytes(4)


def test_registry_pointing_at_the_wrong_parent_is_a_chain_error(tmp_path: Path) -> None:
    base, impostor, child = tmp_path / "base.vdi", tmp_path / "impostor.vdi", tmp_path / "child.vdi"
    create_image(base, MiB).close()
    create_image(impostor, MiB).close()
    with create_image(child, parent=base) as image:
        assert isinstance(image, VDIImage)
        assert image.parent is not None
        base_uuid = image.parent.uuid  # type: ignore[attr-defined]
    media = f'<HardDisk uuid="{{{base_uuid}}}" location="impostor.vdi" format="VDI"/>'
    (tmp_path / "vm.vbox").write_text(_vbox_xml(media, ""))
    with pytest.raises(ChainError, match="but this image is based on") as excinfo:
        open_image(child)
    assert excinfo.value.field == "uuidLinkage"


def test_missing_and_cyclic_parents(tmp_path: Path) -> None:
    base, a, b = tmp_path / "base.vdi", tmp_path / "a.vdi", tmp_path / "b.vdi"
    create_image(base, MiB).close()
    create_image(a, parent=base).close()
    create_image(b, parent=base).close()
    # a's parent becomes b and b's parent becomes a: a loop
    patch(a, OFF_UUID_LINKAGE, raw16(b, OFF_UUID_CREATE))
    patch(b, OFF_UUID_LINKAGE, raw16(a, OFF_UUID_CREATE))
    with pytest.raises(ChainError, match="loops") as excinfo:
        open_image(a)
    assert excinfo.value.field == "parent"
    base.unlink()
    lone = tmp_path / "sub" / "lone.vdi"
    lone.parent.mkdir()
    create_image(lone, MiB).close()
    patch(lone, OFF_TYPE, struct.pack("<I", 4))
    patch(lone, OFF_UUID_LINKAGE, uuid.uuid4().bytes_le)
    with pytest.raises(ChainError, match="not found") as excinfo:
        open_image(lone)
    assert excinfo.value.field == "uuidLinkage"
    patch(lone, OFF_UUID_LINKAGE, bytes(16))
    with pytest.raises(ChainError, match="null UUID"):
        open_image(lone)


def test_damaged_parent_is_named_not_called_missing(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    create_image(base, MiB).close()
    create_image(child, parent=base).close()
    patch(base, OFF_BLOCK_SIZE, struct.pack("<I", 3))
    with pytest.raises(ChainError, match=r"could not be read.*base\.vdi: cbBlock") as excinfo:
        open_image(child)
    assert excinfo.value.field == "uuidLinkage"


def test_stale_parent_warns(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vdi", tmp_path / "child.vdi"
    create_image(base, MiB).close()
    create_image(child, parent=base).close()
    with open_image(child):
        pass  # fresh: no warning (pytest turns warnings into errors)
    with open_image(base, writable=True) as image:  # modifying a parent behind its child's back
        image.write_at(0, b"x")
    with pytest.warns(ImageWarning, match="modified after this differencing image was made"):
        image = open_image(child)
    with image:
        assert image.read(1) == b"x"


def test_uuid_modify_changes_only_when_the_leaf_is_written(tmp_path: Path) -> None:
    path = tmp_path / "disk.vdi"
    create_image(path, MiB).close()
    before = raw16(path, OFF_UUID_MODIFY)
    assert before != bytes(16)
    with open_image(path, writable=True) as image:
        image.read(10)
    assert raw16(path, OFF_UUID_MODIFY) == before
    with open_image(path, writable=True) as image:
        image.write_at(0, b"a")
        first = raw16(path, OFF_UUID_MODIFY)
        image.write_at(1, b"b")
    assert first != before
    assert raw16(path, OFF_UUID_MODIFY) == first  # once per session


def test_encrypted_disk_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "secret.vdi"
    with create_image(disk, MiB) as image:
        assert isinstance(image, VDIImage)
        disk_uuid = image.uuid
    media = f"""<HardDisk uuid="{{{disk_uuid}}}" location="secret.vdi" format="VDI">
          <Property name="CRYPT/KeyId" value="vm"/>
          <Property name="CRYPT/KeyStore" value="U0NORQABQUVTLVhUUzI1Ni1QTEFJTjY0AAAA"/>
        </HardDisk>"""
    (tmp_path / "vm.vbox").write_text(_vbox_xml(media, ""))
    with pytest.raises(UnsupportedImageError, match="encrypted") as excinfo:
        open_image(disk)
    assert excinfo.value.field == "encryption"


def test_writing_an_image_with_registered_children_is_refused(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    (vm / "Snapshots").mkdir(parents=True)
    base = vm / "base.vdi"
    create_image(base, MiB).close()
    diff = vm / "Snapshots" / "d.vdi"
    create_image(diff, parent=base).close()
    with open_image(diff) as image:
        assert image.parent is not None
        base_uuid, diff_uuid = image.parent.uuid, image.uuid  # type: ignore[attr-defined]
    media = f"""<HardDisk uuid="{{{base_uuid}}}" location="base.vdi" format="VDI">
          <HardDisk uuid="{{{diff_uuid}}}" location="Snapshots/d.vdi" format="VDI"/></HardDisk>"""
    (vm / "vm.vbox").write_text(_vbox_xml(media, ""))
    with pytest.raises(ChainError, match="Open the leaf") as excinfo:
        open_image(base, writable=True)
    assert excinfo.value.field == "children"
    with open_image(base) as image:  # reading is fine
        assert image.read(1) == b"\0"
    with open_image(diff, writable=True) as image:
        image.write_at(0, b"ok")
    # a copy of the base (same UUID, another file) is not what the registry protects
    copy = vm / "copy.vdi"
    copy.write_bytes(base.read_bytes())
    with open_image(copy, writable=True) as image:
        image.write_at(0, b"mine")


def test_create_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="power of two"):
        create_image(tmp_path / "a.vdi", MiB, block_size=3000)
    with pytest.raises(ValueError, match="subformat"):
        create_image(tmp_path / "a.vdi", MiB, subformat="sparse")
    with pytest.raises(ValueError, match="header"):
        create_image(tmp_path / "a.vdi", MiB, header="vmware")
    for extra in (100, 1536, -512):
        with pytest.raises(ValueError, match="block_extra"):
            create_image(tmp_path / "a.vdi", MiB, block_extra=extra)
    with pytest.raises(TypeError, match="unknown VDI option"):
        create_image(tmp_path / "a.vdi", MiB, cluster_size=4096)
    assert not (tmp_path / "a.vdi").exists()
    create_image(tmp_path / "base.vdi", MiB).close()
    with pytest.raises(ValueError, match="always dynamic"):
        create_image(tmp_path / "c.vdi", parent=tmp_path / "base.vdi", subformat="fixed")
    qemu_img("create", "-f", "qcow2", tmp_path / "q.qcow2", "1M")
    with pytest.raises(ValueError, match="needs a VDI parent"):
        create_image(tmp_path / "d.vdi", parent=tmp_path / "q.qcow2")
    assert not (tmp_path / "d.vdi").exists()
    with create_image(tmp_path / "e.vdi", MiB, comment="hello") as image:
        assert isinstance(image, VDIImage)
        assert image.header.comment == "hello"


def test_crash_between_map_and_header_leaks_but_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "crash.vdi"
    with create_image(path, 4 * MiB) as image:
        image.write_at(0, b"\x01" * 10)
        image.write_at(MiB, b"\x02" * 10)
    # as if the process died after writing block 1's map entry but before the header
    patch(path, OFF_ALLOCATED, struct.pack("<I", 1))
    with open_image(path) as image:  # reading changes nothing
        assert image.read_at(MiB, 10) == b"\x02" * 10
    assert u32(path, OFF_ALLOCATED) == 1
    with open_image(path, writable=True) as image:
        image.write_at(MiB + 20, b"\x02")  # no allocation, but the header is repaired
        assert u32(path, OFF_ALLOCATED) == 2
        image.write_at(2 * MiB, b"\x03" * 10)
    with open_image(path) as image:
        assert image.read_at(0, 10) == b"\x01" * 10
        assert image.read_at(MiB, 10) == b"\x02" * 10
        assert image.read_at(2 * MiB, 10) == b"\x03" * 10
    assert block_map(path)[:3] == [0, 1, 2]
    # a leaked slot (data written, map entry never) is reused once the slots run out
    patch(path, u32(path, OFF_BLOCKS) + 4, struct.pack("<I", BLOCK_FREE))
    with open_image(path, writable=True) as image:
        image.write_at(3 * MiB + 1, b"\x04")
        image.write_at(MiB + 1, b"\x05")
    assert block_map(path) == [0, 1, 2, 3]  # block 3 takes the next slot, block 1 the leaked one
    with open_image(path) as image:
        assert image.read_at(MiB, 3) == b"\0\x05\0"
        assert image.read_at(3 * MiB, 3) == b"\0\x04\0"
    qemu_check(path, "vdi")


# -- legacy and damaged images ------------------------------------------------------------------------


def _legacy_v0(path: Path, size: int, block: int, blocks_data: dict[int, bytes]) -> None:
    count = -(-size // block)
    entries = [BLOCK_FREE] * count
    data = b""
    for slot, (index, payload) in enumerate(sorted(blocks_data.items())):
        entries[index] = slot
        data += payload.ljust(block, b"\0")
    header = struct.pack(
        "<II256s4IQIII16s16s16s",
        1, 0, b"legacy", 0, 0, 0, 512, size, block, count, len(blocks_data),
        uuid.uuid4().bytes_le, uuid.uuid4().bytes_le, bytes(16),
    )  # fmt: skip
    pre = b"<<< innotek VirtualBox Disk Image >>>".ljust(64, b"\0") + struct.pack("<II", 0xBEDA107F, 0)
    path.write_bytes(pre + header + struct.pack(f"<{count}I", *entries) + data)


def test_legacy_v0_header_reads_but_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "old.vdi"
    _legacy_v0(path, 3 * MiB, MiB, {2: b"\x99" * MiB, 0: b"\x98" * 100})
    with open_image(path) as image:
        assert isinstance(image, VDIImage)
        assert image.header.major == 0
        assert image.header.off_blocks == 72 + 348
        expect = b"\x98" * 100 + bytes(2 * MiB - 100) + b"\x99" * MiB
        assert image.read() == expect
    with pytest.raises(UnsupportedImageError, match="legacy") as excinfo:
        open_image(path, writable=True)
    assert excinfo.value.field == "version"


def _small(tmp_path: Path, name: str = "s.vdi", header: str = "qemu") -> Path:
    path = tmp_path / name
    with create_image(path, 4 * MiB, "vdi", header=header) as image:
        image.write_at(0, b"\x01" * MiB)
        image.write_at(2 * MiB, b"\x02" * 100)
    return path


@pytest.mark.parametrize(
    ("offset", "value", "field", "message"),
    [
        (0x40, b"\0\0\0\0", "signature", "not the VDI signature"),
        (OFF_VERSION, struct.pack("<I", 0x00020000), "version", "unknown"),
        (0x48, struct.pack("<I", 100), "cbHeader", "header size"),
        (OFF_TYPE, struct.pack("<I", 9), "type", "not 1-4"),
        (OFF_BLOCK_SIZE, struct.pack("<I", 3000), "cbBlock", "power of two"),
        (OFF_BLOCK_SIZE, struct.pack("<I", 1 << 31), "cbBlock", "power of two"),
        (OFF_BLOCK_EXTRA, struct.pack("<I", 0xFFFFFFF0), "cbBlockExtra", "absurd"),
        (OFF_CBLOCKS, struct.pack("<I", 0xFFFFFFF0), "cBlocks", "limit"),
        (OFF_CBLOCKS, struct.pack("<I", 2000000), "offBlocks", "past the end"),
        (OFF_CBLOCKS, struct.pack("<I", 200000), "offData", "overlaps the block map"),
        (OFF_DISK_SIZE, struct.pack("<Q", 1 << 60), "cbDisk", "does not fit"),
        (OFF_ALLOCATED, struct.pack("<I", 5), "cBlocksAllocated", "only 4"),
        (OFF_BLOCKS, struct.pack("<I", 0x40), "offBlocks", "overlaps"),
        (OFF_BLOCKS, struct.pack("<I", 0xFFFFFF00), "offBlocks", "past the end"),
        (OFF_DATA, struct.pack("<I", 0x200), "offData", "overlaps the block map"),
        (0x200, struct.pack("<I", 7), "block map entry 0", "only 4 blocks"),
        (0x200 + 8, struct.pack("<I", 0), "block map entry 2", "also used by block 0"),
    ],
)
def test_damaged_header_fields_are_named(
    tmp_path: Path, offset: int, value: bytes, field: str, message: str
) -> None:
    path = _small(tmp_path)
    patch(path, offset, value)
    with pytest.raises(ImageFormatError, match=message) as excinfo:
        open_image(path, format="vdi")
    assert excinfo.value.field == field
    assert excinfo.value.path == path


_MAP_MEMORY_PROBE = """
import resource, sys
from diskhandler import open_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open_image(sys.argv[1]) as image:
    image.read_at(image.size - 1, 1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_huge_block_map_costs_little_more_memory_than_itself(tmp_path: Path) -> None:
    # 2 Mi blocks of 512 bytes, every one allocated: an 8 MiB map (a header may claim up to 16 Mi
    # blocks, so anything per entry beyond the map itself multiplies)
    blocks = 2 << 20
    path = tmp_path / "big.vdi"
    create_image(path, blocks * 512, block_size=512, header="qemu").close()
    patch(path, u32(path, OFF_BLOCKS), struct.pack(f"<{blocks}I", *range(blocks)))
    patch(path, OFF_ALLOCATED, struct.pack("<I", blocks))
    os.truncate(path, u32(path, OFF_DATA) + blocks * 512)
    proc = subprocess.run(
        [sys.executable, "-c", _MAP_MEMORY_PROBE, path], check=True, capture_output=True, text=True
    )
    assert int(proc.stdout) < 40, f"opening took {proc.stdout.strip()} MiB more memory"


def test_truncated_images(tmp_path: Path) -> None:
    path = _small(tmp_path, header="virtualbox")
    full = path.read_bytes()
    for cut, field in ((70, "VDI pre-header"), (300, "VDI header"), (MiB + 8, "offBlocks")):
        path.write_bytes(full[:cut])
        with pytest.raises(ImageFormatError) as excinfo:
            open_image(path, format="vdi")
        assert excinfo.value.field == field
    # the map is intact but a data block is cut short: reading it fails, naming the file
    path.write_bytes(full[: len(full) - 100])
    with open_image(path) as image:
        assert image.read_at(0, 10) == b"\x01" * 10
        with pytest.raises(ImageFormatError, match="truncated") as excinfo:
            image.read_at(3 * MiB - 50, 10)
        assert excinfo.value.path == path


def test_not_detected_without_the_signature(tmp_path: Path) -> None:
    path = _small(tmp_path)
    patch(path, 0x40, b"\x7f\x10\xda\xbf")
    with open_image(path) as image:
        assert image.format == "raw"


_VALID: dict[str, bytes] = {}


def _valid_image_bytes(header: str) -> bytes:
    if header not in _VALID:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "v.vdi"
            with create_image(path, 3 * MiB, "vdi", header=header, block_size=512 * KiB) as image:
                image.write_at(600 * KiB, b"\x05" * MiB)
            raw = path.read_bytes()
        # keep the header, the map and the data; drop VirtualBox's 1 MiB alignment padding
        _VALID[header] = raw
    return _VALID[header]


def _open_fuzzed(tmp_path: Path, data: bytes) -> None:
    """Open and read damaged bytes: either it works or an ImageFormatError names the file."""
    path = tmp_path / "fuzz.vdi"
    path.write_bytes(data)
    error: ImageFormatError | None = None
    try:
        with open_image(path, format="vdi") as image:
            image.read_at(0, 4096)
            image.read_at(max(0, image.size - 5000), 5000)
    except ImageFormatError as exc:
        error = exc
    finally:
        path.unlink()
    if error is not None:
        assert error.path == path
        assert str(path) in str(error)


@settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    header=st.sampled_from(["qemu", "virtualbox"]),
    edits=st.lists(st.tuples(st.integers(0x40, 0x21F), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_header_mutations(tmp_path: Path, header: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(_valid_image_bytes(header))
    for offset, byte in edits:
        data[offset] = byte
    _open_fuzzed(tmp_path, bytes(data))


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=0, max_size=2048))
def test_fuzz_random_data_after_signature(tmp_path: Path, body: bytes) -> None:
    pre = bytes(64) + struct.pack("<I", 0xBEDA107F)
    _open_fuzzed(tmp_path, pre + body)


def test_readers_of_a_fully_written_image_agree(tmp_path: Path) -> None:
    """Sequential 1 MiB reads (the fast path) across a map whose slots are out of order."""
    path = tmp_path / "full.vdi"
    rng = random.Random(3)
    size = 8 * MiB
    model = bytearray(size)
    with create_image(path, size) as image:
        order = list(range(8))
        rng.shuffle(order)
        for index in order:
            payload = rng.randbytes(MiB)
            image.write_at(index * MiB, payload)
            model[index * MiB : (index + 1) * MiB] = payload
    with open_image(path) as image:
        buf = bytearray(3 * MiB + 17)
        pos = 0
        while n := image.readinto(buf):
            assert buf[:n] == model[pos : pos + n]
            pos += n
    assert hashlib.sha256(qemu_flatten(path, "vdi", tmp_path / "f.raw").read_bytes()).digest() == (
        hashlib.sha256(model).digest()
    )


def test_registry_may_name_a_base_of_another_format(tmp_path: Path) -> None:
    """VirtualBox snapshots of a VHD (or VMDK) disk are VDI diffs; only the registry says where the
    base is and what format it has."""
    vhd = tmp_path / "base.vhd"
    with create_image(vhd, 2 * MiB) as image:
        image.write_at(0, b"\x71" * (2 * MiB))
    scratch_parent, child = tmp_path / "scratch.vdi", tmp_path / "child.vdi"
    create_image(scratch_parent, 2 * MiB).close()
    create_image(child, parent=scratch_parent).close()
    scratch_parent.unlink()
    vhd_uuid = uuid.uuid4()
    patch(child, OFF_UUID_LINKAGE, vhd_uuid.bytes_le)
    media = f"""<HardDisk uuid="{{{vhd_uuid}}}" location="base.vhd" format="VHD">
          <HardDisk uuid="{{{uuid.uuid4()}}}" location="child.vdi" format="VDI"/></HardDisk>"""
    (tmp_path / "vm.vbox").write_text(_vbox_xml(media, ""))
    with open_image(child, writable=True) as image:
        image.write_at(MiB, b"\x72" * 10)  # the rest of the new block comes from the VHD
    with open_image(child) as image:
        assert image.chain == (child, vhd)
        assert image.parent is not None
        assert image.parent.format == "vhd"
        assert image.read_at(MiB - 1, 12) == b"\x71" + b"\x72" * 10 + b"\x71"


def test_machine_state_file(tmp_path: Path) -> None:
    from diskhandler.formats._vbox import machine_state_file

    vbox = tmp_path / "vm.vbox"
    vbox.write_text(_vbox_xml("", ""))
    assert machine_state_file(vbox) is None
    vbox.write_text(_vbox_xml("", "").replace('name="vm"', 'name="vm" stateFile="Snapshots/x.sav"'))
    assert machine_state_file(vbox) == tmp_path / "Snapshots" / "x.sav"


_VBOX_SAMPLE = _vbox_xml(
    '<HardDisk uuid="{0f6a3c1e-8f87-4c53-9d0b-2b3f5f0d1c11}" location="a.vdi" format="VDI">'
    '<HardDisk uuid="{1f6a3c1e-8f87-4c53-9d0b-2b3f5f0d1c11}" location="Snapshots/b.vdi"/></HardDisk>',
    '<AttachedDevice type="HardDisk" port="0" device="0">'
    '<Image uuid="{1f6a3c1e-8f87-4c53-9d0b-2b3f5f0d1c11}"/></AttachedDevice>',
)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(_VBOX_SAMPLE) - 1), st.characters()), max_size=6))
def test_fuzz_vbox_files(tmp_path: Path, edits: list[tuple[int, str]]) -> None:
    text = list(_VBOX_SAMPLE)
    for position, char in edits:
        text[position] = char
    vbox = tmp_path / "fuzz.vbox"
    vbox.write_text("".join(text), encoding="utf-8", errors="surrogatepass")
    try:
        disks = current_disks(vbox)
    except ImageFormatError as exc:
        assert exc.path == vbox  # noqa: PT017  (the error must name the machine file)
    else:
        assert all(isinstance(d, Path) for d in disks)


def _allocating_workload(path: Path) -> None:
    with open_image(path, writable=True) as image:
        image.write_at(MiB + 5, b"\x22" * 100)  # a new block, filled around the data
        image.write_at(0, b"\x12" * 10)  # in place
        image.write_at(2 * MiB, b"\x33" * MiB)  # a whole new block
        image.write_at(3 * MiB - 7, b"\x44" * 14)  # across into block 3


def _assert_at_worst_a_leak(path: Path, when: str) -> None:
    """``qemu-img check`` finds nothing, or only a header that counts more blocks than the map uses
    (qemu calls any count mismatch corruption, but a leaked slot is harmless to every writer)."""
    proc = subprocess.run(
        ["qemu-img", "check", "-f", "vdi", path], check=False, capture_output=True, text=True
    )
    if proc.returncode == 0:
        return
    found = re.fullmatch(r"ERROR: allocated blocks mismatch, is (\d+), should be (\d+)\n", proc.stderr)
    report = f"{when}:\n{proc.stdout}{proc.stderr}"
    assert found is not None, report
    assert int(found[1]) < int(found[2]), report


def test_power_cut_at_any_write_leaves_an_image_every_writer_can_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = tmp_path / "seed.vdi"
    with create_image(seed, 6 * MiB, header="qemu") as image:
        image.write_at(0, b"\x11" * MiB)

    def check(work: Path, when: str) -> None:
        _assert_at_worst_a_leak(work, when)
        with open_image(work) as image:
            assert image.read_at(MiB - 10, 10) == b"\x11" * 10, when
            survivors = bytearray(image.read_at(0, 6 * MiB))
        # whatever survived must survive the next writer too: qemu (like VirtualBox) allocates at
        # the header's cBlocksAllocated, so that count must never lag behind the block map
        qemu_io(work, "vdi", ["write -P 0x55 5M 4k"])
        survivors[5 * MiB : 5 * MiB + 4096] = b"\x55" * 4096
        with open_image(work) as image:
            assert image.read_at(0, 6 * MiB) == survivors, when

    power_cut_at_every_write(
        monkeypatch, seed, tmp_path / "work.vdi", _allocating_workload, check, min_writes=8
    )
