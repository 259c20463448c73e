"""User-facing errors.

Every failure a user can cause (a missing file, a corrupt NIfTI, a label that
does not match its image) is raised as :class:`InputError`. The CLI prints its
message as one line on stderr and exits with status 2; nothing half-written is
left behind because every output goes through :func:`semisam_o1.io.atomic_path`.
"""


class InputError(Exception):
    """A problem with the user's input: one line naming the file and the problem."""
