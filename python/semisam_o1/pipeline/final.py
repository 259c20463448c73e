"""What a run hands back: ``WORK/final``, with the self-contained model bundle in it
(:mod:`semisam_o1.stages.bundle`).

``WORK/final/`` (written by :func:`write_final` at the end of ``semisam-o1 run``)::

    labels/        one label file per cohort image (the template: its own label), named like the
                   image, in the image's format, grid and affine: the labels of the round that
                   semisam_o1.pipeline.rounds.choose_round keeps
    model/         the bundle (:func:`semisam_o1.stages.bundle.write_bundle`): that round's model folder (model.pt,
                   config.json, stage.json, train_log.csv) plus bundle.json and, when the run
                   learned one, class_planes.json; `semisam-o1 predict -m final/model` needs
                   nothing else
    cases.csv      one row per pool case, sorted by the label-free quality score (least
                   trustworthy first, :func:`quality_rows`)
    report.json, report_dice_by_round.png, report_montage.png, report.html

The quality score reads only what the run produced: the agreement (Dice,
:func:`semisam_o1.methods.metrics.mean_dice`) between a case's round-0 pseudo-label (propagation
from the template) and the kept round's network prediction, and the network's mean
voxel entropy (nats) over its predicted foreground. Low agreement: the two label sources
disagree, so one of them is wrong; look at those cases first.
"""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

import numpy as np

from semisam_o1.core.files import atomic_path, copy_atomic, write_json
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.folder_input import output_name, read_cases, write_label_like
from semisam_o1.data.images import affine_spacing, geometry, read_image, read_label
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.pipeline.report_html import write_page
from semisam_o1.stages.bundle import write_bundle

CASES_CSV = "cases.csv"


CSV_COLUMNS = ("rank", "case", "role", "agreement", "foreground_entropy", "image", "label", "dice_real")


def median_spacing(dataset, cases: list[str]) -> list[float]:
    """Median canonical voxel size (mm) of the cases' images, from their headers."""

    spacings = [affine_spacing(geometry(dataset.image_path(c))[1]) for c in cases]
    return [round(float(s), 6) for s in np.median(np.asarray(spacings), axis=0)]


def _foreground_entropy(pred_dir: Path, case: str, label: np.ndarray) -> float | None:
    """Mean voxel entropy (nats) of the prediction over its foreground (None without a map)."""

    path = pred_dir / f"{case}_entropy.nii.gz"
    if not path.is_file():
        return None
    ent = read_image(path).array
    fg = label > 0
    return float(ent[fg].mean(dtype=np.float64)) if fg.any() else float(ent.mean(dtype=np.float64))


def quality_rows(work: Path, dataset, unlabeled: list[str], round_: int, model_round: int) -> list[dict]:
    """The label-free quality score of every pool case, lowest agreement first.

    Args:
        work: the run's work folder (``round0/pseudo``, ``round{r}/pred``).
        dataset: the run's dataset.
        unlabeled: the pool cases.
        round_: the round whose labels are kept.
        model_round: the round whose network is handed back (0: no network prediction,
            agreement None).

    Returns:
        one dict per case: ``case``, ``agreement`` (mean foreground Dice of round-0 label vs
        round ``model_round``'s prediction), ``foreground_entropy`` (nats) and, as a diagnostic
        where the dataset has the case's real label, ``dice_real`` (mean foreground Dice of
        the kept label against it).
    """

    lm = dataset.label_map
    rows = []
    for case in unlabeled:
        img = dataset.read_image(case)
        kept = read_label(find_case_file(work / f"round{round_}" / "pseudo", case), lm, reference=img).array
        row = {"case": case, "agreement": None, "foreground_entropy": None, "dice_real": None}
        if model_round > 0:
            pred_dir = work / f"round{model_round}" / "pred"
            pred = read_label(find_case_file(pred_dir, case, what="prediction"), lm, reference=img).array
            r0 = read_label(find_case_file(work / "round0" / "pseudo", case), lm, reference=img).array
            row["agreement"] = mean_dice(r0, pred, lm.foreground)
            row["foreground_entropy"] = _foreground_entropy(pred_dir, case, pred)
        if case in dataset.labels:
            row["dice_real"] = mean_dice(kept, dataset.read_label(case, reference=img).array, lm.foreground)
        rows.append(row)
    rows.sort(key=lambda r: (r["agreement"] is None, r["agreement"] if r["agreement"] is not None else 0.0,
                             -(r["foreground_entropy"] or 0.0)))
    return rows


