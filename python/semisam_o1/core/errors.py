"""User-facing errors.

Every failure a user can cause (a missing file, a corrupt NIfTI, a label that
does not match its image) is raised as :class:`InputError`. The CLI prints its
message as one line on stderr and exits with status 2; nothing half-written is
left behind because every output goes through :func:`semisam_o1.core.files.atomic_path`.
"""


class InputError(Exception):
    """A problem with the user's input: one line naming the file and the problem."""


class ReportedError(Exception):
    """A failure whose message the failing step has already printed (one line per
    problem, e.g. every unreadable case of ``encode``): the CLI exits with ``code``
    and prints nothing more, so the user reads each problem once."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = int(code)


class OutputError(InputError):
    """An output that could not be written (disk full, read-only file system, no permission):
    one line naming the file; a stage stops at once instead of trying its other cases."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's kill, a closed terminal), raised in the main thread where
    Ctrl-C raises :class:`KeyboardInterrupt`, so the same cleanup runs: temporaries removed by
    :func:`semisam_o1.core.files.atomic_path`, progress bars closed, finished outputs kept."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


#: stop signals received (their numbers) whose exception has not reached the stage yet
_PENDING_STOPS: list[int] = []


def stop_exception(signum: int) -> KeyboardInterrupt:
    """The exception a stop signal raises: :class:`KeyboardInterrupt` for SIGINT (Ctrl-C), else
    :class:`Terminated`."""
    import signal

    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def note_stop(signum: int) -> None:
    """Remember a stop signal, so that :func:`raise_if_stopped` raises it at the next check even when
    the exception raised in the signal handler was lost (raised inside a finaliser, ``__del__``,
    Python prints it as "Exception ignored" and goes on)."""
    _PENDING_STOPS.append(int(signum))


def raise_if_stopped() -> None:
    """Raise :func:`stop_exception` of the first stop signal received, if any (the per-case loops
    check it through :func:`semisam_o1.core.progress.progress`)."""
    if _PENDING_STOPS:
        raise stop_exception(_PENDING_STOPS[0])


def clear_stops() -> None:
    """Forget the stop signals received (a new command in the same process starts clean)."""
    _PENDING_STOPS.clear()
