"""Case selection: which pseudo-labelled volumes the later rounds train on.

After round 1 (a UNet trained from scratch on every pool case's round-0
pseudo-labels), each pool case is scored by the *agreement* between the labels
the network was trained on and what the network itself predicts for that case:

    agreement(case) = mean over foreground classes c of Dice(L_c, P_c)

with L the case's round-0 pseudo-label and P the round-1 prediction (label
volumes of the same grid). A case whose propagated label the network cannot
reproduce from the image is one whose label is likely wrong. The rounds after
the first train on the template plus the ``fraction`` of the pool with the
highest agreement (ties: the earlier case in the pool's order); every pool case
is still predicted, so every case keeps a pseudo-label.

Why: agreement correlates with the real Dice of a case's round-0 label more
strongly than the network's mean entropy does, the cases with the highest
agreement have better round-0 labels than the whole pool, and a UNet trained on
them scores higher on the test set than one trained on all (docs/experiments.md,
"Case selection"; ``benchmarks/results/quality.json``, key ``case_selection``).
This is the case-level counterpart of the authors' ``volume`` refinement (which
ranks volumes by mean entropy); it reads no real label.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import write_json
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_label
from semisam_o1.methods.metrics import mean_dice

SELECTION_JSON = "selection.json"


def label_agreement(dataset: Dataset, a: str | Path, b: str | Path, cases: Sequence[str],
                    what: tuple[str, str] = ("label", "label")) -> dict[str, float]:
    """Per case, the mean foreground Dice (:func:`semisam_o1.methods.metrics.mean_dice`) of the label
    files ``a/<case>`` and ``b/<case>`` (same grid).

    Returns:
        ``{case: Dice}`` in the order of ``cases`` (``what`` names the two kinds of file in errors).

    Raises:
        InputError: a missing or unreadable label file (naming it), or grids that differ.
    """
    lm = dataset.label_map
    out = {}
    for case in cases:
        la = read_label(find_case_file(a, case, what=what[0]), lm)
        lb = read_label(find_case_file(b, case, what=what[1]), lm, reference=la)
        out[case] = float(mean_dice(la.array, lb.array, lm.foreground))
    return out


def select_by_agreement(dataset: Dataset, labels: str | Path, pred: str | Path, cases: Sequence[str],
                        fraction: float, output: str | Path | None = None) -> dict:
    """Rank ``cases`` by the agreement (:func:`semisam_o1.methods.metrics.mean_dice` over the foreground
    classes) of ``labels/<case>`` (what a round trained on) and ``pred/<case>`` (what it predicts)
    and keep the top ``fraction``.

    Args:
        dataset: the dataset (its label map gives the foreground classes).
        labels, pred: folders of label NIfTIs (``<case>.nii.gz``), same grid per case.
        cases: the pool case ids, in the pool's order (ties keep this order).
        fraction: 0 < fraction <= 1; ``ceil(fraction * len(cases))`` cases are kept
            (at least one).
        output: optional JSON path to write the ranking to (atomically).

    Returns:
        dict with ``selected`` (case ids, best first), ``agreement`` ({case: float}),
        ``fraction``, ``n_selected``, ``n_cases``, ``labels``, ``pred``.

    Raises:
        InputError: fraction outside (0, 1], no cases, or a missing / unreadable label
        file (naming it) or one whose grid differs from its prediction's.
    """
    if not (0.0 < float(fraction) <= 1.0):
        raise InputError(f"--select {fraction}: must be in (0, 1]")
    if not cases:
        raise InputError("case selection: no pool cases")
    agreement = label_agreement(dataset, labels, pred, cases, what=("pseudo-label", "prediction"))
    order = sorted(range(len(cases)), key=lambda i: (-agreement[cases[i]], i))
    n_keep = max(1, math.ceil(float(fraction) * len(cases) - 1e-9))
    selected = [cases[i] for i in order[:n_keep]]
    info = {"fraction": float(fraction), "n_cases": len(cases), "n_selected": n_keep,
            "criterion": "mean foreground Dice between the labels the round trained on and its prediction",
            "labels": str(labels), "pred": str(pred), "selected": selected,
            "agreement": {c: round(agreement[c], 6) for c in cases}}
    if output is not None:
        write_json(output, info)
    return info
