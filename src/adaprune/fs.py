"""Files adaprune writes and reads: atomic replacement, regular files only, bounded reads, plain names.

Writing: every file goes to a new temporary file in the same directory (created exclusively, so it
never follows a symlink planted under its name), is flushed to disk, and is swapped in with
``os.replace``, which replaces a symlink at the destination instead of writing through it. A failure
at any point (a full disk, a kill) leaves the previous version of the file as it was; the temporary
file is removed when the process can still do so. ``OSError`` becomes :class:`StorageError` naming the
file.

Reading: only regular files are read (a FIFO or a link to ``/dev/zero`` would block or never end);
reads are bounded in size; text must be UTF-8; JSON is parsed with nesting errors caught; the result is
validated against a pydantic schema, so malformed content is one :class:`FileFormatError` naming the
file and the field. Names taken from files (a weights file named in ``state.json``) must be plain
names: no separators, no ``..``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import FileFormatError, StorageError, shown

__all__ = [
    "MAX_JSON_BYTES",
    "TMP_MARK",
    "check_name",
    "check_regular",
    "is_temporary",
    "kind",
    "parse",
    "read_bytes",
    "read_json",
    "read_model",
    "read_text",
    "remove_file",
    "rename",
    "sha256",
    "write_atomic",
    "write_json",
    "write_text",
]

MAX_JSON_BYTES = 256 << 20
"""The largest JSON or YAML file adaprune reads (a plan of a 7B-parameter model is a few MB)."""

TMP_MARK = ".tmp-"
"""Temporary files are named ``.<name>.tmp-<random><suffix>``: a killed write leaves only such a file."""

M = TypeVar("M", bound=BaseModel)
Writer = Callable[[str], object]
"""Writes the file at the path it is given (its return value is ignored)."""

# Indirections the fault-injection tests replace (a disk that fills up, a kill between two steps).
_replace = os.replace
_fsync = os.fsync


# -- writing ------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike[str], data: bytes | Writer, *, what: str = "") -> Path:
    """Write ``data`` (bytes, or ``writer(tmp_path)`` that writes the file) to ``path`` atomically.

    Raises:
        StorageError: the write failed (disk full, permissions, missing directory); ``path`` holds
            what it held before.
    """
    target = Path(path)
    label = what or target.name
    _check_destination(target, label)
    try:
        # the same suffix as the target: writers that pick the format from it (matplotlib) still can
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}", suffix=target.suffix)
    except OSError as exc:
        raise _storage(exc, target, label) from None
    with contextlib.suppress(OSError, AttributeError):  # mkstemp makes it 0600: the mode open() would give
        os.fchmod(fd, _mode(target))
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            with contextlib.suppress(OSError, AttributeError):  # the writer may have replaced the file
                os.fchmod(fd, _mode(target))
        else:
            _write_all(fd, data)
        _fsync(fd)
        os.close(fd)
        fd = -1
        _replace(tmp, target)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):  # (gone already, or the disk is gone: the next write cleans up)
            os.unlink(tmp)
        cause = _os_error(exc)
        if cause is not None:
            raise _storage(cause, target, label) from exc
        raise
    _sync_dir(target.parent)
    return target


def _check_destination(target: Path, label: str) -> None:
    """Only a regular file or a symbolic link (replaced, not followed) is ever replaced: never a device, a
    FIFO, a socket or a directory (``/dev/null`` given as a path must not become a file)."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _storage(exc, target, label) from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        raise StorageError(
            f"writing {label}: {shown(str(target), 120)} is {kind}, not a file; adaprune replaces only regular "
            "files: give the path of a file"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import (changing the umask is process-wide and not thread-safe)


def _mode(target: Path) -> int:
    """The mode of the file being replaced (its permissions are kept), else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _os_error(exc: BaseException) -> OSError | None:
    """The operating-system error behind ``exc``: itself, or one a writer reported in its own exception
    type (safetensors says "I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc
    if not isinstance(exc, Exception):
        return None
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _sync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: some file systems cannot open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            _fsync(fd)
    finally:
        os.close(fd)


def _storage(exc: OSError, target: Path, label: str) -> StorageError:
    reason = exc.strerror or type(exc).__name__
    fix = {
        errno.ENOSPC: "free some disk space and run again",
        errno.EDQUOT: "free some disk space and run again",
        errno.ENOENT: "create the directory first",
        errno.EACCES: "check the directory's permissions",
        errno.EROFS: "write somewhere writable",
    }.get(exc.errno or 0, "check the path and the disk")
    err = StorageError(
        f"writing {label} ({shown(str(target), 120)}) failed: {reason}; its previous version is unchanged; {fix}"
    )
    err.errno = exc.errno
    return err


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "") -> Path:
    """:func:`write_atomic` of UTF-8 text."""
    return write_atomic(path, text.encode("utf-8"), what=what)


