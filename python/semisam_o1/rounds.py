"""Which round's labels and model a run hands back.

:func:`choose_round` is the run's label-free rule: it reads only what the run itself
produced (the rounds' pseudo-labels and predictions of the pool), never a real label
of the pool or the test set.
"""

from __future__ import annotations

from pathlib import Path


def choose_round(work: Path, rounds: int) -> tuple[int, str]:
    """The round whose pool labels and model become ``WORK/final``, and why.

    Args:
        work: the run's work folder.
        rounds: the number of rounds the run has finished (>= 1).

    Returns:
        ``(round, reason)``: with the rule in place, the round it keeps; here the last round.
    """
    return int(rounds), "the last round"
