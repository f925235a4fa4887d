"""Which files of a run directory are adaprune's: the names it writes, and the pure checks on them.

A name is an ``fnmatch`` pattern relative to the run directory: ``state.json`` and
``weights-*.safetensors`` at the top, ``model/plan.json`` or ``plots/steps.png`` inside one of the two
directories adaprune creates. :data:`KNOWN` is every name adaprune ever writes; a run directory's mark
lists the subset its run claimed, and nothing outside that list is ever replaced or deleted:

- :func:`conflicts` lists what stands in the way of writing a set of names: a file adaprune did not
  write under one of them, a directory of the run that is a symbolic link or a file, the user's input
  file;
- :func:`reset` deletes the files a previous run wrote (only those, never a directory's other files,
  never a protected file) before a run starts over;
- :func:`legacy_names` recognises a run directory written before marks: only what it can verify.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from .. import fs
from ..errors import AdapruneError
from ..io import META, NEXT_PLAN, NEXT_WEIGHTS, PLAN, WEIGHTS

MARK, LOCK, STATE = ".adaprune-run", ".adaprune-lock", "state.json"
LADDER_STATE, LADDER_ORDERED = "ladder-state.json", "ladder-ordered.safetensors"
STATES = (STATE, LADDER_STATE)
"""The commit points of the runs a run directory can hold (``adapt``'s, ``ladder``'s)."""
RUN_FILES = (STATE, "weights-*.safetensors")
"""What the controller writes."""
SAVE_FILES = tuple(f"model/{n}" for n in (WEIGHTS, PLAN, META, NEXT_WEIGHTS, NEXT_PLAN))
"""``adaprune.save`` into the run's ``model/``."""
PLOT_FILES = tuple(f"plots/{n}.png" for n in ("steps", "pareto", "widths", "sensitivity"))
"""The report's plots (``adaprune.report.plots.PLOTS``)."""
REPORT_FILES = ("report.json", "report.html", "report.md", *PLOT_FILES)
SENSITIVITY_FILES = ("sensitivity.json", "sensitivity.md", "sensitivity.png", "sensitivity-cache.json")
CLI_FILES = ("config.yaml", "inputs.safetensors", "model.onnx")
LADDER_FILES = (*(f"ladder/{n}" for n in (WEIGHTS, PLAN, META, NEXT_WEIGHTS, NEXT_PLAN, "ladder.json", "norms.safetensors")),
                "ladder-report.json", "ladder-report.md", "plots/ladder.png")
"""``adaprune ladder``: the ladder (``save_ladder`` into ``ladder/``), its report and plot."""
LADDER_RUN_FILES = (LADDER_STATE, LADDER_ORDERED, "ladder-rung-*.safetensors", "ladder-recovery-*.safetensors")
"""What ``adaprune.ladder(run_dir=...)`` writes to resume (:mod:`adaprune.ladder.run`)."""
KNOWN = frozenset((*RUN_FILES, *SAVE_FILES, *REPORT_FILES, *SENSITIVITY_FILES, *CLI_FILES, *LADDER_FILES,
                   *LADDER_RUN_FILES))


def split(name: str) -> tuple[str | None, str]:
    """``("model", "plan.json")`` for ``model/plan.json``; ``(None, "state.json")`` at the top."""
    head, _, tail = name.partition("/")
    return (head, tail) if tail else (None, head)


def owns(owned: Iterable[str], entry: str, inside: str | None = None) -> bool:
    """Whether ``entry`` (a top-level name, or a file name inside the directory ``inside``) is claimed."""
    for name in owned:
        d, pattern = split(name)
        if inside is None and d == entry:
            return True  # a directory the run writes into
        if d == inside and fnmatch.fnmatchcase(entry, pattern):
            return True
    return False


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def entries(root: Path) -> list[str]:
    """The names in ``root`` but the mark, the lock and temporary files of killed writes."""
    try:
        found = sorted(os.listdir(root))
    except OSError:
        return []
    return [n for n in found if n not in (MARK, LOCK) and not fs.is_temporary(n)]


