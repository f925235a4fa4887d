"""A run directory: adaprune's own, marked, locked while a run holds it, written atomically.

- **Marked.** A run directory holds ``.adaprune-run`` (JSON: the run's id and the names, as
  ``fnmatch`` patterns, that adaprune writes in it, recorded *before* anything is written). A directory is used as a run directory only if it
  does not exist, is empty, or carries the mark. Anything else is refused unless the caller forces it
  (``force=True`` / ``--force``), and even then a name adaprune would write that is already taken by a
  file it did not write is refused, never overwritten.
- **Locked.** While a run holds the directory it holds an exclusive ``flock`` on ``.adaprune-lock``,
  whose text names the holder (process id, host, start time, command). A second run on the same
  directory is refused at once with that name. The kernel drops the lock when the holder dies, however
  it dies, so a killed run never leaves a stale lock.
- **Atomic.** Every file is written by :mod:`adaprune.fs` (temporary file + ``os.replace``, never
  through a symlink). ``state.json`` is the commit point of a step: it is replaced only after the
  weights file it names is complete, so a run killed at any instant resumes from its last step.
- **Starting over** (``force``) deletes only the names the mark lists, i.e. files adaprune wrote.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .. import fs
from ..errors import AdapruneError, FileFormatError, RunDirError, RunDirLockedError, shown
from .state import WEIGHTS_PATTERN, ControllerState

try:  # POSIX; elsewhere runs are not locked (the mark and atomic writes still hold)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MARK, LOCK, STATE = ".adaprune-run", ".adaprune-lock", "state.json"
RUN_FILES = (STATE, "weights-*.safetensors")
"""Names the controller writes in a run directory (patterns); other writers add theirs."""
# files adaprune writes inside the directories it creates (deleted on a restart; anything else stays)
_OWN_INSIDE = ("*.safetensors", "*.json", "*.png", "*.onnx", "*.md", "*.html")


class _Mark(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["adaprune-run"]
    version: Literal[1]
    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    created: str
    names: list[str] = Field(default_factory=list)  # fnmatch patterns of the top-level names adaprune writes


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

    def check(self, *, resume: bool = False, force: bool = False, restart: bool = False) -> None:
        """The checks of :meth:`open` that need no lock and write nothing (run them before slow work)."""
        found = fs.kind(self.path, what="run_dir", error=RunDirError)
        if found is None and not self.path.is_symlink():
            return
        if found != "dir":
            raise RunDirError(f"run_dir: {self.path} is a file, not a directory; choose a directory for the run")
        if not self.is_open:
            self._check_not_busy()
        ours = self._read_mark() is not None or self._legacy()
        if not ours:  # (temporary files are what a killed write of adaprune's own left)
            foreign = [e for e in _entries(self.path) if e != LOCK and not fs.is_temporary(e)]
            if foreign and not force:
                raise RunDirError(
                    f"run_dir: {self.path} is not an adaprune run directory (no {MARK}) and is not empty "
                    f"(it holds {_listing(foreign)}); choose a new or empty directory, or pass --force / "
                    "force=True to use it anyway (adaprune then writes only names that are free and deletes "
                    "nothing)"
                )
        elif self.exists() and not (resume or force or restart):
            raise RunDirError(
                f"run_dir: {self.path} already holds a run ({STATE}); continue it with --resume / "
                "resume=True, or start over with --force / force=True"
            )

    def open(
        self,
        *,
        resume: bool = False,
        force: bool = False,
        restart: bool = False,
        names: Iterable[str] = RUN_FILES,
        protect: Iterable[str | os.PathLike[str]] = (),
    ) -> RunDir:
        """Claim the directory for a run: checks, then the lock; nothing is written before both pass.

        Args:
            resume: a run found here is to be continued (it is neither refused nor reset).
            force: use a directory that is not a run directory (adopting it: only free names are
                written) and start over in one that holds a run (its files are deleted first).
            restart: start over in one of adaprune's run directories without asking (the demo's
                output directory); a directory that is not adaprune's is still refused.
            names: the names (``fnmatch`` patterns) this run will write, checked against files adaprune
                did not write.
            protect: files that must never be written (the user's input config).
        """
        if self.is_open:
            return self
        self._protected = [Path(p) for p in protect]
        self.check(resume=resume, force=force, restart=restart)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"run_dir: cannot create {self.path} ({exc.strerror})") from None
        self._lock()
        try:
            self.check(resume=resume, force=force, restart=restart)  # again, under the lock
            mark = self._read_mark()
            legacy = mark is None and self._legacy()
            self._mark = mark or _Mark(format="adaprune-run", version=1, run_id=uuid.uuid4().hex,
                                       created=_now(), names=list(names) if legacy else [])
            if (force or restart) and (mark is not None or legacy) and not (resume and self.exists()):
                self._reset()
            self.own(*names)
        except BaseException:
            self.close()
            raise
        return self

    def _legacy(self) -> bool:
        """A run directory written before run directories were marked: no mark, but a valid ``state.json``
        or an adaprune ``report.json`` (the demo's output directory)."""
        try:
            if self.exists():
                self.load()
                return True
            report = self.path / "report.json"
            if report.is_file():
                data = fs.read_json(report, what="report.json")
                return isinstance(data, dict) and data.get("format") == "adaprune-report"
        except AdapruneError:
            return False
        return False

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
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise RunDirError(f"run_dir: cannot create the lock file {path} ({exc.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirLockedError(
                    f"run_dir: {self.path} is in use by another run ({holder}); wait for it to finish, stop "
                    "it, or choose another run_dir"
                ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                "command": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
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

    def own(self, *patterns: str) -> None:
        """Record top-level names (``fnmatch`` patterns) as adaprune's before anything matching them is
        written; a matching name already taken by a file adaprune did not write is refused."""
        self._need_open()
        assert self._mark is not None
        self._check_free(patterns)
        new = [n for n in patterns if n not in self._mark.names]
        if new or not (self.path / MARK).is_file():
            self._mark = self._mark.model_copy(update={"names": [*self._mark.names, *new]})
            self._write_mark()

    def owns(self, name: str) -> bool:
        """Whether the top-level ``name`` is one adaprune writes here."""
        return self._mark is not None and any(fnmatch.fnmatchcase(name, p) for p in self._mark.names)

    def _check_free(self, patterns: Iterable[str]) -> None:
        patterns = list(patterns)
        taken = [e for e in _entries(self.path) if not self.owns(e) and e not in (MARK, LOCK)
                 and any(fnmatch.fnmatchcase(e, p) for p in patterns)]
        if taken:
            raise RunDirError(
                f"run_dir: {self.path} holds {_listing(taken)}, which adaprune did not write and would "
                "overwrite; move it away or choose another run_dir"
            )
        for p in self._protected:
            for pattern in patterns:
                if p.parent.resolve() == self.path.resolve() and fnmatch.fnmatchcase(p.name, pattern):
                    raise RunDirError(
                        f"run_dir: {p} is your input file and adaprune would write {p.name} in "
                        f"{self.path}; choose another run_dir or move the file"
                    )

    def _reset(self) -> None:
        """Delete what the previous run wrote (the names in the mark), then give the run a new id."""
        assert self._mark is not None
        for name in _entries(self.path):
            if name in (MARK, LOCK) or not self.owns(name):
                continue
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                for child in path.iterdir():
                    own = fs.is_temporary(child.name) or any(fnmatch.fnmatchcase(child.name, p) for p in _OWN_INSIDE)
                    if own and not child.is_dir():
                        fs.remove_file(child)
                try:
                    path.rmdir()
                except OSError:
                    pass  # something else is inside: it stays, and so does the directory
            else:
                fs.remove_file(path)
        for child in self.path.iterdir():  # temporary files of writes that were killed
            if fs.is_temporary(child.name) and child.is_file():
                fs.remove_file(child)
        self._mark = self._mark.model_copy(update={"run_id": uuid.uuid4().hex, "created": _now(), "names": []})
        self._write_mark()

    # -- files ------------------------------------------------------------------------------------
    def write(self, name: str, data: bytes | fs.Writer, *, what: str = "") -> Path:
        """Write the top-level file ``name`` atomically, after recording it as adaprune's."""
        if not self.owns(name):
            self.own(name)
        target = self.path / fs.check_name(name, what="run directory file")
        for p in self._protected:
            if p.exists() and target.exists() and os.path.samefile(p, target):
                raise RunDirError(f"run_dir: {target} is your input file; adaprune does not overwrite it")
        return fs.write_atomic(target, data, what=what or name)

    def exists(self) -> bool:
        """Whether a run's state is here."""
        return (self.path / STATE).is_file()

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


def _entries(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


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


__all__ = ["LOCK", "MARK", "RUN_FILES", "STATE", "WEIGHTS_PATTERN", "RunDir"]