def write_json(path: str | os.PathLike[str], obj: Any, *, what: str = "", indent: int | None = 1) -> Path:
    """:func:`write_atomic` of ``obj`` as JSON (NaN and infinity are refused: they are not JSON)."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as exc:
        raise FileFormatError(f"{what or Path(path).name}: cannot be written as JSON ({exc})") from None
    return write_text(path, text, what=what)


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, what: str = "") -> None:
    """``os.replace`` (atomic, never through a symlink at ``dst``); a failure is :class:`StorageError`."""
    try:
        _replace(src, dst)
    except OSError as exc:
        raise _storage(exc, Path(dst), what or Path(dst).name) from None


def kind(path: str | os.PathLike[str], *, what: str, error: type[Exception] = FileFormatError) -> str | None:
    """``"dir"``, ``"file"`` (anything else that exists) or ``None`` (nothing there) for ``path``; a path
    the system cannot even look up (a name too long, a loop of links, no permission) is ``error``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as exc:
        raise error(f"{what}: {shown(str(path), 120)} cannot be used ({exc.strerror})") from None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of :func:`write_atomic`'s temporary files."""
    return name.startswith(".") and TMP_MARK in name


def remove_file(path: str | os.PathLike[str]) -> None:
    """Remove a file or a symlink (never what it points to); a missing file is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise StorageError(f"{path} is a directory where adaprune expects one of its files; move it away") from None
    except OSError as exc:
        raise _storage(exc, Path(path), Path(path).name) from None


# -- reading ------------------------------------------------------------------------------------
def _open_regular(path: Path, label: str) -> int:
    """A read-only descriptor of ``path`` after checking, on the open file, that it is a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileFormatError(f"{label}: {path} does not exist") from None
    except IsADirectoryError:
        raise FileFormatError(f"{label}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise FileFormatError(f"{label}: {path} cannot be opened ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise FileFormatError(f"{label}: {path} is {kind}; adaprune reads only regular files")
    return fd


def check_regular(path: str | os.PathLike[str], *, what: str = "") -> Path:
    """``path`` if it is (or links to) a regular file, else :class:`FileFormatError`: call before handing
    a path to a library that opens it itself (safetensors)."""
    p = Path(path)
    os.close(_open_regular(p, what or p.name))
    return p


def read_bytes(path: str | os.PathLike[str], *, what: str = "", limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    p = Path(path)
    label = what or p.name
    fd = _open_regular(p, label)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FileFormatError(f"{label}: {p} is {size:,} bytes, more than the {limit:,} adaprune reads")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(min(size, limit) + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileFormatError(f"{label}: {p} is more than the {limit:,} bytes adaprune reads")
    return data


def read_text(path: str | os.PathLike[str], *, what: str = "", limit: int = MAX_JSON_BYTES) -> str:
    """A regular file's text, which must be UTF-8."""
    p = Path(path)
    data = read_bytes(p, what=what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(
            f"{what or p.name}: {p} is not UTF-8 text (byte {exc.start}); the file is corrupted or not "
            "the one adaprune wrote"
        ) from None


def read_json(path: str | os.PathLike[str], *, what: str = "", limit: int = MAX_JSON_BYTES) -> Any:
    """A regular file's JSON content (any shape; validate it with :func:`parse`)."""
    p = Path(path)
    text = read_text(p, what=what, limit=limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{what or p.name}: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise FileFormatError(f"{what or p.name}: {p} is not valid JSON ({shown(str(exc), 100)})") from None
    except RecursionError:
        raise FileFormatError(f"{what or p.name}: {p} is nested too deeply to be a file adaprune wrote") from None


def parse(schema: type[M], data: Any, *, what: str) -> M:
    """``data`` validated against ``schema``; the first problem becomes one :class:`FileFormatError`
    line naming the field (``history[3].accepted``), what is wrong and the value (bounded)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        value = "" if first["type"] == "missing" else f", got {shown(first.get('input'))}"
        raise FileFormatError(
            f"{what}: field {where or '(top level)'}: {first['msg'].lower()}{value}{more}; the file is "
            "corrupted or was not written by this version of adaprune"
        ) from None
    except RecursionError:
        raise FileFormatError(f"{what}: nested too deeply to be a file adaprune wrote") from None


def read_model(schema: type[M], path: str | os.PathLike[str], *, what: str = "", limit: int = MAX_JSON_BYTES) -> M:
    """:func:`read_json` then :func:`parse`."""
    p = Path(path)
    label = what or p.name
    return parse(schema, read_json(p, what=label, limit=limit), what=f"{label} ({p})")


def sha256(path: str | os.PathLike[str], *, what: str = "") -> str:
    """SHA-256 of a regular file (read in chunks, any size)."""
    p = Path(path)
    fd = _open_regular(p, what or p.name)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        left = os.fstat(f.fileno()).st_size  # no more than the file's size: a /proc file streams forever
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def check_name(name: Any, *, what: str) -> str:
    """``name`` if it is a plain file name (no directory part, no ``..``), else :class:`FileFormatError`."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or (os.altsep is not None and os.altsep in name)
    ):
        raise FileFormatError(
            f"{what}: {shown(name)} is not a plain file name; a file adaprune wrote names files in its "
            "own directory only"
        )
    return name