def conflicts(
    root: Path, names: Sequence[str], owned: Sequence[str], protect: Sequence[Path] = ()
) -> list[str]:
    """What stands in the way of writing ``names`` in ``root`` when ``owned`` are adaprune's (each as
    ``'<name>: <why>'``). Reads only."""
    out: list[str] = []
    dirs = {d for d, _ in map(split, names) if d is not None}
    for entry in entries(root):
        path = root / entry
        if entry in dirs:
            st = _lstat(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
                out.append(f"{entry} ({kind}; adaprune writes only into real directories of its run)")
                continue
            patterns = [p for d, p in map(split, names) if d == entry]
            for child in entries(path):
                if any(fnmatch.fnmatchcase(child, p) for p in patterns) and not owns(owned, child, inside=entry):
                    out.append(f"{entry}/{child} (adaprune did not write it)")
        elif any(fnmatch.fnmatchcase(entry, p) for d, p in map(split, names) if d is None) and not owns(owned, entry):
            out.append(f"{entry} (adaprune did not write it)")
    for p in protect:
        if _within(p, root) and any(_matches(n, p, root) for n in names):
            out.append(f"{p.name} (your input file)")
    return out


def _within(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def _matches(name: str, p: Path, root: Path) -> bool:
    rel = p.resolve().relative_to(root.resolve()).as_posix()
    return fnmatch.fnmatchcase(rel, name)


def _is(path: Path, protect: Sequence[Path]) -> bool:
    for p in protect:
        try:
            if p.exists() and path.exists() and os.path.samefile(p, path):
                return True
        except OSError:
            continue
    return False


def reset(root: Path, owned: Sequence[str], protect: Sequence[Path] = ()) -> None:
    """Delete the files ``owned`` names (and temporary files of killed writes) in ``root``; a directory
    of the run is removed only if that leaves it empty. Never a protected file, never anything else."""
    dirs: set[str] = set()
    for entry in entries(root) + [n for n in os.listdir(root) if fs.is_temporary(n)]:
        path = root / entry
        st = _lstat(path)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            if owns(owned, entry):
                dirs.add(entry)
            continue
        if (fs.is_temporary(entry) or owns(owned, entry)) and not _is(path, protect):
            fs.remove_file(path)
    for d in sorted(dirs):
        inner = root / d
        for child in os.listdir(inner):
            path = inner / child
            st = _lstat(path)
            if st is None or stat.S_ISDIR(st.st_mode):
                continue
            if (fs.is_temporary(child) or owns(owned, child, inside=d)) and not _is(path, protect):
                fs.remove_file(path)
        with contextlib.suppress(OSError):  # something else is inside: it stays, and so does the directory
            inner.rmdir()


def legacy_names(root: Path) -> list[str] | None:
    """The names of a run directory written before marks existed, as far as they can be verified; None
    if ``root`` is not one. A valid ``state.json`` makes the controller's files adaprune's; a valid
    adaprune ``report.json`` the report's; a save's ``adaprune.json`` the save's. Anything else in it
    (a config, inputs) is treated as the user's."""
    names: list[str] = []
    if (root / STATE).is_file():
        from .state import ControllerState

        with contextlib.suppress(AdapruneError):  # a damaged state.json: not a run directory
            ControllerState.from_data(fs.read_json(root / STATE, what=STATE))
            names += RUN_FILES
    if _format(root / "report.json") == "adaprune-report":
        names += [*REPORT_FILES, "model.onnx"]
    if _format(root / "model" / META) == "adaprune":
        names += SAVE_FILES
    if names:  # a run directory: the command line's files too, where they are verifiably its own
        names += _legacy_cli(root)
    return names or None


def _legacy_cli(root: Path) -> list[str]:
    """``config.yaml`` as the command line wrote it (its run_dir is this directory, absolute),
    ``inputs.safetensors`` with the layout it writes, a valid ``sensitivity.json``."""
    names: list[str] = []
    config = root / "config.yaml"
    if config.is_file():
        import yaml

        try:
            raw = yaml.safe_load(fs.read_text(config, what="config.yaml", limit=1 << 20))
        except (AdapruneError, yaml.YAMLError, ValueError, RecursionError):
            raw = None
        if isinstance(raw, dict) and raw.get("run_dir") == str(root.resolve()):
            names.append("config.yaml")
    inputs = root / "inputs.safetensors"
    if inputs.is_file():
        from safetensors import SafetensorError, safe_open

        with contextlib.suppress(AdapruneError, SafetensorError, OSError):  # unreadable: the user's
            fs.check_regular(inputs)
            with safe_open(str(inputs), "pt") as f:
                if (f.metadata() or {}).get("kind") in ("tensor", "tuple", "dict"):
                    names.append("inputs.safetensors")
    sens = root / "sensitivity.json"
    if sens.is_file():
        with contextlib.suppress(AdapruneError):  # unreadable: the user's
            data = fs.read_json(sens, what="sensitivity.json")
            if isinstance(data, dict) and {"metric", "baseline", "rows"} <= set(data):
                names += SENSITIVITY_FILES
    return names


def _format(path: Path) -> object:
    if not path.is_file():
        return None
    try:
        data = fs.read_json(path, what=path.name)
    except AdapruneError:
        return None
    return data.get("format") if isinstance(data, dict) else None
