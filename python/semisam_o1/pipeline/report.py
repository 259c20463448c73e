"""The report of a ``semisam-o1 run``: ``report.json`` and two pictures.

* ``report.json``: per round the test-set Dice, Jaccard, HD95 and ASD per class
  (from ``evaluate``), voxels changed by refinement, and the seconds per stage;
  as a diagnostic, each round's pseudo-label Dice on the unlabeled pool against
  the real labels where they exist, and (rounds >= 1) the Dice of the UNet's
  predictions on the pool before refinement (read here only, never by a stage),
  and how the round's network trained (``training``: its ``--ssl`` mode, whether
  entropy maps weighted its pseudo-labels, w2s's share of confident voxels).
  These Dice values are :func:`semisam_o1.methods.metrics.dice_per_class` (a class absent
  from both volumes counts 1, from one of them 0: ``evaluate``'s convention).
* ``report_dice_by_round.png``: Dice per class by round (pseudo-labels on the
  unlabeled pool, UNet predictions on the test set).
* ``report_montage.png``: for a few unlabeled cases one slice of the image, the
  pseudo-labels of each round, the last round's prediction and the real label,
  beside the template and its label.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path, write_json
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_label
from semisam_o1.methods.metrics import dice_per_class
from semisam_o1.pipeline.referee import POSITION_JSON, RELIABILITY_JSON, read_reliability, reliable_cases
from semisam_o1.pipeline.rounds import criterion, read_evidence
from semisam_o1.pipeline.selection import SELECTION_JSON

# RGBA per class index (background transparent), cycled for more classes
_COLOURS = [(0, 0, 0, 0), (0.95, 0.25, 0.2, 0.55), (0.2, 0.55, 1.0, 0.55), (0.3, 0.9, 0.3, 0.55),
            (1.0, 0.85, 0.1, 0.55), (0.8, 0.3, 0.9, 0.55)]
NOTE = ("pseudo_label_dice_unlabeled and prediction_dice_unlabeled are diagnostics computed by the report "
        "only; no stage reads those labels.")


def _class_summary(metrics: dict | None) -> dict | None:
    """``{metric: {class_name: mean}, "mean_foreground": {metric: mean}}`` of an
    :func:`semisam_o1.stages.evaluate.evaluate` result (None for none)."""
    if not metrics:
        return None
    return dict(metrics.get("summary") or {}, mean_foreground=metrics.get("mean_foreground"))


def _read_label_or_none(folder: Path, case: str, label_map, reference):
    """The class-index array of ``case``'s label file in ``folder`` on ``reference``'s grid,
    or None when the folder has no such file."""
    try:
        path = find_case_file(folder, case, what="label")
    except InputError:
        return None
    return read_label(path, label_map, reference=reference).array


def _pseudo_dice(dataset: Dataset, folder: Path, cases: list[str]) -> dict | None:
    """Mean Dice per foreground class of the label files in ``folder`` against the dataset's
    real labels, over the cases that have both (a diagnostic).

    Returns:
        ``{"cases": n, "dice": {class name: mean}, "mean_foreground_dice": mean}``, or None
        when no case has both files.

    Raises:
        InputError: a label file is unreadable or off its real label's grid.
    """
    lm = dataset.label_map
    per_case = []
    for case in cases:
        if case not in dataset.labels:
            continue
        gt = dataset.read_label(case)
        pred = _read_label_or_none(folder, case, lm, gt)
        if pred is not None:
            per_case.append(dice_per_class(pred, gt.array, lm.foreground))
    if not per_case:
        return None
    means = np.mean(np.asarray(per_case, np.float64), axis=0)
    per_class = {lm.names[c]: float(m) for c, m in zip(lm.foreground, means)}
    return {"cases": len(per_case), "dice": per_class, "mean_foreground_dice": float(np.mean(means))}


def _read_json(path: Path):
    """The parsed JSON file at ``path``, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def _label_free(work: Path, r: int, unlabeled: list[str]) -> dict | None:
    """Round ``r``'s label-free evidence (``round{r}/round.json``, :mod:`semisam_o1.pipeline.rounds`):
    the mean agreement of its pool labels with the registration referee over the cases the referee
    can judge, its network's Dice on the held-out template (the fallback criterion), and the mean
    agreement with the previous round's labels; None without a record."""
    e = read_evidence(work, r)
    if e is None:
        return None
    judged = reliable_cases(work / "referee")
    referee = {c: v for c, v in (e.get("referee") or {}).items() if judged is None or c in judged}
    return {"referee_agreement": float(np.mean(list(referee.values()))) if referee else None,
            "referee_cases": len(referee), "template_dice": e.get("template_dice"), "change": e.get("change")}


