"""How far the run can trust its registration referee, and the criterion it falls back on.

The round rule (:mod:`semisam_o1.pipeline.rounds`) compares each round's pool labels with the
template's label registered to every pool case. Registration fails on some cohorts (thick
slices, other fields of view, anatomy that moves between cases): then the referee's verdicts are
noise. Before the first round the run therefore checks, per pool case, whether the registration
carried the template's label better than not registering at all:

    reliable(case) = Dice(warped template label, round-0 label) > Dice(pasted template label, round-0 label)

where the *pasted* label is the template's label placed at the centre of the case's box, in
millimetres (:func:`semisam_o1.methods.paste.paste_at_centre`), and Dice is the mean over the
foreground classes. The round-0 labels come from the feature vote, not from the registration,
so they are an independent witness; a registration that cannot beat the identity placement
against it has learnt nothing about where the structure is. The round rule then uses only the
reliable cases. The referee as a whole is *reliable* when at least half of the pool cases (and at
least :data:`MIN_RELIABLE_CASES`) are.

When it is not, the run falls back on the one real label there is: every round's network is
trained WITHOUT the template's label (the template is held out) and scored on the template
(Dice of its prediction of the template image with the template's label). That is one case, so it
is weak evidence, and the run says so (``report.json`` ``chosen.criterion``, the terminal line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from semisam_o1.core.files import write_json
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.images import read_label
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.methods.paste import paste_at_centre

RELIABILITY_JSON = "reliability.json"
#: the position check's record beside it (``run --position auto``, written by :mod:`semisam_o1.pipeline.run`)
POSITION_JSON = "position.json"
#: fewest reliable cases for a paired comparison with a standard error (two differences)
MIN_RELIABLE_CASES = 2
RULE = ("a pool case's registered template label is reliable when it agrees with the case's round-0 label "
        "(mean foreground Dice) better than the template label pasted at the box centre does; the referee is "
        f"reliable when at least half of the pool cases, and at least {MIN_RELIABLE_CASES}, are")


def reliability(dataset, template: str, cases: Sequence[str], referee: Path, round0: Path) -> dict:
    """Per-case and cohort reliability of the registration referee (the rule in the module docstring).

    Args:
        dataset: the run's :class:`semisam_o1.data.dataset.Dataset` (label map, template label).
        template: the template's case id.
        cases: the pool cases.
        referee: folder of the warped template labels (``<case>.nii.gz``).
        round0: folder of the round-0 pseudo-labels.

    Returns:
        ``{"rule", "cases": {case: {"registered", "pasted", "reliable"}}, "reliable_cases",
        "pool_cases", "reliable"}`` (Dice values are floats in [0, 1]).

    Raises:
        InputError: a missing or unreadable label file, or grids that differ.
    """
    lm = dataset.label_map
    t_label = dataset.read_label(template)
    per_case = {}
    for case in cases:
        own = read_label(find_case_file(round0, case, what="round-0 label"), lm)
        warped = read_label(find_case_file(referee, case, what="referee label"), lm, reference=own)
        pasted = paste_at_centre(t_label.array, own.shape, t_label.spacing, own.spacing)
        registered_dice = float(mean_dice(warped.array, own.array, lm.foreground))
        pasted_dice = float(mean_dice(pasted, own.array, lm.foreground))
        per_case[case] = {"registered": round(registered_dice, 6), "pasted": round(pasted_dice, 6),
                          "reliable": registered_dice > pasted_dice}
    n_ok = sum(v["reliable"] for v in per_case.values())
    return {"rule": RULE, "cases": per_case, "reliable_cases": n_ok, "pool_cases": len(per_case),
            "reliable": n_ok >= MIN_RELIABLE_CASES and 2 * n_ok >= len(per_case)}


def check_referee(dataset, template: str, cases: Sequence[str], referee: Path, round0: Path,
                  again: bool = False) -> dict:
    """:func:`reliability`, recorded as ``reliability.json`` in the parent of ``referee`` (``WORK/referee``,
    where :func:`read_reliability` looks; the warped labels themselves sit in a subfolder named by the
    registration's settings), with ``labels``: that subfolder's name. The record is read back when it
    is there and judged the same labels, unless ``again`` (the round-0 labels changed)."""
    referee = Path(referee)
    known = None if again else read_reliability(referee.parent)
    if known is not None and known.get("labels") == referee.name:
        return known
    out = reliability(dataset, template, cases, referee, round0) | {"labels": referee.name}
    write_json(referee.parent / RELIABILITY_JSON, out)
    return out


def read_reliability(referee: Path | None) -> dict | None:
    """``referee/reliability.json`` (the one reader of that record), or None when there is no
    referee folder or no readable record (a referee checked before this rule existed)."""
    if referee is None:
        return None
    try:
        return json.loads((Path(referee) / RELIABILITY_JSON).read_text())
    except (OSError, ValueError):
        return None


def reliable_cases(referee: Path | None) -> set[str] | None:
    """The pool cases whose referee label is reliable (``reliability.json``), or None when the run
    has no reliability record (every case counts)."""
    info = read_reliability(referee)
    return None if info is None else {c for c, v in info["cases"].items() if v["reliable"]}


def summary_line(info: dict) -> str:
    """One terminal line: how many pool cases the referee can judge, and what the run does."""
    n, total = info["reliable_cases"], info["pool_cases"]
    if info["reliable"]:
        return (f"referee: the registration beats the pasted template on {n} of {total} pool cases; "
                f"the round rule uses those {n}")
    return (f"referee: the registration beats the pasted template on only {n} of {total} pool cases, so it "
            f"cannot judge the rounds; they train without the template's label and are scored on it "
            f"instead (one case: weak evidence)")
