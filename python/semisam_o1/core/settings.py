"""Stage settings: each option defined once, as a dataclass field.

Every stage has one settings class (``EncodeSettings``, ``TrainSettings``, ...):
a keyword-only dataclass whose fields carry their default, help text and command
line spelling. From it come

* the stage's argparse options (:func:`add_options`, used by :mod:`semisam_o1.cli`),
* the settings object from parsed arguments (:func:`from_namespace`),
* the command line that reproduces the stage alone (:func:`command_line`), which
  every stage records beside its outputs,
* the checks of the values (the class's ``__post_init__``, so the Python API and
  the command line refuse the same things with the same one-line ``InputError``).

``run`` builds the stages' settings objects and calls the stage functions
directly; nothing is turned into argv and parsed again.

Shared pieces, defined here once and inherited by the stage classes:
:class:`CaseOptions` (``-i/--input``, ``--cases``, ``--split``, ``--subset``) and
:class:`ComputeOptions` (``--device {auto,cpu,cuda}``, ``--threads``, ``--quiet``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any, Sequence

from semisam_o1.core.errors import InputError

REQUIRED = dataclasses.MISSING
DEVICES = ("auto", "cpu", "cuda")


def option(default: Any = REQUIRED, help: str = "", *, flags: Sequence[str] | None = None,
           type: Any = None, choices: Sequence[Any] | None = None, metavar: str | None = None,
           nargs: str | None = None, cli: bool = True, neutral: bool = False) -> Any:
    """A settings field: its default (``REQUIRED`` for none) and its command line.

    Args:
        default: the default value (immutable: tuples, not lists), or ``REQUIRED``.
        help: the ``--help`` text (the default is appended by the CLI's formatter).
        flags: option strings (default: ``--field-name``).
        type: argparse type for the values (default: the default's type; ``str`` when
            the default is None and nothing is given).
        choices, metavar, nargs: as in argparse (``nargs="+"`` fields hold tuples).
        cli: False for fields that only the Python API sets.
        neutral: the field does not change the stage's results (threads, progress bars,
            output paths): it is left out of the stage's resume signature
            (:mod:`semisam_o1.core.resume`).

    Returns:
        a ``dataclasses.field``.
    """
    meta = dict(help=help, flags=tuple(flags) if flags else None, type=type,
                choices=tuple(choices) if choices is not None else None,
                metavar=metavar, nargs=nargs, cli=cli, neutral=neutral)
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def redo_changed_option() -> Any:
    """The ``redo_changed`` field of a stage that ``run`` calls: no command-line flag, not signed.
    True: a folder written with the same settings from other inputs is redone, only for the cases
    whose inputs changed where the stage can tell, instead of refused with a request for
    ``--overwrite`` (:func:`semisam_o1.core.resume.open_stage`)."""
    return option(False, "(run) redo the work whose inputs changed instead of refusing the folder", cli=False,
                  neutral=True)


_SAME = object()


def forwarded(cls, name: str, default: Any = _SAME, *, help: str | None = None,
              flags: Sequence[str] | None = None, choices: Sequence[Any] | None = None) -> Any:
    """A field that forwards option ``name`` of the stage settings class ``cls`` (``run`` passing an
    option on to a stage): the stage's default, help, type, choices and metavar, unless given here,
    so that the option is defined once.

    Args:
        cls: the stage's settings class (``TrainSettings``, ...).
        name: the stage's field name.
        default, help, flags, choices: overrides (``flags``: when the stage's name is ambiguous in
            ``run``, as refine's ``--k`` beside propagate's, the stage's name prefixes it).

    Raises:
        KeyError: ``cls`` has no field ``name``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    f = fields[name]
    meta = f.metadata
    if default is _SAME:
        default = f.default
    return option(default, meta["help"] if help is None else help, flags=flags or meta["flags"], type=meta["type"],
                  choices=meta["choices"] if choices is None else choices, metavar=meta["metavar"],
                  nargs=meta["nargs"], cli=meta["cli"], neutral=meta["neutral"])


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def _cli_fields(cls) -> list[dataclasses.Field]:
    """The command-line fields of ``cls``: the stage's own and the cases first, then --engine /
    --ray-address / --workers (:mod:`semisam_o1.core.engine`), --device / --threads / --quiet last
    (the order of ``--help``)."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]
    late = ("engine", "ray_address", "workers", "device", "threads", "quiet")
    return sorted(fields, key=lambda f: late.index(f.name) + 1 if f.name in late else 0)


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add one argparse option per CLI field of the settings class ``cls``.

    Options left unset on the command line take the field's default; ``bool``
    fields become a ``--name`` switch (default False) or ``--name/--no-name`` (default True).
    """
    for f in _cli_fields(cls):
        m = f.metadata
        kwargs: dict[str, Any] = dict(dest=f.name, help=m["help"])
        required = f.default is REQUIRED
        default = None if required else f.default
        if isinstance(default, bool) and m["type"] is None:
            # False: a --name switch; True: --name / --no-name
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
            kwargs["default"] = default
        else:
            typ = m["type"] or (type(default) if default is not None and not isinstance(default, tuple) else str)
            if isinstance(default, tuple) and m["type"] is None and default:
                typ = type(default[0])
            kwargs.update(type=typ, metavar=m["metavar"])
            if m["choices"] is not None:
                kwargs["choices"] = m["choices"]
            if m["nargs"]:
                kwargs["nargs"] = m["nargs"]
            if required:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        parser.add_argument(*_flags(f), **kwargs)


def from_namespace(cls, ns: argparse.Namespace):
    """The settings object of class ``cls`` from parsed arguments (checks run)."""
    values = {}
    for f in _cli_fields(cls):
        v = getattr(ns, f.name)
        if f.metadata.get("nargs") and v is not None:
            v = tuple(v)
        values[f.name] = v
    return cls(**values)


def _argv_value(v: Any) -> list[str]:
    if isinstance(v, (tuple, list)):
        return [str(x) for x in v]
    return [os.fspath(v) if isinstance(v, Path) else str(v)]


def to_argv(settings) -> list[str]:
    """The options that reproduce ``settings`` on the command line: required ones and
    every one that differs from its default."""
    argv: list[str] = []
    for f in _cli_fields(type(settings)):
        v = getattr(settings, f.name)
        required = f.default is REQUIRED
        if not required and v == f.default:
            continue
        flag = _flags(f)[-1]
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
            continue
        if v is None:
            continue
        argv += [flag, *_argv_value(v)]
    return argv


def command_line(stage: str, settings) -> str:
    """``semisam-o1 STAGE ...``: the shell command (quoted with :func:`shlex.join`)
    that runs this stage alone with these settings."""
    return shlex.join(["semisam-o1", stage, *to_argv(settings)])


def as_dict(settings) -> dict:
    """The settings as a JSON-ready dict (paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if isinstance(v, Path):
            v = os.fspath(v)
        elif isinstance(v, tuple):
            v = [os.fspath(x) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out


# --------------------------------------------------------------------------- value checks


def check_range(name: str, value, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise InputError ``--name VALUE: must be ...`` unless ``lo <= value <= hi``
    (``lo_open`` / ``hi_open``: strict). None bounds are not checked."""
    if value is None:
        return
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise InputError(f"--{name.replace('_', '-')} {value}: must be in {span}")


# --------------------------------------------------------------------------- shared option groups


class Checked:
    """Root of the settings classes: ``__post_init__`` chains through every base, so
    each option group checks its own fields (call ``super().__post_init__()``)."""

    def __post_init__(self):
        pass


@dataclasses.dataclass(kw_only=True)
class CaseOptions(Checked):
    """Which dataset and which of its cases a stage works on."""

    input: Path = option(help="MSD / nnU-Net dataset folder (dataset.json, imagesTr/, labelsTr/)",
                         flags=("-i", "--input"), type=Path, metavar="DATASET")
    cases: tuple[str, ...] | None = option(None, "case ids to work on (default: the --subset of --split, "
                                           "or every case)", nargs="+", metavar="ID")
    split: Path | None = option(None, "split JSON with 'template', 'unlabeled' and 'test'", type=Path,
                                metavar="FILE")
    subset: str = option("template,unlabeled", "comma-separated subsets of --split to work on")

    def __post_init__(self):
        super().__post_init__()
        self.input = Path(self.input)
        if self.split is not None:
            self.split = Path(self.split)
        if self.cases is not None:
            self.cases = tuple(self.cases)


def select_cases(dataset, options: CaseOptions) -> list[str]:
    """The case ids of ``dataset`` (a :class:`semisam_o1.data.dataset.Dataset`) chosen by
    ``options``: its ``cases``, else the ``subset`` of its ``split``, else every case.

    Raises:
        InputError: an unknown case id, or a subset the split lacks.
    """
    return dataset.select(cases=options.cases, split=options.split,
                          subset=options.subset if options.split is not None else None)


@dataclasses.dataclass(kw_only=True)
class ComputeOptions(Checked):
    """Where and how a stage computes."""

    device: str = option("auto", "auto: CUDA when a GPU and the CUDA build are there, else the CPU",
                         choices=DEVICES)
    threads: int | None = option(None, "CPU threads (default: all cores)", type=int, metavar="N", neutral=True)
    quiet: bool = option(False, "no progress bars", neutral=True)

    def __post_init__(self):
        super().__post_init__()
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device}: choose one of {', '.join(DEVICES)}")
        check_range("threads", self.threads, 1)
