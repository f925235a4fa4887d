"""A run directory: adaprune's own, marked, locked while a run holds it, written atomically.

- **Marked.** A run directory holds ``.adaprune-run`` (JSON: the run's id and the names, as
  ``fnmatch`` patterns from :data:`~adaprune.adapt.ownership.KNOWN`, that adaprune writes in it,
  recorded *before* anything is written). A directory is used as a run directory only if it does not
  exist, is empty, or carries the mark. Anything else is refused unless the caller forces it
  (``force=True`` / ``--force``), and even then a name adaprune would write that is already taken by a
  file it did not write is refused, never overwritten (see :mod:`adaprune.adapt.ownership`).
- **Locked.** While a run holds the directory it holds an exclusive ``flock`` on ``.adaprune-lock``,
  whose text names the holder (process id, host, start time, command). A second run on the same
  directory is refused at once with that name. The kernel drops the lock when the holder dies, however
  it dies, so a killed run never leaves a stale lock.
- **Atomic.** Every file is written by :mod:`adaprune.fs` (temporary file + ``os.replace``, never
  through a symlink). ``state.json`` is the commit point of a step: it is replaced only after the
  weights file it names is complete, so a run killed at any instant resumes from its last step.
- **Checked first.** Every refusal happens before anything is written (the lock file included).
  **Starting over** (``force``) deletes only the files the mark names, i.e. files adaprune wrote.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import stat
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .. import fs
from ..errors import FileFormatError, RunDirError, RunDirLockedError, shown
from . import ownership
from .ownership import KNOWN, LOCK, MARK, RUN_FILES, STATE, STATES
from .state import WEIGHTS_PATTERN, ControllerState

try:  # POSIX; elsewhere runs are not locked (the mark and atomic writes still hold)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class _Mark(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["adaprune-run"]
    version: Literal[1]
    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    created: str
    names: list[str] = Field(default_factory=list)  # what adaprune writes here: a subset of KNOWN

    @field_validator("names")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in KNOWN]
        if unknown:
            raise ValueError(f"{shown(unknown[0])} is not a name adaprune writes")
        return names


class RunDir:
    """The run directory of one ``adapt`` run (see the module docstring for the guarantees).

    Use it as a context manager, or call :meth:`open` and :meth:`close`::

        with RunDir("runs/x").open(resume=True):
            ...
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._mark: _Mark | None = None
        self._protected: list[Path] = []

    # -- ownership and the lock -------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def check(
        self,
        *,
        resume: bool = False,
        force: bool = False,
        restart: bool = False,
        names: Iterable[str] = RUN_FILES,
        protect: Iterable[str | os.PathLike[str]] = (),
        state: str = STATE,
    ) -> None:
        """Every check of :meth:`open`, reading only: run it before slow work, and before writing anything."""
        names = _known(names)
        protected = [Path(p) for p in protect]
        found = fs.kind(self.path, what="run_dir", error=RunDirError)
        if found is None:
            if self.path.is_symlink():
                raise RunDirError(f"run_dir: {self.path} is a symbolic link to nothing; fix or remove it")
            return
        if found != "dir":
            raise RunDirError(f"run_dir: {self.path} is not a directory; choose a directory for the run")
        if not self.is_open:
            self._check_not_busy()
        owned = self._owned()
        if owned is None:  # not a run directory
            foreign = ownership.entries(self.path)
            if foreign and not force:
                raise RunDirError(
                    f"run_dir: {self.path} is not an adaprune run directory (no {MARK}) and is not empty "
                    f"(it holds {_listing(foreign)}); choose a new or empty directory, or pass --force / "
                    "force=True to use it anyway (adaprune then writes only names that are free and deletes "
                    "nothing)"
                )
        elif resume and self.holds_run() not in (None, state):
            raise RunDirError(
                f"run_dir: {self.path} holds another kind of run ({self.holds_run()}), not one this command can "
                f"continue ({state}); choose its own run_dir, or start over with --force / force=True"
            )
        elif self.holds_run() and not (resume or force or restart):
            raise RunDirError(
                f"run_dir: {self.path} already holds a run ({self.holds_run()}); continue it with --resume / "
                "resume=True, or start over with --force / force=True"
            )
        taken = ownership.conflicts(self.path, names, owned or [], protected)
        if taken:
            raise RunDirError(
                f"run_dir: {self.path} holds {_listing(taken)}, which adaprune would write; it never "
                "overwrites or deletes what it did not write: move it away or choose another run_dir"
            )

    def open(
        self,
        *,
        resume: bool = False,
        force: bool = False,
        restart: bool = False,
        names: Iterable[str] = RUN_FILES,
        protect: Iterable[str | os.PathLike[str]] = (),
        state: str = STATE,
    ) -> RunDir:
        """Claim the directory for a run: all checks, then the lock; nothing is written before both pass.

        Args:
            resume: a run found here is to be continued (it is neither refused nor reset).
            force: use a directory that is not a run directory (adopting it: only free names are
                written) and start over in one that holds a run (the files it wrote are deleted first).
            restart: start over in one of adaprune's run directories without asking (the demo's
                output directory); a directory that is not adaprune's is still refused.
            names: the names (patterns from :data:`~adaprune.adapt.ownership.KNOWN`) this run writes.
            protect: files that must never be written or deleted (the user's input config).
            state: the commit point of the kind of run this is (``state.json`` for adapt, the ladder's
                ``ladder-state.json``): a resume refuses a directory that holds another kind.
        """
        if self.is_open:
            return self
        names = _known(names)
        self._protected = [Path(p) for p in protect]
        self.check(resume=resume, force=force, restart=restart, names=names, protect=self._protected, state=state)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"run_dir: cannot create {self.path} ({exc.strerror})") from None
        self._lock()
        try:  # again, under the lock (another process may have changed the directory meanwhile)
            self.check(resume=resume, force=force, restart=restart, names=names, protect=self._protected, state=state)
            owned = self._owned()
            mark = self._read_mark() or _Mark(format="adaprune-run", version=1, run_id=uuid.uuid4().hex,
                                             created=_now(), names=owned or [])
            self._mark = mark
            if (force or restart) and owned is not None and not (resume and self.holds_run()):
                ownership.reset(self.path, mark.names, self._protected)
                self._mark = mark.model_copy(update={"run_id": uuid.uuid4().hex, "created": _now(), "names": []})
            self._mark = self._mark.model_copy(update={"names": sorted({*self._mark.names, *names})})
            self._write_mark()
        except BaseException:
            self.close()
            raise
        return self

    def _owned(self) -> list[str] | None:
        """The names adaprune wrote here (from the mark, or verified in a directory from before marks);
        None if this is not a run directory."""
        mark = self._read_mark()
        return list(mark.names) if mark is not None else ownership.legacy_names(self.path)

    def close(self) -> None:
        """Release the lock (the mark and the files stay)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDir:  # noqa: PYI034  (Self needs Python 3.11)
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_not_busy(self) -> None:
        """Refuse at once, naming the holder, if another run holds the directory (probed without taking it)."""
        path = self.path / LOCK
        if fcntl is None or not path.is_file():
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return  # the lock itself will say what is wrong
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise RunDirLockedError(
                f"run_dir: {self.path} is in use by another run ({_holder(fd)}); wait for it to finish, stop "
                "it, or choose another run_dir"
            ) from None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _lock(self) -> None:
        path = self.path / LOCK
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise RunDirError(f"run_dir: cannot open the lock file {path} ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunDirError(f"run_dir: {path} is not a regular file; remove it (adaprune creates it)")
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise RunDirLockedError(
                        f"run_dir: {self.path} is in use by another run ({_holder(fd)}); wait for it to "
                        "finish, stop it, or choose another run_dir"
                    ) from None
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                    "command": " ".join(sys.argv)[:200]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _need_open(self) -> None:
        if not self.is_open:
            raise RunDirError(f"run_dir: {self.path} is not open; call RunDir.open() first")

    # -- the mark ---------------------------------------------------------------------------------
    def _read_mark(self) -> _Mark | None:
        path = self.path / MARK
        if not (path.exists() or path.is_symlink()):
            return None
        try:
            return fs.read_model(_Mark, path, what=MARK, limit=1 << 20)
        except FileFormatError as exc:
            raise RunDirError(
                f"run_dir: {self.path}'s {MARK} is damaged ({exc}); move the directory away and start a new run"
            ) from None

    def _write_mark(self) -> None:
        assert self._mark is not None
        fs.write_json(self.path / MARK, self._mark.model_dump(), what=f"the run directory's {MARK}")

    @property
    def run_id(self) -> str:
        self._need_open()
        assert self._mark is not None
        return self._mark.run_id

    def owns(self, name: str) -> bool:
        """Whether the top-level ``name`` is one adaprune writes here."""
        return self._mark is not None and ownership.owns(self._mark.names, name)

    def subdir(self, name: str) -> Path:
        """The run's directory ``name`` (``model``, ``plots``), created if needed; it must be one this run
        writes into and a real directory (a symbolic link planted there would send writes elsewhere)."""
        self._need_open()
        assert self._mark is not None
        if not any(ownership.split(n)[0] == name for n in self._mark.names):
            raise RunDirError(f"run_dir: {name}/ is not a directory this run writes into")
        path = self.path / name
        st = ownership._lstat(path)
        if st is None:
            path.mkdir()
        elif not stat.S_ISDIR(st.st_mode):
            raise RunDirError(f"run_dir: {path} is not a real directory (a file or a symbolic link); move it away")
        return path

    # -- files ------------------------------------------------------------------------------------
    def write(self, name: str, data: bytes | fs.Writer, *, what: str = "") -> Path:
        """Write the top-level file ``name`` (one this run claimed when it opened) atomically."""
        self._need_open()
        if not self.owns(name):
            raise RunDirError(f"run_dir: {shown(name)} is not a name this run writes; claim it in open(names=...)")
        target = self.path / fs.check_name(name, what="run directory file")
        for p in self._protected:
            if p.exists() and target.exists() and os.path.samefile(p, target):
                raise RunDirError(f"run_dir: {target} is your input file; adaprune does not overwrite it")
        return fs.write_atomic(target, data, what=what or name)

    def exists(self) -> bool:
        """Whether an ``adapt`` run's state is here."""
        return (self.path / STATE).is_file()

    def holds_run(self) -> str | None:
        """The commit point of the run held here (``adapt``'s or a ladder's), or None."""
        return next((n for n in STATES if (self.path / n).is_file()), None)

    def save(self, state: ControllerState, model: nn.Module) -> None:
        """Write the working model's weights, then ``state.json`` naming them (the commit point)."""
        from safetensors.torch import save_file

        name = f"weights-{state.step:04d}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        self.write(name, lambda tmp: save_file(tensors, tmp), what="the run's weights")
        previous = state.weights
        state.weights = name
        try:
            self.write(STATE, state.to_json().encode("utf-8"), what="the run's state.json")
        except BaseException:
            state.weights = previous
            raise
        if previous and previous != name:
            fs.remove_file(self.path / previous)

    def load(self) -> ControllerState:
        """The validated state (:class:`~adaprune.errors.FileFormatError` naming the field if malformed)."""
        return ControllerState.from_data(
            fs.read_json(self.path / STATE, what=STATE), what=f"{STATE} ({self.path / STATE})"
        )

    def load_weights(self, state: ControllerState, model: nn.Module) -> None:
        """Load the weights file ``state`` names (a plain name in this directory) into ``model``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not state.weights:
            raise RunDirError(f"cannot resume {self.path}: {STATE} names no weights file; start a new run")
        name = fs.check_name(state.weights, what=f"{STATE} field weights")
        path = fs.check_regular(self.path / name, what="the run's weights")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise RunDirError(f"cannot resume: weights file {path} is corrupt ({shown(str(exc), 200)})") from None
        expected = model.state_dict()
        wrong = [k for k in expected if k not in tensors or tuple(tensors[k].shape) != tuple(expected[k].shape)]
        if wrong or set(tensors) - set(expected):
            first = (wrong or sorted(set(tensors) - set(expected)))[0]
            raise RunDirError(
                f"cannot resume: {path} does not fit the model (first difference: {shown(first)}); was the "
                "model changed? resume with the model the run started with, or start a new run"
            )
        with torch.no_grad():
            model.load_state_dict(tensors, strict=True)


def _known(names: Iterable[str]) -> list[str]:
    out = list(names)
    unknown = [n for n in out if n not in KNOWN]
    if unknown:
        raise RunDirError(f"run_dir: {shown(unknown[0])} is not a name adaprune writes in a run directory")
    return out


def _listing(names: list[str]) -> str:
    shown_names = ", ".join(names[:4])
    return shown_names + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _holder(fd: int) -> str:
    try:
        info: Any = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "holder unknown"
    return f"process {shown(info.get('pid'))} on {shown(info.get('host'))}, started {shown(info.get('started'))}: " \
           f"{shown(info.get('command'), 60)}"


__all__ = ["KNOWN", "LOCK", "MARK", "RUN_FILES", "STATE", "WEIGHTS_PATTERN", "RunDir"]
