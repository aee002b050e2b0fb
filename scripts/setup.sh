#!/usr/bin/env bash
# Set up everything pyti needs on a fresh Debian or Ubuntu machine: system packages, a virtualenv in
# .venv with pyti installed (editable, with its test tools), and the libvirt-qemu system user that
# libvirt's embedded QEMU driver looks up when it runs as root. Safe to run again: it only does what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # building libvirt-python (it has no wheels) and the virtualenv
  python3 python3-venv python3-dev gcc pkg-config libvirt-dev
  # the hypervisor: libvirt's QEMU driver runs inside the Python process (qemu:///embed)
  libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients qemu-system-x86 qemu-utils
  # virt-xml-validate (libvirt-clients) needs xmllint
  libxml2-utils
  # guest filesystems in user space, FUSE: libfuse3 (+ fusermount3) for the vdfuse server (writeback
  # cache, 1 MiB requests); libfuse2 is its fallback and what fuse2fs/fusefat link against
  libfuse3-3 fuse3 libfuse2 fuse2fs ntfs-3g fusefat e2fsprogs dosfstools mtools
  # reference tools used by the tests (partition tables, image building)
  gdisk parted fdisk cpio busybox-static
  # the LVM tests build volume groups with the real lvm2 tools on loop devices (no activation needed)
  lvm2
  # vmanager's tests boot a BIOS live ISO of the tiny guest (isolinux.bin, ldlinux.c32, the ISO writer)
  isolinux syslinux-common genisoimage
  # system disks (pyti image build --os): mmdebstrap makes the Debian tree with a private apt
  # configuration checked against Debian's keyring; grub-pc-bin gives GRUB's BIOS boot images
  # (grub-mkimage, boot.img) that pyti writes into the disk itself
  mmdebstrap grub-pc-bin debian-archive-keyring
)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing system packages: ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt's embedded QEMU driver, run as root, resolves the user 'libvirt-qemu' before reading any
# configuration; Debian's libvirt-daemon-system would create it, we only need the user.
if [ "$(id -u)" -eq 0 ] && ! id libvirt-qemu >/dev/null 2>&1; then
  useradd -r -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.pyti-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing pyti into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
