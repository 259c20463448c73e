"""One resume mechanism for every stage: a signed record in each output folder.

A stage's output folder holds ``stage.json``: the stage's name, the signature of
what it computes from (its result-affecting settings and digests of its inputs),
the command that reproduces it alone, and whether it finished. On a re-run:

* the same signature and ``finished``: the stage is skipped as a whole;
* the same signature, not finished: the stage resumes, keeping the per-case files
  already written (every file is written atomically, so an existing file is whole);
* another signature: refused with one line naming what changed, unless
  ``--overwrite``, which redoes every case.

``run`` relies on the same records (it has no markers of its own): calling a
finished stage again returns at once. Inside ``run`` (``redo_changed``), a folder
whose settings are the same but whose inputs changed (a case re-encoded after its
features were deleted, hence a new pseudo-label, hence a new model, ...) is redone
instead of refused: only the cases whose own inputs changed when the stage has
per-case inputs (``per_case``) and nothing else changed, else every case. The
outputs to redo are removed before the record is rewritten
(:meth:`StageRecord.drop_outputs`), so an interrupted redo never keeps a stale file,
and the record says what was redone (``redone``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import sweep_temporaries, write_json
from semisam_o1.core.settings import as_dict, command_line
from semisam_o1.core.version import __version__

RECORD = "stage.json"


def digest(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 (first ``length`` characters) of ``obj`` as canonical JSON
    (sorted keys; paths and other objects as ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def result_settings(settings) -> dict:
    """The fields of a settings dataclass that change a stage's results: all but those
    declared ``neutral`` (threads, progress bars, the output path, ``--overwrite``). Paths are
    resolved (``Path.resolve``), so ``--images ../x/imgs`` and its absolute path are one setting."""

    values = as_dict(settings)
    return {f.name: _resolved(getattr(settings, f.name), values[f.name])
            for f in dataclasses.fields(settings) if not f.metadata.get("neutral", False)}


def _resolved(value, plain):
    """``plain`` (the JSON form of ``value``) with each Path in ``value`` resolved."""
    if isinstance(value, Path):
        return os.fspath(value.resolve())
    if isinstance(value, tuple) and any(isinstance(v, Path) for v in value):
        return [os.fspath(v.resolve()) if isinstance(v, Path) else v for v in value]
    return plain


def changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between the nested dicts ``a`` and ``b`` (sorted)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check, without creating anything, that ``path`` can become or is a writable folder.

    Raises:
        InputError: ``path`` is an existing file, or the nearest existing folder above it
            is not writable (one line naming it).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: the {what} is an existing file, not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{path}: cannot create the {what}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write the {what}: {probe} is not writable")
    return path


@dataclasses.dataclass
class StageRecord:
    """The signed record of one stage's output folder. Obtain with :func:`open_stage`."""

    folder: Path
    stage: str
    signed: dict
    signature: str
    command: str
    previous: dict | None
    #: set by :func:`open_stage` with ``redo_changed``: the signed keys that changed, and the cases to
    #: redo (None: every case); ``changed`` is empty when nothing is redone for changed inputs
    changed: list = dataclasses.field(default_factory=list)
    redo: frozenset | None = None

    @property
    def path(self) -> Path:
        return self.folder / RECORD

    @property
    def finished(self) -> bool:
        """The folder already holds this stage's finished output, for this signature."""
        return bool(self.previous and self.previous.get("signature") == self.signature
                    and self.previous.get("finished"))

    @property
    def reuse(self) -> bool:
        """Per-case files that were in the folder when it was opened were written with this
        signature (unchanged by :meth:`start` and :meth:`finish`)."""
        return self._reuse

    def __post_init__(self):
        self._reuse = bool(self.previous and self.previous.get("signature") == self.signature)
        self._dropped = None  # the cases drop_outputs removed (None: not called)

    @property
    def redoing(self) -> bool:
        """This call redoes work because the stage's inputs changed (``redo_changed``)."""
        return bool(self.changed)

    def redo_cases(self, cases) -> list:
        """Of ``cases`` (those the stage writes), those whose finished outputs this call redoes
        because their inputs changed: all of them when the stage has no per-case inputs, when more
        than those changed, or when the entry of a case it does not write changed (an input every
        case is computed from: propagate's template features)."""
        if not self.changed:
            return []
        cases = list(cases)
        if self.redo is None or not self.redo <= set(cases):
            return cases
        return [c for c in cases if c in self.redo]

    def drop_outputs(self, files, cases) -> list:
        """Remove the output files (``files(case)``: paths) of :meth:`redo_cases`, before
        :meth:`start`: once the record carries the new signature an existing file counts as
        finished. Returns the cases dropped."""
        redo = self.redo_cases(cases)
        for case in redo:
            for path in files(case):
                Path(path).unlink(missing_ok=True)
        self._dropped = redo
        return redo

    def _write(self, finished: bool, summary: dict | None) -> None:
        dropped = self._dropped
        redone = ({"redone": {"cases": "all" if dropped is None else sorted(dropped), "changed": self.changed}}
                  if self.changed else {})
        write_json(self.path, {"stage": self.stage, "version": __version__, "signature": self.signature,
                               "command": self.command, "finished": finished,
                               "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "signed": self.signed,
                               **redone, **({"summary": summary} if summary is not None else {})})

    def start(self) -> None:
        """Create the folder and write the record (not finished). Call it once the
        inputs are checked, before the first output file. Temporaries that a killed writer left
        in the folder are removed (:func:`semisam_o1.core.files.sweep_temporaries`)."""

        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(self.folder)
        self._write(False, None)
        self.previous = {"signature": self.signature, "finished": False}

    def finish(self, summary: dict | None = None) -> None:
        """Mark the folder finished, with an optional JSON-ready ``summary``."""
        self._write(True, summary)
        self.previous = {"signature": self.signature, "finished": True, "summary": summary}

    def summary(self) -> dict | None:
        """The summary a finished earlier run recorded (None if none)."""
        return (self.previous or {}).get("summary")


