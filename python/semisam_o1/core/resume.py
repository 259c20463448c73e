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
finished stage again returns at once.
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

    def _write(self, finished: bool, summary: dict | None) -> None:
        write_json(self.path, {"stage": self.stage, "version": __version__, "signature": self.signature,
                               "command": self.command, "finished": finished,
                               "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "signed": self.signed,
                               **({"summary": summary} if summary is not None else {})})

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
               overwrite: bool = False) -> StageRecord:
    """The record of ``stage`` writing into ``folder`` with ``settings`` (a settings
    dataclass) computed from ``inputs`` (JSON-ready digests of what it reads).

    Nothing is written here (see :meth:`StageRecord.start`).

    Raises:
        InputError: ``folder`` is not writable or is a file; or it holds this or another
            stage's output made from other settings or inputs and ``overwrite`` is False
            (the line names the keys that differ).
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
            changed = changed_keys(previous.get("signed") or {}, signed) or ["signature"]
            raise InputError(f"{folder}: was written by `{stage}` with other settings or inputs "
                             f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ); "
                             "use --overwrite to redo it, or another folder")
    record.previous = previous if not overwrite else None
    record._reuse = bool(record.previous and record.previous.get("signature") == record.signature)
    return record


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
