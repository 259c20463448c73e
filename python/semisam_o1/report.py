"""The report of a ``semisam-o1 run``: ``report.json`` and two pictures.

* ``report.json``: per round the test-set Dice, Jaccard, HD95 and ASD per class
  (from ``evaluate``), voxels changed by refinement, and the seconds per stage;
  as a diagnostic, each round's pseudo-label Dice on the unlabeled pool against
  the real labels where they exist, and (rounds >= 1) the Dice of the UNet's
  predictions on the pool before refinement (read here only, never by a stage).
* ``report_dice_by_round.png``: Dice per class by round (pseudo-labels on the
  unlabeled pool, UNet predictions on the test set).
* ``report_montage.png``: for a few unlabeled cases one slice of the image, the
  pseudo-labels of each round, the last round's prediction and the real label,
  beside the template and its label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import Dataset, atomic_path, find_case_file, read_label, write_json
from .selection import SELECTION_JSON, dice_per_class

_COLOURS = [(0, 0, 0, 0), (0.95, 0.25, 0.2, 0.55), (0.2, 0.55, 1.0, 0.55), (0.3, 0.9, 0.3, 0.55),
            (1.0, 0.85, 0.1, 0.55), (0.8, 0.3, 0.9, 0.55)]


def _class_summary(metrics: dict | None) -> dict | None:
    """Pull ``{metric: {class_name: mean}, "mean_foreground": {metric: mean}}`` out of an
    :func:`semisam_o1.evaluate.evaluate` result."""
    if not metrics:
        return None
    return dict(metrics.get("summary") or {}, mean_foreground=metrics.get("mean_foreground"))


def _pseudo_dice(dataset: Dataset, folder: Path, cases: list[str]) -> dict | None:
    """Mean Dice per foreground class of the label files in ``folder`` against the
    dataset's real labels, over the cases that have both (diagnostic only)."""
    lm = dataset.label_map
    sums = {c: [] for c in lm.foreground}
    n = 0
    for case in cases:
        if case not in dataset.labels:
            continue
        try:
            pred_path = find_case_file(folder, case, what="pseudo-label")
        except Exception:
            continue
        gt = dataset.read_label(case)
        pred = read_label(pred_path, lm, reference=gt)
        n += 1
        for c, d in zip(lm.foreground, dice_per_class(pred.array, gt.array, lm.foreground)):
            sums[c].append(d)
    if n == 0:
        return None
    per_class = {lm.names[c]: float(np.mean(v)) for c, v in sums.items()}
    return {"cases": n, "dice": per_class, "mean_foreground_dice": float(np.mean(list(per_class.values())))}


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(work: Path, dataset: Dataset, *, template: str, unlabeled: list[str], test: list[str],
                 rounds: int, times: dict, config: dict, selected: list[str] | None = None) -> dict:
    """Assemble ``WORK/report.json`` and the pictures from the stages' outputs. Returns the report.

    ``selected``: the pool cases the rounds after the first trained on (``run --select``),
    or None when every round trained on the whole pool."""
    work = Path(work)
    per_round = []
    for r in range(0, rounds + 1):
        rd = work / f"round{r}"
        entry: dict = {"round": r}
        entry["pseudo_label_dice_unlabeled"] = _pseudo_dice(dataset, rd / "pseudo", unlabeled)
        if r > 0:
            # the UNet's own predictions on the pool, before refinement: with the line
            # above, what refinement changed in quality
            entry["prediction_dice_unlabeled"] = _pseudo_dice(dataset, rd / "pred", unlabeled)
            entry["test_metrics"] = _class_summary(_read_json(rd / "test_metrics.json"))
            refine_info = _read_json(rd / "pseudo" / "refine.json")
            if refine_info is not None:
                entry["refinement"] = {k: v for k, v in refine_info.items() if k not in ("cases",)}
                entry["refinement"]["voxels_changed_total"] = refine_info.get("voxels_changed_total")
        entry["seconds"] = {k: v for k, v in times.items() if k.startswith(f"round{r}/")} if r else {
            k: v for k, v in times.items() if "/" not in k}
        per_round.append(entry)
    report = {
        "method": "SemiSAM-O1 (Zhang et al., arXiv 2604.24109)",
        "dataset": str(dataset.root),
        "template": template,
        "n_unlabeled": len(unlabeled),
        "n_test": len(test),
        "config": config,
        "rounds": per_round,
        "final_test_metrics": per_round[-1].get("test_metrics"),
        "selection": None if selected is None else {
            "n_selected": len(selected), "n_unlabeled": len(unlabeled),
            "file": str(work / "round1" / SELECTION_JSON),
            # diagnostic: the real quality of the round-0 labels the later rounds train on
            "pseudo_label_dice_selected_round0": _pseudo_dice(dataset, work / "round0" / "pseudo", list(selected)),
        },
        "seconds_total": float(sum(times.values())),
        "note": "pseudo_label_dice_unlabeled and prediction_dice_unlabeled are diagnostics computed by the report "
                "only; no stage reads those labels.",
    }
    write_json(work / "report.json", report)
    try:
        plot_dice_by_round(report, dataset, work / "report_dice_by_round.png")
        plot_montage(work, dataset, template, unlabeled, rounds, work / "report_montage.png")
    except ImportError:  # matplotlib missing: the JSON is still complete
        pass
    return report