def read_record(folder: str | os.PathLike) -> dict | None:
    """The record of ``folder`` (None if it has none).

    Raises:
        InputError: the record exists but cannot be parsed.
    """
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable stage record ({exc}); delete it or use --overwrite") from None


def open_stage(folder: str | os.PathLike, stage: str, settings, *, inputs: dict | None = None,
               overwrite: bool = False, redo_changed: bool = False, per_case: str | None = None) -> StageRecord:
    """The record of ``stage`` writing into ``folder`` with ``settings`` (a settings
    dataclass) computed from ``inputs`` (JSON-ready digests of what it reads).

    Nothing is written here (see :meth:`StageRecord.start`).

    Args:
        redo_changed: (``run``) a folder written with the same settings from other inputs (or for
            other cases: ``run`` derives them, e.g. the case selection from the round-0 labels) is
            redone instead of refused: ``record.changed`` names the changed keys, ``record.redo``
            the cases to redo (None: every case); the stage removes their outputs with
            :meth:`StageRecord.drop_outputs` before :meth:`StageRecord.start`.
        per_case: the key of ``inputs`` holding ``{case: digest}``: when only the entries of some of the
            cases the stage writes changed, only those cases are redone (the others' files are kept;
            see :meth:`StageRecord.redo_cases`).

    Raises:
        InputError: ``folder`` is not writable or is a file; or it holds this or another
            stage's output made from other settings or inputs and ``overwrite`` is False
            (the line names the keys that differ); with ``redo_changed``, only other settings than
            the cases.
    """

    folder = check_output_dir(folder)
    signed = {"stage": stage, "settings": result_settings(settings), "inputs": inputs or {}}
    record = StageRecord(folder=folder, stage=stage, signed=signed, signature=digest(signed),
                         command=command_line(stage, settings), previous=None)
    previous = read_record(folder)
    if previous is not None and not overwrite:
        if previous.get("stage") != stage:
            raise InputError(f"{folder}: holds the output of `{previous.get('stage')}`, not `{stage}`; "
                             "use another folder")
        if previous.get("signature") != record.signature:
            before = previous.get("signed") or {}
            changed = changed_keys(before, _as_json(signed)) or ["signature"]
            if not (redo_changed and all(k.startswith("inputs.") or k == "settings.cases" for k in changed)):
                raise InputError(f"{folder}: was written by `{stage}` with other settings or inputs "
                                 f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ); "
                                 "use --overwrite to redo it, or another folder")
            record.changed, record.redo = changed, _changed_cases(before.get("inputs") or {},
                                                                  _as_json(signed)["inputs"], per_case)
    record.previous = previous if not overwrite else None
    record._reuse = bool(record.previous and (record.previous.get("signature") == record.signature
                                              or (record.changed and record.redo is not None)))
    return record


def _as_json(obj):
    """``obj`` as it reads back from a record (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(obj, default=str))


def _changed_cases(before: dict, after: dict, per_case: str | None) -> frozenset | None:
    """The cases whose entry of ``inputs[per_case]`` differs between two records' inputs, when
    nothing else in the inputs differs; None (every case) otherwise."""
    if per_case is None:
        return None
    if {k: v for k, v in before.items() if k != per_case} != {k: v for k, v in after.items() if k != per_case}:
        return None
    b, a = before.get(per_case) or {}, after.get(per_case) or {}
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    return frozenset(c for c in set(a) | set(b) if a.get(c) != b.get(c))


class FolderLock:
    """An exclusive lock on a work folder (``.lock``, ``fcntl.flock``), held while a run works
    in it, so that a second run started on the same folder is refused instead of racing the first.
    The lock file records the holder's process id; the kernel releases the lock when the holder
    exits, even when it is killed.

    Raises (on ``__enter__``):
        InputError: another process holds the lock (the line names its process id).
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._fh = None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise InputError(f"{self.path.parent}: already in use by another run (process {holder}); wait for it "
                             "to finish or use another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_finished(folder: str | os.PathLike, stage: str, settings, *, inputs: dict | None = None,
                   summary: dict | None = None) -> StageRecord:
    """Write a finished record for a stage that checks its own outputs case by case (``encode``,
    whose store verifies every entry it skips, so that a store may grow by new cases): no refusal
    of an earlier record, the same record format as :func:`open_stage`'s."""

    signed = {"stage": stage, "settings": result_settings(settings), "inputs": inputs or {}}
    record = StageRecord(folder=Path(folder), stage=stage, signed=signed, signature=digest(signed),
                         command=command_line(stage, settings), previous=None)
    record.folder.mkdir(parents=True, exist_ok=True)
    record.finish(summary)
    return record
