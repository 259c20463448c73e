"""What a run hands back: ``WORK/final`` and the self-contained model bundle in it.

``WORK/final/`` (written by :func:`write_final` at the end of ``semisam-o1 run``)::

    labels/        one label file per cohort image (the template: its own label), named like the
                   image, in the image's format, grid and affine: the labels of the round that
                   semisam_o1.rounds.choose_round keeps
    model/         the bundle (:func:`write_bundle`): that round's model folder (model.pt,
                   config.json, stage.json, train_log.csv) plus bundle.json and, when the run
                   learned one, class_planes.json; `semisam-o1 predict -m final/model` needs
                   nothing else
    cases.csv      one row per pool case, sorted by the label-free quality score (least
                   trustworthy first, :func:`quality_rows`)
    report.json, report_dice_by_round.png, report_montage.png, report.html

The quality score reads only what the run produced: the agreement (Dice,
:func:`semisam_o1.metrics.mean_dice`) between a case's round-0 pseudo-label (propagation
from the template) and the kept round's network prediction, and the network's mean
voxel entropy (nats) over its predicted foreground. Low agreement: the two label sources
disagree, so one of them is wrong; look at those cases first.
"""

from __future__ import annotations

import csv
import io as _io
import json
import shutil
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError

BUNDLE_JSON = "bundle.json"
BUNDLE_FORMAT = "semisam-o1 bundle 1"
CASES_CSV = "cases.csv"
CSV_COLUMNS = ("rank", "case", "role", "agreement", "foreground_entropy", "image", "label", "dice_real")
_MODEL_FILES = ("model.pt", "config.json", "stage.json", "train_log.csv")


def _copy(src: Path, dst: Path) -> None:
    from .io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def median_spacing(dataset, cases: list[str]) -> list[float]:
    """Median canonical voxel size (mm) of the cases' images, from their headers."""
    from .folder_input import geometry

    spacings = [np.sqrt((geometry(dataset.image_path(c))[1][:3, :3] ** 2).sum(axis=0)) for c in cases]
    return [round(float(s), 6) for s in np.median(np.asarray(spacings), axis=0)]


def write_bundle(model: Path, out: Path, *, rule: Path | None, spacing: list[float], round_: int,
                 template: str) -> Path:
    """Copy the model folder ``model`` to ``out`` and add ``bundle.json`` (and the class-planes rule).

    Args:
        model: a finished ``train`` model folder.
        out: the bundle folder to write.
        rule: ``class_planes.json`` of the run, or None.
        spacing: the cohort's median voxel size (mm, canonical axes), for the record.
        round_: the round the model comes from.
        template: the template's case id.

    Returns:
        ``out``.

    Raises:
        InputError: ``model`` is not a finished model folder.
    """
    from . import nets

    if not nets.is_finished(model):
        raise InputError(f"{model}: not a finished model; cannot bundle it")
    out.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        if (model / name).is_file():
            _copy(model / name, out / name)
    config = json.loads((model / nets.CONFIG_NAME).read_text())
    if rule is not None:
        _copy(rule, out / "class_planes.json")
    from .io import write_json

    write_json(out / BUNDLE_JSON, {
        "format": BUNDLE_FORMAT, "version": __version__, "round": int(round_), "template": template,
        "labels": dict(zip(config["label_map"]["names"], config["label_map"]["values"])),
        "normalisation": config["normalisation"], "spacing_mm": spacing, "patch": config["patch"],
        "flip_axes": list(config["preset_params"].get("flip_axes", [])),
        "largest_component": list(config.get("largest_component", [])),
        "class_planes": "class_planes.json" if rule is not None else None,
        "network": {"class": config["net_class"], "params": config["net"]},
    })
    return out


def read_bundle(model: Path) -> dict | None:
    """``bundle.json`` of a model folder (None for a plain ``train`` folder).

    Raises:
        InputError: the file exists but is not a bundle.
    """
    path = Path(model) / BUNDLE_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable bundle description ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise InputError(f"{path}: not a semisam-o1 bundle ({BUNDLE_FORMAT!r} expected)")
    return info


def bundle_rule(model: Path) -> Path | None:
    """The class-planes rule file a bundle carries, or None."""
    info = read_bundle(model)
    if info and info.get("class_planes"):
        return Path(model) / info["class_planes"]
    return None


# --------------------------------------------------------------------------- quality score


def _foreground_entropy(pred_dir: Path, case: str, label: np.ndarray) -> float | None:
    """Mean voxel entropy (nats) of the prediction over its foreground (None without a map)."""
    from .io import read_image

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
    from .io import find_case_file, read_label
    from .metrics import mean_dice

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


# --------------------------------------------------------------------------- WORK/final


def _sources(dataset, cases: list[str]) -> dict[str, Path]:
    """Case id -> the user's original image (the folder input's file, or the dataset's image)."""
    from .folder_input import read_cases

    mapping = read_cases(dataset.root) or {}
    return {c: Path(mapping[c]["source"]) if c in mapping else dataset.image_path(c) for c in cases}


def write_labels(work: Path, dataset, final: Path, template: str, unlabeled: list[str], round_: int) -> dict:
    """``final/labels/<image name>`` for the template (its own label) and every pool case.

    Returns:
        case id -> the label file written.
    """
    from .folder_input import output_name, write_label_like
    from .io import find_case_file

    sources = _sources(dataset, [template, *unlabeled])
    written = {}
    for case, source in sources.items():
        lab = dataset.label_path(case) if case == template else \
            find_case_file(work / f"round{round_}" / "pseudo", case)
        written[case] = write_label_like(lab, source, final / "labels" / output_name(source))
    return written


def write_cases_csv(path: Path, rows: list[dict], template: str, labels: dict, sources: dict, final: Path) -> None:
    """``cases.csv``: pool cases by rising agreement, then the template."""
    from .io import atomic_path

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
    from .report_html import write_page

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
            _copy(work / name, final / name)
    report = json.loads((work / "report.json").read_text())
    report["final"] = {"round": round_, "model_round": model_round, "reason": reason, "quality": rows,
                       "labels": {c: p.relative_to(final).as_posix() for c, p in labels.items()}}
    from .io import write_json

    write_json(final / "report.json", report)
    write_page(final / "report.html", report, settings=settings)
    return final