def _test_dice(entry: dict, name: str):
    tm = entry.get("test_metrics") or {}
    dice = tm.get("dice") or tm.get("Dice") or {}
    val = dice.get(name)
    if isinstance(val, dict):
        val = val.get("mean")
    return val


def plot_dice_by_round(report: dict, dataset: Dataset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = dataset.label_map
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    rounds = [e["round"] for e in report["rounds"]]
    for c in lm.foreground:
        name = lm.names[c]
        colour = _COLOURS[c % len(_COLOURS)][:3]
        pseudo = [(e["pseudo_label_dice_unlabeled"] or {}).get("dice", {}).get(name) for e in report["rounds"]]
        xs = [r for r, v in zip(rounds, pseudo) if v is not None]
        ax.plot(xs, [v for v in pseudo if v is not None], "o--", color=colour, label=f"{name}: pseudo-labels (unlabeled pool)")
        test = [_test_dice(e, name) for e in report["rounds"]]
        xs = [r for r, v in zip(rounds, test) if v is not None]
        ax.plot(xs, [v for v in test if v is not None], "s-", color=colour, label=f"{name}: UNet (test set)")
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.set_xticks(rounds)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("SemiSAM-O1: Dice by round")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _overlay(ax, image: np.ndarray, label: np.ndarray | None, title: str) -> None:
    from matplotlib.colors import ListedColormap

    lo, hi = np.percentile(image, [0.5, 99.5])
    ax.imshow(np.rot90(image), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if label is not None:
        ax.imshow(np.rot90(label), cmap=ListedColormap(_COLOURS[: max(int(label.max()) + 1, 2)]),
                  vmin=0, vmax=max(int(label.max()), 1), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def plot_montage(work: Path, dataset: Dataset, template: str, unlabeled: list[str], rounds: int, path: Path,
                 n_cases: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = dataset.label_map
    cases = unlabeled[:n_cases]
    cols = 2 + (rounds + 1) + 1  # image, pseudo r0..R, pred R, real label
    fig, axes = plt.subplots(len(cases) + 1, cols, figsize=(1.6 * cols, 1.7 * (len(cases) + 1)), dpi=120, squeeze=False)
    timg = dataset.read_image(template)
    tlab = dataset.read_label(template, reference=timg).array
    z = int(np.argmax((tlab > 0).sum(axis=(0, 1))))
    _overlay(axes[0, 0], timg.array[:, :, z], None, f"template {template}")
    _overlay(axes[0, 1], timg.array[:, :, z], tlab[:, :, z], "template label")
    for ax in axes[0, 2:]:
        ax.axis("off")
    for row, case in enumerate(cases, start=1):
        img = dataset.read_image(case)
        panels = []
        for r in range(rounds + 1):
            panels.append((f"pseudo-labels r{r}", work / f"round{r}" / "pseudo"))
        panels.append((f"UNet r{rounds}", work / f"round{rounds}" / "pred"))
        labels = []
        for title, folder in panels:
            try:
                labels.append((title, read_label(find_case_file(folder, case), lm, reference=img).array))
            except Exception:
                labels.append((title, None))
        real = dataset.read_label(case, reference=img).array if case in dataset.labels else None
        # the slice with the most foreground: of the real label where there is one, else round 0's
        ref = real if real is not None else labels[0][1]
        z = int(np.argmax((ref > 0).sum(axis=(0, 1)))) if ref is not None else img.shape[2] // 2
        _overlay(axes[row, 0], img.array[:, :, z], None, case)
        for j, (title, lab) in enumerate(labels, start=1):
            _overlay(axes[row, j], img.array[:, :, z], None if lab is None else lab[:, :, z], title)
        _overlay(axes[row, cols - 1], img.array[:, :, z], None if real is None else real[:, :, z], "real label")
    fig.suptitle("SemiSAM-O1: axial slices (red: " + ", blue: ".join(lm.names[1:3]) + ")", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