def _training(model: Path) -> dict | None:
    """How round r's network was trained (``round{r}/model``): ``ssl`` (the consistency mode),
    ``confidence_weighted`` (``--ssl w2s`` with a previous round's entropy maps), and, for w2s, the
    mean share of voxels confident enough to teach the perturbed views over the last tenth of the
    logged iterations (``train_log.csv`` ``confident_share``); None without a config."""
    cfg = _read_json(model / "config.json")
    if cfg is None:
        return None
    out = {"ssl": cfg.get("ssl", "none"), "confidence_weighted": cfg.get("confidence") is not None,
           "confident_share": None}
    log = model / "train_log.csv"
    if out["ssl"] == "w2s" and log.is_file():
        rows = list(csv.DictReader(log.read_text().splitlines()))
        shares = [float(r["confident_share"]) for r in rows if r.get("confident_share")]
        if shares:
            out["confident_share"] = float(np.mean(shares[-max(1, len(shares) // 10):]))
    return out


def _round_entry(work: Path, dataset: Dataset, r: int, unlabeled: list[str], times: dict) -> dict:
    """The report's entry for round ``r``: pool Dice of its pseudo-labels (and, r >= 1, of the
    UNet's predictions before refinement), its test metrics, refinement counts and seconds."""
    rd = work / f"round{r}"
    entry: dict = {"round": r, "pseudo_label_dice_unlabeled": _pseudo_dice(dataset, rd / "pseudo", unlabeled)}
    if r > 0:
        # the UNet's own predictions on the pool, before refinement: with the line above,
        # what refinement changed in quality
        entry["prediction_dice_unlabeled"] = _pseudo_dice(dataset, rd / "pred", unlabeled)
        entry["test_metrics"] = _class_summary(_read_json(rd / "test_metrics.json"))
        entry["training"] = _training(rd / "model")
        refine_info = _read_json(rd / "pseudo" / "refine.json")
        if refine_info is not None:
            entry["refinement"] = {k: v for k, v in refine_info.items() if k != "cases"}
            entry["refinement"].setdefault("voxels_changed_total", None)
    entry["label_free"] = _label_free(work, r, unlabeled)
    entry["seconds"] = ({k: v for k, v in times.items() if k.startswith(f"round{r}/")} if r
                        else {k: v for k, v in times.items() if "/" not in k})
    return entry


def _reliability_summary(work: Path) -> dict | None:
    """The referee's reliability in brief (``referee/reliability.json``), or None without one."""
    info = read_reliability(work / "referee")
    if info is None:
        return None
    position = work / "referee" / POSITION_JSON
    return {k: info[k] for k in ("reliable", "reliable_cases", "pool_cases", "rule")} | {
        "file": str(work / "referee" / RELIABILITY_JSON),
        "position_decided_on_unreliable_registration": not info["reliable"] and position.is_file()}


def write_report(work: Path, dataset: Dataset, *, template: str, unlabeled: list[str], test: list[str],
                 rounds: int, times: dict, config: dict, selected: list[str] | None = None,
                 chosen: tuple[int, int, str] | None = None) -> dict:
    """Assemble ``WORK/report.json`` and the two pictures from the stages' outputs.

    Args:
        work: the run's work folder (``round0/`` .. ``round{rounds}/``).
        dataset: the dataset the run worked on.
        template, unlabeled, test: the split's case ids.
        rounds: the number of train / predict / refine rounds.
        times: seconds per stage (``"encode"``, ``"round1/train"``, ...).
        config: the run's settings, recorded as they are.
        selected: the pool cases the rounds after the first trained on (``run --select``),
            or None when every round trained on the whole pool.
        chosen: ``(labels round, model round, reason)`` of :func:`semisam_o1.pipeline.rounds.choose_round`
            (default: the last round for both); ``final_test_metrics`` are the model round's.

    Returns:
        the report (also written to ``WORK/report.json``). The pictures are left out
        when matplotlib is missing.

    Raises:
        InputError: a label file is unreadable or off its real label's grid.
    """
    work = Path(work)
    per_round = [_round_entry(work, dataset, r, unlabeled, times) for r in range(rounds + 1)]
    labels_round, model_round, reason = chosen or (rounds, rounds, "the last round")
    report = {
        "method": "SemiSAM-O1 (Zhang et al., arXiv 2604.24109)",
        "dataset": str(dataset.root),
        "template": template,
        "n_unlabeled": len(unlabeled),
        "n_test": len(test),
        "config": config,
        "rounds": per_round,
        "chosen": {"labels_round": labels_round, "model_round": model_round, "reason": reason,
                   "criterion": criterion(work), "referee_reliability": _reliability_summary(work)},
        "final_test_metrics": per_round[model_round].get("test_metrics"),
        "final_pool_dice": per_round[labels_round].get("pseudo_label_dice_unlabeled"),
        "selection": None if selected is None else {
            "n_selected": len(selected), "n_unlabeled": len(unlabeled),
            "file": str(work / "round1" / SELECTION_JSON),
            # diagnostic: the real quality of the round-0 labels the later rounds train on
            "pseudo_label_dice_selected_round0": _pseudo_dice(dataset, work / "round0" / "pseudo", list(selected)),
        },
        "seconds_total": float(sum(times.values())),
        "note": NOTE,
    }
    write_json(work / "report.json", report)
    try:
        plot_dice_by_round(report, dataset, work / "report_dice_by_round.png")
        plot_montage(work, dataset, template, unlabeled, rounds, work / "report_montage.png")
    except ImportError:  # matplotlib missing: the JSON is still complete
        pass
    return report


def _test_dice(entry: dict, name: str) -> float | None:
    """The mean test Dice of class ``name`` in a round entry (None before round 1)."""
    return ((entry.get("test_metrics") or {}).get("dice") or {}).get(name)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)


def plot_dice_by_round(report: dict, dataset: Dataset, path: Path) -> None:
    """Dice per foreground class by round, pseudo-labels on the pool (dashed) and the UNet
    on the test set (solid), as a PNG at ``path``.

    Raises:
        ImportError: matplotlib is missing.
    """
    plt = _pyplot()
    lm = dataset.label_map
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    rounds = [e["round"] for e in report["rounds"]]
    for c in lm.foreground:
        name = lm.names[c]
        colour = _COLOURS[c % len(_COLOURS)][:3]
        pseudo = [(e["pseudo_label_dice_unlabeled"] or {}).get("dice", {}).get(name) for e in report["rounds"]]
        test = [_test_dice(e, name) for e in report["rounds"]]
        for values, style, what in ((pseudo, "o--", "pseudo-labels (unlabeled pool)"), (test, "s-", "UNet (test set)")):
            xs = [r for r, v in zip(rounds, values) if v is not None]
            ax.plot(xs, [v for v in values if v is not None], style, color=colour, label=f"{name}: {what}")
    _plot_label_free(ax, report["rounds"], rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.set_xticks(rounds)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("SemiSAM-O1: Dice by round")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_label_free(ax, entries: list[dict], rounds: list[int]) -> None:
    """The label-free evidence by round (grey): agreement with the registration referee, and the
    network's Dice on the held-out template when the run fell back on it; a run without real labels
    shows only these."""
    for key, style, what in (("referee_agreement", "D:", "agreement with the registration referee (pool, no label)"),
                             ("template_dice", "^:", "network on the held-out template")):
        values = [(e.get("label_free") or {}).get(key) for e in entries]
        xs = [r for r, v in zip(rounds, values) if v is not None]
        if xs:
            ax.plot(xs, [v for v in values if v is not None], style, color="0.35", label=what)


def displayed(plane: np.ndarray, flat: bool) -> np.ndarray:
    """A slice as the montage draws it: a 2D image (``flat``) as its file shows it (rows along array
    axis 0, as the 2D readers put them), an axial slice of a volume rotated by 90 degrees so that
    anterior is up."""
    return plane if flat else np.rot90(plane)


def _overlay(ax, image: np.ndarray, label: np.ndarray | None, title: str, flat: bool = False) -> None:
    """One panel: a 2-D ``image`` slice (grey, 0.5-99.5 percentile window) with the class
    indices of ``label`` (same shape) in colour (:func:`displayed` orients both)."""
    from matplotlib.colors import ListedColormap

    lo, hi = np.percentile(image, [0.5, 99.5])
    ax.imshow(displayed(image, flat), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if label is not None:
        ax.imshow(displayed(label, flat), cmap=ListedColormap(_COLOURS[: max(int(label.max()) + 1, 2)]),
                  vmin=0, vmax=max(int(label.max()), 1), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _busiest_slice(label: np.ndarray | None, depth: int) -> int:
    """The index along axis 2 with the most foreground voxels of ``label`` (the middle without one)."""
    return int(np.argmax((label > 0).sum(axis=(0, 1)))) if label is not None else depth // 2


def _montage_row(axes, work: Path, dataset: Dataset, case: str, rounds: int) -> None:
    """One montage row for ``case``: the image, each round's pseudo-labels, the last round's
    UNet prediction and the real label, on the slice with the most foreground."""
    lm = dataset.label_map
    img = dataset.read_image(case)
    panels = [(f"pseudo-labels r{r}", work / f"round{r}" / "pseudo") for r in range(rounds + 1)]
    panels.append((f"UNet r{rounds}", work / f"round{rounds}" / "pred"))
    labels = [(title, _read_label_or_none(folder, case, lm, img)) for title, folder in panels]
    real = dataset.read_label(case, reference=img).array if case in dataset.labels else None
    # the slice with the most foreground: of the real label where there is one, else round 0's
    z = _busiest_slice(real if real is not None else labels[0][1], img.shape[2])
    flat = img.shape[2] == 1
    _overlay(axes[0], img.array[:, :, z], None, case, flat)
    for ax, (title, lab) in zip(axes[1:], labels):
        _overlay(ax, img.array[:, :, z], None if lab is None else lab[:, :, z], title, flat)
    if real is None:  # a pool case of a one-label run: no real label is read
        axes[-1].axis("off")
        axes[-1].set_title("real label: not read", fontsize=7)
    else:
        _overlay(axes[-1], img.array[:, :, z], real[:, :, z], "real label", flat)


def plot_montage(work: Path, dataset: Dataset, template: str, unlabeled: list[str], rounds: int, path: Path,
                 n_cases: int = 3) -> None:
    """Axial slices (2D images: the images as their files show them, :func:`displayed`) as a PNG at
    ``path``: the template and its label, then for the first ``n_cases`` unlabeled cases one row of
    :func:`_montage_row`.

    Raises:
        ImportError: matplotlib is missing.
        InputError: a label file is unreadable or off its image's grid.
    """
    plt = _pyplot()
    lm = dataset.label_map
    cases = unlabeled[:n_cases]
    cols = 2 + (rounds + 1) + 1  # image, pseudo r0..R, pred R, real label
    fig, axes = plt.subplots(len(cases) + 1, cols, figsize=(1.6 * cols, 1.7 * (len(cases) + 1)), dpi=120,
                             squeeze=False)
    timg = dataset.read_image(template)
    tlab = dataset.read_label(template, reference=timg).array
    z = _busiest_slice(tlab, timg.shape[2])
    flat = timg.shape[2] == 1
    _overlay(axes[0, 0], timg.array[:, :, z], None, f"template {template}", flat)
    _overlay(axes[0, 1], timg.array[:, :, z], tlab[:, :, z], "template label", flat)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for row, case in enumerate(cases, start=1):
        _montage_row(axes[row], work, dataset, case, rounds)
    what = "images" if flat else "axial slices"
    fig.suptitle(f"SemiSAM-O1: {what} (red: " + ", blue: ".join(lm.names[1:3]) + ")", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
