"""The one door through which every file of an image is opened.

An image names other files: a VDI's parent (found by UUID), a VHD's parent locators, a VMDK's extents
and ``parentFileNameHint``, a qcow2's backing file, a VirtualBox ``.vbox`` registry. All of them come
from bytes a hostile image author chose, so each is opened here and nowhere else:

* the path is checked first: a NUL byte, a name that cannot be encoded, a name or path too long are a
  typed :class:`~diskhandler.errors.ImagePathError`, never a bare ``OSError``/``ValueError``;
* the file is looked at through an ``O_PATH`` descriptor (opening that has no side effect, even on a
  FIFO or a device) and must be a regular file outside ``/proc`` and ``/sys``, else
  :class:`~diskhandler.errors.SpecialFileError` — a FIFO never blocks, ``/dev/zero`` is never read
  forever, ``/proc/kcore`` is never parsed;
* it is then opened with ``O_NONBLOCK | O_NOCTTY | O_CLOEXEC`` and must still be the same inode;
* a parent, backing file or extent must also be where the :data:`ParentPolicy` the image was opened
  with allows (``open_image(path, parents=...)``), else :class:`~diskhandler.errors.ParentPolicyError`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Literal, TypeAlias

from diskhandler.errors import ImageFileError, ImagePathError, ParentPolicyError, SpecialFileError

__all__ = [
    "PARENT_POLICIES",
    "ParentPolicy",
    "check_parent_location",
    "checked_path",
    "normalize_policy",
    "open_image_file",
    "read_small_file",
]

PolicyName: TypeAlias = Literal["any", "same-dir", "none"]
ParentPolicy: TypeAlias = PolicyName | os.PathLike[str]
"""Where the files an image refers to (parents, backing files, extents) may live.

* ``"any"`` (the default): wherever the image says, as qemu, VirtualBox and VMware follow them;
* ``"same-dir"``: only in the folder of the image that was opened, or below it (after symbolic links
  are resolved) — for inspecting an image someone else made;