def _sources(dataset, cases: list[str]) -> dict[str, Path]:
    """Case id -> the user's original image (the folder input's file, or the dataset's image)."""

    mapping = read_cases(dataset.root) or {}
    return {c: Path(mapping[c]["source"]) if c in mapping else dataset.image_path(c) for c in cases}


def write_labels(work: Path, dataset, final: Path, template: str, unlabeled: list[str], round_: int) -> dict:
    """``final/labels/<image name>`` for the template (its own label) and every pool case.

    Returns:
        case id -> the label file written.
    """

    sources = _sources(dataset, [template, *unlabeled])
    names = {c: e.get("label_name") for c, e in (read_cases(dataset.root) or {}).items()}  # nnU-Net: CASE.png
    written = {}
    for case, source in sources.items():
        lab = dataset.label_path(case) if case == template else \
            find_case_file(work / f"round{round_}" / "pseudo", case)
        written[case] = write_label_like(lab, source, final / "labels" / (names.get(case) or output_name(source)))
    return written


def write_cases_csv(path: Path, rows: list[dict], template: str, labels: dict, sources: dict, final: Path) -> None:
    """``cases.csv``: pool cases by rising agreement, then the template."""

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    entries = [dict(r, role="unlabeled") for r in rows] + [
        {"case": template, "role": "template", "agreement": None, "foreground_entropy": None, "dice_real": None}]
    for rank, r in enumerate(entries, start=1):
        w.writerow({"rank": rank, "case": r["case"], "role": r["role"], "agreement": fmt(r["agreement"]),
                    "foreground_entropy": fmt(r["foreground_entropy"]), "image": str(sources[r["case"]]),
                    "label": labels[r["case"]].relative_to(final).as_posix(), "dice_real": fmt(r["dice_real"])})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_final(work: Path, dataset, *, template: str, unlabeled: list[str], round_: int, reason: str,
                rule: Path | None, settings: dict, model_round: int | None = None) -> Path:
    """Write ``WORK/final`` (see the module docstring); returns its path.

    ``round_`` is the round whose pool labels are kept (0: the propagated ones), ``model_round``
    the round whose network becomes the bundle (default ``round_``; none when both are 0).

    Raises:
        InputError: a label or model file of the kept round is missing or unreadable.
    """

    work = Path(work)
    final = work / "final"
    final.mkdir(parents=True, exist_ok=True)
    labels = write_labels(work, dataset, final, template, unlabeled, round_)
    model_round = round_ if model_round is None else model_round
    if model_round > 0:
        write_bundle(work / f"round{model_round}" / "model", final / "model", rule=rule,
                     spacing=median_spacing(dataset, [template, *unlabeled]), round_=model_round,
                     template=template)
    rows = quality_rows(work, dataset, unlabeled, round_, model_round)
    sources = _sources(dataset, [template, *unlabeled])
    write_cases_csv(final / CASES_CSV, rows, template, labels, sources, final)
    for name in ("report.json", "report_dice_by_round.png", "report_montage.png"):
        if (work / name).is_file():
            copy_atomic(work / name, final / name)
    report = json.loads((work / "report.json").read_text())
    report["final"] = {"round": round_, "model_round": model_round, "reason": reason, "quality": rows,
                       "labels": {c: p.relative_to(final).as_posix() for c, p in labels.items()}}

    write_json(final / "report.json", report)
    write_page(final / "report.html", report, settings=settings)
    return final

