"""The ``semisam-o1`` command line.

Each subcommand lives in its own module (:mod:`semisam_o1.stages`, :mod:`semisam_o1.pipeline.run`),
which defines

* ``SETTINGS``: its settings dataclass (:mod:`semisam_o1.core.settings`); the subcommand's
  options are generated from its fields;
* ``STAGE``: the stage function, called with the settings object;

and imports heavy dependencies (torch, onnxruntime) inside functions so that
``semisam-o1 --help`` stays fast. This module only parses and reports errors: the
stage functions are the Python API (TotalSegmentator's and nnU-Net's split of a thin
entry point over plain functions). A module that raises
:class:`semisam_o1.core.errors.InputError` gets its message printed as one line and
exit status 2; :class:`semisam_o1.core.errors.ReportedError` (a step that already printed
its own lines) only sets the exit status. Ctrl-C exits 130; SIGTERM and SIGHUP are raised as
:class:`semisam_o1.core.errors.Terminated` (a ``KeyboardInterrupt``) so the same cleanup runs, and
exit 128 + the signal's number (143, 129), as a shell reports a process killed by it.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from types import ModuleType

from semisam_o1.core.errors import (
    InputError,
    ReportedError,
    Terminated,
    clear_stops,
    note_stop,
    raise_if_stopped,
    stop_exception,
)
from semisam_o1.core.files import WRITE_ERRNOS, write_error_message
from semisam_o1.core.settings import add_options, from_namespace
from semisam_o1.core.version import __version__
from semisam_o1.pipeline import run as run_stage
from semisam_o1.stages import encode, evaluate, plan, predict, propagate, refine, train

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "plan": (plan, "fingerprint a dataset and plan the network from it (plan.json)"),
    "encode": (encode, "run the SAM image encoder over a cohort into a feature store"),
    "propagate": (propagate, "round-0 pseudo-labels from the template's class prototypes"),
    "train": (train, "train a MONAI 3D UNet from scratch on pseudo-labels"),
    "predict": (predict, "sliding-window prediction with voxel-wise softmax entropy"),
    "refine": (refine, "relabel uncertain voxels by kNN vote in the encoder's feature space"),
    "evaluate": (evaluate, "Dice, Jaccard, HD95 and ASD per class"),
    "run": (run_stage, "the whole SemiSAM-O1 loop: encode, propagate, rounds, evaluate, report"),
}

# Signals handled like Ctrl-C (SIGINT): the stage stops, its cleanup runs, finished outputs stay.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
RESUME_HINT = "finished outputs are kept, re-run to resume"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where there is one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semisam-o1",
        description=(
            "Segment a medical image cohort from one annotated template "
            "(SemiSAM-O1, arXiv 2604.24109). Run `semisam-o1 COMMAND --help` for each stage."
        ),
    )
    parser.add_argument("--version", action="version", version=f"semisam-o1 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0],
                           formatter_class=_HelpFormatter)
        add_options(p, module.SETTINGS)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    module = args._module
    try:
        with _signals_as_interrupts():
            module.STAGE(from_namespace(module.SETTINGS, args))
            raise_if_stopped()  # a signal whose exception a finaliser swallowed after the last check
        return 0
    except InputError as exc:
        print(f"semisam-o1 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ReportedError as exc:  # its message is already on stderr
        return exc.code
    except OSError as exc:  # an output that could not be written outside atomic_path (disk full, read-only)
        if exc.errno not in WRITE_ERRNOS:
            raise
        print(f"semisam-o1 {args.command}: error: {write_error_message(exc.filename or 'an output', exc)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        _close_progress_bars()  # else an open bar redraws itself at exit, after this line
        print(f"semisam-o1 {args.command}: {_stop_reason(exc)}; {RESUME_HINT}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else 130


def _stop_reason(exc: KeyboardInterrupt) -> str:
    """``interrupted`` (Ctrl-C) or ``terminated (SIGTERM)``."""
    if isinstance(exc, Terminated):
        return f"terminated ({signal.Signals(exc.signum).name})"
    return "interrupted"


def _in_finaliser(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` (an exception raised there is printed as
    "Exception ignored" and lost)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_stop_signal(signum, frame) -> None:
    """Ctrl-C, SIGTERM, SIGHUP: raise :func:`~semisam_o1.core.errors.stop_exception` where the
    main thread is, or, inside a finaliser (which would swallow it), only note it: the stage's next
    per-case step raises it (:func:`semisam_o1.core.errors.raise_if_stopped`)."""
    if signum != signal.SIGINT:
        for sig in STOP_SIGNALS:  # once: a second signal during the cleanup must not cut it short
            signal.signal(sig, signal.SIG_IGN)
    note_stop(signum)
    if not _in_finaliser(frame):
        raise stop_exception(signum)


@contextlib.contextmanager
def _signals_as_interrupts():
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP :class:`Terminated`, in the main thread
    while the stage runs (:func:`_on_stop_signal`); the previous handlers are back afterwards
    (``main`` may be called in-process, e.g. by tests)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear_stops()
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # e.g. a job started with `&`: it stays so
    previous = {sig: signal.signal(sig, _on_stop_signal)
                for sig in ((() if ignored else (signal.SIGINT,)) + STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: a handler set outside Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        clear_stops()  # a stage called in this process later (an API user, a test) starts clean


def _close_progress_bars() -> None:
    """Close the tqdm bars an interrupt left open (a stage's loop left by the exception)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