* ``"none"``: the image must be self-contained: no parent, no backing file, no extent in another file;
* a folder (``pathlib.Path``): only in that folder or below it.
"""

PARENT_POLICIES: tuple[PolicyName, ...] = ("any", "same-dir", "none")

# Pseudo-filesystems whose "regular files" are not data: /proc/kcore, /proc/self/mem, /sys/... .
_REFUSED_TREES = ("/proc", "/sys")
_PATH_MAX = 4096  # linux/limits.h, including the final NUL
_NAME_MAX = 255


def normalize_policy(policy: object) -> PolicyName | Path:
    """``policy`` as ``"any"``, ``"same-dir"``, ``"none"`` or an absolute resolved folder."""
    if isinstance(policy, str):
        for name in PARENT_POLICIES:
            if policy == name:
                return name
        raise ValueError(
            f"parents={policy!r} is not a parent policy; use 'any', 'same-dir', 'none' or a folder as"
            " a pathlib.Path"
        )
    if isinstance(policy, os.PathLike):
        folder = Path(_checked_path(policy, "parents= folder"))
        return Path(os.path.realpath(folder))
    raise TypeError(
        f"parents= must be 'any', 'same-dir', 'none' or a pathlib.Path, not {type(policy).__name__}"
    )


def _checked_path(path: str | os.PathLike[str], role: str) -> str:
    """``path`` as a str the OS accepts, or :class:`ImagePathError` saying why not."""
    try:
        text = os.fspath(path)
    except TypeError as exc:
        raise ImagePathError(errno.EINVAL, f"the {role} path is not a path: {exc}", repr(path)) from None
    if isinstance(text, bytes):
        try:
            text = os.fsdecode(text)
        except UnicodeDecodeError:  # pragma: no cover  (surrogateescape decodes any bytes)
            raise ImagePathError(errno.EILSEQ, f"the {role} path cannot be decoded", repr(path)) from None
    if "\0" in text:
        raise ImagePathError(errno.EINVAL, f"the {role} path contains a NUL byte", text)
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        raise ImagePathError(
            errno.EILSEQ,
            f"the {role} path contains characters that no file name can hold (lone surrogates?)",
            text,
        ) from None
    if len(raw) >= _PATH_MAX:
        raise ImagePathError(
            errno.ENAMETOOLONG,
            f"the {role} path is {len(raw)} bytes long; Linux paths are shorter than {_PATH_MAX}",
            text[:200] + "...",
        )
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > _NAME_MAX:
        raise ImagePathError(
            errno.ENAMETOOLONG,
            f"the {role} path has a name of {longest} bytes; a file name holds at most {_NAME_MAX}",
            text[:200] + ("..." if len(text) > 200 else ""),
        )
    return text


def checked_path(path: str | os.PathLike[str], role: str = "image") -> Path:
    """``path`` as a :class:`Path` the OS accepts, or :class:`ImagePathError` saying why not (a NUL
    byte, a lone surrogate, a name or path too long)."""
    return Path(_checked_path(path, role))


def _in_refused_tree(real: str, st: os.stat_result) -> str | None:
    for tree in _REFUSED_TREES:
        if real == tree or real.startswith(tree + "/"):
            return tree
        try:
            if os.stat(tree).st_dev == st.st_dev:
                return tree
        except OSError:
            continue
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _os_error(exc: OSError, text: str, role: str) -> OSError:
    """A typed error for an ``OSError`` of opening ``text``; other errors are returned unchanged."""
    if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ):
        return ImagePathError(exc.errno, f"the {role} path cannot be opened: {exc.strerror}", text)
    if exc.errno == errno.ELOOP:
        return ImagePathError(exc.errno, f"the {role} path loops through symbolic links", text)
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ImageFileError(
            exc.errno,
            f"cannot open the {role}: too many open files (an image naming thousands of files?);"
            " raise the limit (ulimit -n) if the image is genuine",
            text,
        )
    return exc


def open_image_file(
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    role: str = "image",
) -> int:
    """Open a file of an image and return its descriptor (``O_CLOEXEC``; the caller closes it).

    ``role`` names the file in errors (``"image"``, ``"backing file"``, ``"extent 2"`` ...).

    Raises:
        FileNotFoundError, PermissionError: as ``os.open`` would.
        ImagePathError: the path has a NUL byte, cannot be encoded, is too long, or loops.
        SpecialFileError: a directory, FIFO, device, socket, or a file of ``/proc`` or ``/sys``.
    """
    text = _checked_path(path, role)
    try:
        probe = os.open(text, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(exc, text, role) from exc
    try:
        st = os.fstat(probe)
        if not stat.S_ISREG(st.st_mode):
            raise SpecialFileError(
                errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                f"the {role} is {_kind(st.st_mode)}, not a regular file; an image and the files it"
                " refers to must be regular files",
                text,
            )
        real = os.path.realpath(text)
        tree = _in_refused_tree(real, st)
        if tree is not None:
            raise SpecialFileError(
                errno.EPERM,
                f"the {role} is a file of {tree} ({real}), which holds no disk images; refusing to read it",
                text,
            )
    finally:
        os.close(probe)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(text, flags)
    except OSError as exc:
        raise _os_error(exc, text, role) from exc
    try:
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(again.st_mode):
            raise ImageFileError(
                errno.EAGAIN, f"the {role} was replaced while it was being opened; try again", text
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small_file(path: str | os.PathLike[str], *, limit: int, role: str) -> bytes:
    """The whole of a small regular file (a ``.vbox`` registry, a descriptor), at most ``limit`` bytes.

    Raises what :func:`open_image_file` raises, and :class:`ImageFileError` (EFBIG) past ``limit``.
    """
    fd = open_image_file(path, role=role)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ImageFileError(
                errno.EFBIG,
                f"the {role} is {size} bytes, more than the {limit} such a file may be",
                str(path),
            )
        data = os.pread(fd, limit + 1, 0)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ImageFileError(errno.EFBIG, f"the {role} grew past {limit} bytes while it was read", str(path))
    return data


def check_parent_location(
    policy: PolicyName | Path,
    leaf: Path,
    image: Path,
    referred: Path,
    role: str,
) -> None:
    """Refuse ``referred`` (a parent, backing file or extent named by ``image``) if ``policy`` does.

    ``leaf`` is the image that was opened (its folder is the ``"same-dir"`` anchor).
    """
    _checked_path(referred, role)
    if policy == "any":
        return
    if policy == "none":
        raise ParentPolicyError(
            image,
            role,
            f"the image refers to {role} {referred}, and parents='none' allows only self-contained"
            " images; open it with parents='same-dir' or 'any' if you trust it",
        )
    folder = Path(os.path.realpath(leaf)).parent if policy == "same-dir" else Path(policy)
    real = Path(os.path.realpath(_checked_path(referred, role)))
    if real == folder or folder in real.parents:
        return
    shown = "parents='same-dir'" if policy == "same-dir" else f"parents={str(folder)!r}"
    raise ParentPolicyError(
        image,
        role,
        f"{role} {referred} (really {real}) is outside {folder}, the only folder {shown} allows;"
        " open the image with parents='any' if you trust it",
    )
