"""Which round's labels and model a run hands back, and when the rounds stop.

The rule reads only what the run itself produced, never a real label of the pool or the test
set. Each round's pool labels are compared with an *independent referee*: the template's label
warped to every pool case by deformable registration (:mod:`semisam_o1.methods.registration`, ANTs SyN).
Registration errs where the image alignment fails; the feature vote (round 0) and the networks
trained on its labels err where the features mislead, so the referee's errors are roughly
independent of both, and the set of labels that agrees better with it is, in expectation, the
better one (the "three-cornered hat" argument: with independent errors, ``err(A) - err(B) =
d(A, R) - d(B, R)`` for disagreements ``d = 1 - Dice`` with the referee ``R``, whatever R's own
error).

A round is *admissible* when its pool labels agree with the referee at least as well as round
0's (the mean over the pool of the per-case Dice). The labels handed back are the last
admissible round's that is not worse than an earlier kept round by more than one standard error
of the paired per-case differences, so they are never worse than the propagated ones by this
measure. The rounds stop early
at the first round that is not admissible, or that does not improve on the round before it by
more than one standard error of the paired per-case differences (no progress beyond the cases'
noise: a further round trained on nearly the same labels will not help). The model handed back
is the labels round's network or, when round 0's labels are kept, the network of the round >= 1
whose predictions agree best with the referee (a run always hands back a model).

On both datasets' demos the referee orders the rounds as their real labels do (docs/results.md,
"Round rule"; benchmarks/results/registration.json, key ``referee``); where it does not (short
Hippocampus rounds): docs/experiments.md, "The working spacing".

``WORK/roundR/round.json`` records, per round, the label-free evidence: the referee agreement of
the round's labels per case, the network's agreement with the labels it was trained on (``fit``),
and the change from the previous round's labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from semisam_o1.core.files import write_json
from semisam_o1.pipeline.referee import read_reliability, reliable_cases
from semisam_o1.pipeline.selection import label_agreement

ROUND_JSON = "round.json"


def paired_gain(new: dict[str, float], old: dict[str, float]) -> tuple[float, float]:
    """Mean and standard error of the per-case differences ``new[c] - old[c]`` over the cases of
    both (the standard error of a paired mean, ``sd / sqrt(n)``; 0 with fewer than 2 cases)."""
    cases = [c for c in new if c in old]
    if not cases:
        return 0.0, 0.0
    d = np.array([new[c] - old[c] for c in cases], dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def better(new: dict[str, float], old: dict[str, float]) -> bool:
    """True when ``new`` agrees with the referee better than ``old`` by more than one standard
    error of the paired per-case differences (:func:`paired_gain`)."""
    gain, se = paired_gain(new, old)
    return gain > se


def round_evidence(dataset, work: Path, r: int, cases: Sequence[str], referee: Path | None,
                   trained_on: Sequence[str] = (), template_dice: float | None = None) -> dict:
    """Label-free evidence of round ``r``, written to ``WORK/round{r}/round.json``.

    Args:
        dataset: the run's :class:`semisam_o1.data.dataset.Dataset` (its label map).
        work: the work folder (``round{r}/pseudo``, and for r >= 1 ``round{r}/pred``).
        r: the round (0: the propagated labels).
        cases: the pool cases.
        referee: folder of the referee's labels (``<case>.nii.gz``), or None.
        trained_on: the pool cases round r's network trained on (for ``fit``).
        template_dice: the Dice of round r's network on the template, when it was trained without
            the template's label (the fallback criterion, :mod:`semisam_o1.pipeline.referee`).

    Returns:
        ``{"round", "referee" ({case: Dice of the round's labels with the referee's}, or None),
        "referee_pred" (the same for the network's predictions, r >= 1), "fit" (mean Dice of the
        network's predictions with the labels it trained on), "change" (mean Dice of the round's
        labels with the previous round's)}``; Dice is the mean over the foreground classes
        (:func:`semisam_o1.methods.metrics.mean_dice`).
    """

    rd = work / f"round{r}"
    out = {"round": r, "referee": None, "referee_pred": None, "fit": None, "change": None,
           "template_dice": template_dice}
    if referee is not None:
        out["referee"] = label_agreement(dataset, rd / "pseudo", referee, cases)
        if r > 0:
            out["referee_pred"] = label_agreement(dataset, rd / "pred", referee, cases)
    if r > 0:
        prev = work / f"round{r - 1}" / "pseudo"
        if trained_on:
            out["fit"] = _mean(label_agreement(dataset, rd / "pred", prev, list(trained_on)))
        out["change"] = _mean(label_agreement(dataset, rd / "pseudo", prev, cases))
    if out["referee"] is not None:
        out["referee_mean"] = _mean(out["referee"])
    write_json(rd / ROUND_JSON, out)
    return out


def _mean(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def read_evidence(work: Path, r: int) -> dict | None:
    """Round ``r``'s ``round.json``, or None when it is missing or unreadable."""
    try:
        return json.loads((work / f"round{r}" / ROUND_JSON).read_text())
    except (OSError, ValueError):
        return None


def _evidence(work: Path, rounds: int) -> list[dict] | None:
    """The rounds' evidence with referee values restricted to the cases the referee can judge
    (:func:`semisam_o1.pipeline.referee.reliable_cases`), or None when a round has none or the
    referee is unreliable (:func:`criterion`)."""
    if criterion(work) != "referee":
        return None
    evidence = [read_evidence(work, r) for r in range(rounds + 1)]
    if any(e is None or e.get("referee") is None for e in evidence):
        return None
    keep = reliable_cases(work / "referee")
    if keep is not None:
        for e in evidence:
            for key in ("referee", "referee_pred"):
                if e.get(key) is not None:
                    e[key] = {c: v for c, v in e[key].items() if c in keep}
    return evidence


def criterion(work: Path) -> str:
    """``referee`` when the run's registration referee is reliable (or was checked before the
    reliability rule existed), ``template`` when it is not (the rounds were trained without the
    template's label and are scored on it; :mod:`semisam_o1.pipeline.referee`)."""
    info = read_reliability(work / "referee")
    return "template" if info is not None and info.get("reliable") is False else "referee"


def _template_scores(work: Path, rounds: int) -> dict[int, float]:
    """{round >= 1: its network's Dice on the held-out template} for the rounds that have one."""
    out = {}
    for r in range(1, rounds + 1):
        e = read_evidence(work, r)
        if e is not None and e.get("template_dice") is not None:
            out[r] = float(e["template_dice"])
    return out


def admissible(evidence: list[dict], r: int) -> bool:
    """Round ``r``'s labels agree with the referee at least as well as round 0's (pool mean)."""
    return r == 0 or paired_gain(evidence[r]["referee"], evidence[0]["referee"])[0] >= 0.0


def best_labels_round(work: Path, rounds: int) -> tuple[int, str]:
    """The round whose pool labels are kept: the last admissible round of 0..``rounds``
    (:func:`admissible`) that is not worse than the best earlier one by more than one standard
    error (:func:`better`); the last round when there is no referee."""
    evidence = _evidence(work, rounds)
    if evidence is None:
        return int(rounds), "the last round (no referee labels)"
    best = 0
    for r in range(1, rounds + 1):  # a later round replaces the best unless it is worse beyond the noise
        if admissible(evidence, r) and not better(evidence[best]["referee"], evidence[r]["referee"]):
            best = r
    if best == 0:
        return 0, "no round's labels agree with the registration referee as well as round 0's"
    gain, se = paired_gain(evidence[best]["referee"], evidence[0]["referee"])
    return best, (f"the last round whose labels agree with the registration referee at least as well as "
                  f"round 0's ({gain:+.4f} Dice, standard error {se:.4f})")


def keep_going(work: Path, r: int) -> bool:
    """Early stopping after round ``r`` (>= 1): True when round ``r`` is admissible and improves
    on round ``r - 1`` by more than one standard error (:func:`better`), or there is no referee."""
    if criterion(work) == "template":
        scores = _template_scores(work, r)
        return r == 1 or scores.get(r, -1.0) > scores.get(r - 1, -1.0)
    evidence = _evidence(work, r)
    if evidence is None:
        return True
    return admissible(evidence, r) and better(evidence[r]["referee"], evidence[r - 1]["referee"])


def choose_round(work: Path, rounds: int) -> tuple[int, int, str]:
    """The round whose pool labels, and the round whose model, become ``WORK/final``, and why.

    Args:
        work: the run's work folder.
        rounds: the number of rounds the run has finished (>= 1).

    Returns:
        ``(labels round, model round, reason)``; the model round is >= 1.
    """
    if criterion(work) == "template":
        return _choose_by_template(work, rounds)
    labels, reason = best_labels_round(work, rounds)
    if labels > 0:
        return labels, labels, reason
    evidence = _evidence(work, rounds)  # labels round 0 only ever comes from the referee's evidence
    model = 1  # the first network, unless a later one agrees better with the referee
    for r in range(2, rounds + 1):
        if better(evidence[r]["referee_pred"], evidence[model]["referee_pred"]):
            model = r
    return 0, model, f"{reason}; the model is round {model}'s network{_model_gap(evidence, model)}"


def _model_gap(evidence: list[dict], model: int) -> str:
    """Round 0's labels kept: how the handed-back network compares with them by the referee."""
    gain, se = paired_gain(evidence[model]["referee_pred"], evidence[0]["referee"])
    if gain >= 0:
        return ""
    return (f", WEAKER than the labels handed back: its predictions agree with the referee {-gain:.4f} Dice "
            f"less (standard error {se:.4f}); label new scans with care or train a model on final/labels")


def _choose_by_template(work: Path, rounds: int) -> tuple[int, int, str]:
    """The fallback: the round whose network, trained without the template's label, scores best
    on the template (the earliest of equal scores)."""
    scores = _template_scores(work, rounds)
    if not scores:
        return int(rounds), int(rounds), "the last round (no label-free evidence)"
    best = max(scores, key=lambda r: (scores[r], -r))
    listed = ", ".join(f"round {r} {v:.4f}" for r, v in sorted(scores.items()))
    return best, best, (f"the registration referee is unreliable on this cohort, so each round's network was "
                        f"trained without the template's label and scored on it ({listed}): round {best} scores "
                        f"best; one case is weak evidence, and round 0's labels cannot be scored this way")
