"""Score predicted label volumes against ground truth: Dice, Jaccard, HD95 and ASD per case and class.

``semisam-o1 evaluate -i PRED -g GT [--cases ID ...] [--dataset DATASET] [-o METRICS.json]``

* ``PRED``: a folder of predicted label files, one per case (``CASE.nii.gz`` or
  ``CASE.nii``; nnU-Net's ``CASE_0000`` is accepted too).
* ``GT``: an MSD / nnU-Net dataset folder (labels from ``labelsTr/``, classes
  from its ``dataset.json``) or a plain folder of label files. For a plain
  folder the classes come from ``--dataset`` (a dataset folder or its
  ``dataset.json``); without it, the classes are the union of the label values
  found in the ground truth and prediction files of the evaluated cases, named
  by their values. ``--dataset`` also overrides a dataset folder's classes.
* Cases: ``--cases``, else every prediction whose case id has a ground truth
  (predictions without one are listed in the output and not scored). With
  ``--cases``, a missing prediction or ground-truth file is an error, raised
  before anything is read or written.

Every file is read through :mod:`semisam_o1.data.images` (canonical orientation, float
labels rounded, undeclared values rejected); a prediction whose grid (shape or
affine) differs from its ground truth is one InputError naming the case.

Metrics, per foreground class, on the binary masks of that class:

* Dice: :func:`semisam_o1.methods.metrics.dice` (2|A & B| / (|A| + |B|); the value of
  MONAI's ``DiceMetric(ignore_empty=False)``);
* Jaccard: MONAI ``MeanIoU(ignore_empty=False)``;
* HD95: MONAI ``HausdorffDistanceMetric(percentile=95)`` (symmetric: the larger
  of the two directed 95th percentiles);
* ASD: MONAI ``SurfaceDistanceMetric(symmetric=True)`` (the mean of the
  distances of both surfaces' edge voxels to the other surface);

distances in millimetres using the ground truth's voxel spacing.

Empty masks (the field's convention, also :mod:`semisam_o1.methods.metrics`'s):

======================  =====  =======  ==============  ==============
case                    Dice   Jaccard  HD95            ASD
======================  =====  =======  ==============  ==============
both empty              1      1        0               0
exactly one empty       0      0        image diagonal  image diagonal
======================  =====  =======  ==============  ==============

The image diagonal is the length in mm of the image's field of view,
``sqrt(sum((shape_i * spacing_i) ** 2))``: no two points of the image are
farther apart, so it is the worst distance a prediction can have. Every value
is then finite and every case counts in every mean: each class's mean and
standard deviation (population, ddof=0) are over all the evaluated cases
(``n == n_cases``); the numbers of empty ground truths and predictions are
reported beside them. The convention is written in ``metrics.json``
(``convention``) and under the printed table.

Distances are in mm, except on 2D images whose size is unknown (a PNG / TIFF / BMP mask, or a 2D
NIfTI written without ``--pixel-size``: :func:`semisam_o1.data.images.distance_unit`), where they
are in pixels: ``distance_unit`` in the JSON, ``hd95_px`` / ``asd_px`` in the CSV, ``HD95 px`` in the
table. Ground truth and predictions may be NIfTI, NRRD / MHA or 2D masks (PNG, TIFF, BMP).

Outputs (``-o``, default ``PRED/metrics.json``), written atomically after every
case is scored: the JSON (``command``, ``convention``, ``cases`` per case and
class, ``per_class`` mean / std / counts, ``summary`` ``{metric: {class: mean}}``
and ``mean_foreground``), and a CSV beside it (same name, ``.csv``) with one row
per case and class then ``mean`` and ``std`` rows. An output that is an existing
folder, or in a folder that cannot be written, is refused before anything is
read. The stage has no ``stage.json`` record (it writes one file, beside other
stages' outputs): a re-run recomputes the metrics, and the command that
reproduces them is the JSON's ``command``.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path, write_json
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import check_output_dir
from semisam_o1.core.settings import REQUIRED, Checked, command_line, option
from semisam_o1.data.cases import find_case_file, index_label_folder, list_paths
from semisam_o1.data.dataset import Dataset, read_dataset_json
from semisam_o1.data.images import LABEL_ENDINGS, check_same_grid, distance_unit, read_label, read_label_values
from semisam_o1.data.labels import LabelMap
from semisam_o1.methods.metrics import dice

METRICS = ("dice", "jaccard", "hd95", "asd")
UNITS = {"dice": "", "jaccard": "", "hd95": "mm", "asd": "mm"}
CONVENTION = ("both masks empty: Dice 1, Jaccard 1, HD95 0 mm, ASD 0 mm; exactly one empty: Dice 0, "
              "Jaccard 0, HD95 and ASD = the image diagonal in mm (sqrt(sum((shape * spacing)^2))); "
              "every case counts in every mean")
METRIC_SOURCES = {"dice": "semisam_o1.methods.metrics.dice (= MONAI DiceMetric(ignore_empty=False))",
                  "jaccard": "MONAI MeanIoU(ignore_empty=False)",
                  "hd95": "MONAI HausdorffDistanceMetric(percentile=95), mm",
                  "asd": "MONAI SurfaceDistanceMetric(symmetric=True), mm"}


@dataclasses.dataclass(kw_only=True)
class EvaluateSettings(Checked):
    """Settings of ``semisam-o1 evaluate`` (see the module docstring)."""

    input: Path = option(REQUIRED, "folder of predicted label files, one per case", flags=("-i", "--input"),
                         type=Path, metavar="PRED")
    gt: Path = option(REQUIRED, "ground truth: an MSD / nnU-Net dataset folder (labelsTr/ + dataset.json) "
                      "or a plain folder of label files", flags=("-g", "--gt"), type=Path, metavar="GT")
    cases: tuple[str, ...] | None = option(None, "case ids to score (default: every prediction that has a "
                                           "ground truth)", nargs="+", metavar="ID")
    dataset: Path | None = option(None, "dataset folder or dataset.json whose 'labels' give the classes "
                                  "(default: GT's dataset.json; for a plain GT folder without it, the union "
                                  "of the label values found)", type=Path, metavar="DATASET")
    output: Path | None = option(None, "metrics JSON; a CSV is written beside it (default: PRED/metrics.json)",
                                 flags=("-o", "--output"), type=Path, metavar="METRICS.json", neutral=True)
    quiet: bool = option(False, "do not print the table or a progress bar", neutral=True)

    def __post_init__(self):
        super().__post_init__()
        self.input, self.gt = Path(self.input), Path(self.gt)
        if self.dataset is not None:
            self.dataset = Path(self.dataset)
        if self.output is not None:
            self.output = Path(self.output)
        if self.cases is not None:
            self.cases = tuple(self.cases)
            if not self.cases:
                raise InputError("--cases: give at least one case id (or leave it out to score every prediction)")


# --------------------------------------------------------------------------- outputs


def output_paths(settings: EvaluateSettings) -> tuple[Path, Path]:
    """``(metrics JSON, CSV beside it)``: ``-o`` or ``PRED/metrics.json``; the CSV has the
    same name with ``.csv`` in place of ``.json`` (appended for another ending)."""
    out = settings.output if settings.output is not None else settings.input / "metrics.json"
    csv_path = out.with_suffix(".csv") if out.suffix.lower() == ".json" else out.with_name(out.name + ".csv")
    return out, csv_path


def check_outputs(paths: Iterable[Path]) -> None:
    """Refuse output files that cannot be written, before any work.

    Raises:
        InputError: a path is an existing folder, or its folder is a file or not writable
            (one line naming it).
    """

    for path in paths:
        if path.is_dir():
            raise InputError(f"{path}: the metrics output is an existing folder; give a file name "
                             f"(e.g. -o {path / 'metrics.json'})")
        check_output_dir(path.parent, what="folder of the metrics output")


# --------------------------------------------------------------------------- inputs


def _label_map_from(dataset: Path):
    """The LabelMap of a dataset folder's or a dataset.json's ``labels``.

    Raises:
        InputError: no dataset.json, unparsable, or without ``labels``.
    """

    meta_path = dataset / "dataset.json" if dataset.is_dir() else dataset
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: dataset.json not found (--dataset takes a dataset folder or its dataset.json)")
    return read_dataset_json(meta_path)[1]


def _ground_truth(gt: Path):
    """The ground-truth files of a dataset folder or a plain folder.

    Returns:
        ``(case -> label file, LabelMap or None, "dataset" | "folder")``.

    Raises:
        InputError: the folder is missing or holds no label file.
    """

    if not gt.is_dir():
        raise InputError(f"{gt}: ground-truth folder not found")
    if (gt / "dataset.json").is_file() and (gt / "labelsTr").is_dir():
        ds = Dataset(gt)
        return dict(ds.labels), ds.label_map, "dataset"
    files = index_label_folder(gt, LABEL_ENDINGS)
    if not files:
        raise InputError(f"{gt}: no label files ({' / '.join(LABEL_ENDINGS)}) and no dataset "
                         "(dataset.json + labelsTr/)")
    return files, None, "folder"


def _listed_cases(pred: Path, gt_files: dict, cases: Sequence[str]) -> tuple[list[str], dict]:
    """``(cases, case -> prediction file)`` for explicitly listed ``cases``.

    Raises:
        InputError: one line listing every missing prediction and ground truth.
    """

    cases = list(dict.fromkeys(cases))
    no_gt = [c for c in cases if c not in gt_files]
    pred_files, no_pred = {}, []
    for c in cases:
        try:
            pred_files[c] = find_case_file(pred, c, what="prediction")
        except InputError:
            no_pred.append(c)
    problems = []
    if no_pred:
        problems.append("missing prediction file(s): " + list_paths([pred / f"{c}.nii.gz" for c in no_pred]))
    if no_gt:
        problems.append("no ground truth for case(s): " + ", ".join(no_gt[:20])
                        + (f" and {len(no_gt) - 20} more" if len(no_gt) > 20 else ""))
    if problems:
        raise InputError("; ".join(problems))
    return cases, pred_files


def _resolve_cases(pred: Path, gt_files: dict, cases: Sequence[str] | None):
    """The cases to score: ``cases``, else every prediction that has a ground truth.

    Returns:
        ``(cases, case -> prediction file, ids of predictions without a ground truth)``.

    Raises:
        InputError: the prediction folder is missing, a listed case lacks a file, or no
            prediction matches a ground truth.
    """

    if not pred.is_dir():
        raise InputError(f"{pred}: prediction folder not found")
    if cases:
        chosen, pred_files = _listed_cases(pred, gt_files, cases)
        return chosen, pred_files, []
    pred_index = index_label_folder(pred, LABEL_ENDINGS)
    chosen = sorted(set(pred_index) & set(gt_files))
    if not chosen:
        raise InputError(f"{pred}: no prediction file matches a ground-truth case "
                         f"({len(pred_index)} prediction files, {len(gt_files)} ground-truth files)")
    unmatched = sorted(set(pred_index) - set(gt_files))
    return chosen, {c: pred_index[c] for c in chosen}, unmatched


def _classes(settings: EvaluateSettings, gt_map, files: list[Path]):
    """The classes to score and where they come from: ``--dataset``, else the ground truth's
    dataset.json, else the union of the label values found in ``files``.

    Returns:
        ``(LabelMap, description of the source)``.

    Raises:
        InputError: no foreground class.
    """

    if settings.dataset is not None:
        label_map, source = _label_map_from(settings.dataset), str(settings.dataset)
    elif gt_map is not None:
        label_map, source = gt_map, str(settings.gt / "dataset.json")
    else:
        found: set[int] = set()
        for p in files:
            found.update(int(v) for v in np.unique(read_label_values(p).array))
        label_map = LabelMap.from_values(found)
        source = "union of the label values found in the ground truth and predictions"
    if not label_map.foreground:
        raise InputError(f"{source}: no foreground class to score (only background declared or found)")
    return label_map, source


# --------------------------------------------------------------------------- metrics


def _bbox(mask: np.ndarray):
    """Slices of the bounding box of ``mask`` grown by 1 voxel (clipped), or None if empty."""
    sl = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        sl.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])))
    return tuple(sl)


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of an image's field of view: ``sqrt(sum((shape_i * spacing_i) ** 2))``,
    the distance given to a mask compared with an empty one (see the module docstring)."""
    return float(np.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


class _Scorer:
    """MONAI's metric objects, reused across cases and classes."""

    def __init__(self):
        from monai.metrics import HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric

        self.iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
        self.hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self.asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")

    def __call__(self, pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float]) -> dict:
        """The four metrics of two masks, with the empty-mask convention.

        Args:
            pred_mask, gt_mask: (X, Y, Z) bool masks on the same grid.
            spacing: voxel size in mm per axis.

        Returns:
            ``{dice, jaccard, hd95 (mm), asd (mm), empty_gt, empty_pred}``; all finite.
        """

        empty_pred, empty_gt = not bool(pred_mask.any()), not bool(gt_mask.any())
        flags = {"empty_gt": empty_gt, "empty_pred": empty_pred}
        if empty_pred and empty_gt:
            return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, **flags}
        if empty_pred or empty_gt:
            worst = image_diagonal(gt_mask.shape, spacing)
            return {"dice": 0.0, "jaccard": 0.0, "hd95": worst, "asd": worst, **flags}
        box = _bbox(pred_mask | gt_mask)  # distances and overlaps are the same on the grown box
        pred_mask, gt_mask = pred_mask[box], gt_mask[box]
        out = {"dice": dice(pred_mask, gt_mask)}
        spacing = [float(s) for s in spacing]
        if pred_mask.ndim == 3 and gt_mask.shape[2] == 1 and pred_mask.shape[2] == 1:
            # a 2D image: contours and distances in its plane (in 3D, every pixel of a one-slice
            # mask would be a surface pixel)
            pred_mask, gt_mask, spacing = pred_mask[:, :, 0], gt_mask[:, :, 0], spacing[:2]
        out.update(self._monai(pred_mask, gt_mask, spacing))
        return {**out, **flags}

    def _monai(self, pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: list[float]) -> dict:
        """Jaccard, HD95 and ASD (MONAI) of two non-empty (X, Y, Z) or 2D (X, Y) bool masks."""
        import torch

        yp = torch.from_numpy(np.ascontiguousarray(pred_mask))[None, None].float()
        yt = torch.from_numpy(np.ascontiguousarray(gt_mask))[None, None].float()
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecations (get_mask_edges)
            for name, metric, kwargs in (("jaccard", self.iou, {}), ("hd95", self.hd95, {"spacing": spacing}),
                                         ("asd", self.asd, {"spacing": spacing})):
                value = metric(y_pred=yp, y=yt, **kwargs)
                metric.reset()
                out[name] = float(torch.as_tensor(value).reshape(-1)[0])
        return out


def score_case(scorer: _Scorer, case: str, gt_file: Path, pred_file: Path, label_map) -> tuple[dict, str]:
    """The metrics of one case, per foreground class, and the unit of its distances.

    Returns:
        ``({class name: {dice, jaccard, hd95, asd, empty_gt, empty_pred}}, unit)``, unit ``"mm"`` or
        ``"pixels"`` (:func:`semisam_o1.data.images.distance_unit` of the ground truth).

    Raises:
        InputError: a file is unreadable, holds an undeclared value, or the prediction's grid
            differs from the ground truth's (the line names the case).
    """

    try:
        gt_vol = read_label(gt_file, label_map)
        pred_vol = read_label(pred_file, label_map)
        check_same_grid(pred_vol, gt_vol, what="ground truth")
    except InputError as exc:
        raise InputError(f"case {case}: {exc}") from None
    return ({label_map.names[c]: scorer(pred_vol.array == c, gt_vol.array == c, gt_vol.spacing)
             for c in label_map.foreground}, distance_unit(gt_vol))


def _stats(values: list[float]) -> dict:
    """``{mean, std (population), n}`` of every value (None for no value)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else None, "std": float(arr.std()) if arr.size else None,
            "n": int(arr.size)}


def summarise(per_case: dict, label_map) -> tuple[dict, dict, dict]:
    """Per-class statistics over every case.

    Args:
        per_case: ``{case: {class name: scores}}`` from :func:`score_case`.
        label_map: the scored classes.

    Returns:
        ``(per_class, summary, mean_foreground)``: ``per_class[name]`` holds ``value``,
        ``n_cases``, ``n_empty_gt``, ``n_empty_pred``, ``n_both_empty`` and per metric
        ``{mean, std, n}``; ``summary[metric][name]`` the mean; ``mean_foreground[metric]``
        the mean of the class means.
    """
    per_class = {}
    for c in label_map.foreground:
        name = label_map.names[c]
        rows = [entry[name] for entry in per_case.values()]
        info = {"value": int(label_map.values[c]), "n_cases": len(rows),
                "n_empty_gt": sum(r["empty_gt"] for r in rows),
                "n_empty_pred": sum(r["empty_pred"] for r in rows),
                "n_both_empty": sum(r["empty_gt"] and r["empty_pred"] for r in rows)}
        info.update({m: _stats([r[m] for r in rows]) for m in METRICS})
        per_class[name] = info
    summary = {m: {name: pc[m]["mean"] for name, pc in per_class.items()} for m in METRICS}
    mean_fg = {m: float(np.mean(list(summary[m].values()))) for m in METRICS}
    return per_class, summary, mean_fg


# --------------------------------------------------------------------------- the stage


def evaluate(settings: EvaluateSettings) -> dict:
    """Score the label files of ``settings.input`` against ``settings.gt`` (see the module docstring).

    Args:
        settings: the stage's settings.

    Returns:
        the JSON-ready dict also written to the metrics JSON: ``command``, ``convention``,
        ``classes`` (name -> label value), ``cases`` (case -> class name -> {dice, jaccard,
        hd95, asd, empty_gt, empty_pred}; hd95 / asd in mm), ``per_class`` (see
        :func:`summarise`), ``summary`` ({metric: {class: mean}}), ``mean_foreground``
        ({metric: mean of the class means}), ``n_cases``, ``unmatched_predictions`` and
        ``output`` ({json, csv}).

    Raises:
        InputError: an output that cannot be written, missing folders or files, unreadable
            NIfTI, undeclared label values, or a prediction whose grid differs from its
            ground truth (the message names the case). Nothing is written then.
    """
    import monai

    out, csv_path = output_paths(settings)
    check_outputs([out, csv_path])
    gt_files, gt_map, gt_kind = _ground_truth(settings.gt)
    chosen, pred_files, unmatched = _resolve_cases(settings.input, gt_files, settings.cases)
    label_map, classes_from = _classes(settings, gt_map, [gt_files[c] for c in chosen]
                                       + [pred_files[c] for c in chosen])
    scorer = _Scorer()
    bar = progress(chosen, quiet=settings.quiet, desc="evaluate")
    try:
        scored = {case: score_case(scorer, case, gt_files[case], pred_files[case], label_map) for case in bar}
    finally:
        getattr(bar, "close", lambda: None)()  # an error line starts on a line of its own
    per_case = {case: metrics for case, (metrics, _) in scored.items()}
    units = sorted({unit for _, unit in scored.values()})
    per_class, summary, mean_fg = summarise(per_case, label_map)
    result = {
        "command": command_line("evaluate", settings),
        "prediction": str(settings.input), "ground_truth": str(settings.gt), "ground_truth_kind": gt_kind,
        "classes_from": classes_from,
        "classes": {name: int(v) for name, v in zip(label_map.names, label_map.values)},
        "metrics": dict(METRIC_SOURCES), "convention": CONVENTION, "monai_version": monai.__version__,
        "n_cases": len(chosen), "unmatched_predictions": unmatched,
        "distance_unit": "/".join(units) if units else "mm",
        "cases": per_case, "per_class": per_class, "summary": summary, "mean_foreground": mean_fg,
        "output": {"json": str(out), "csv": str(csv_path)},
    }
    _write_outputs(result, out, csv_path)
    if not settings.quiet:
        _print_result(result, unmatched)
    return result


def _write_outputs(result: dict, out: Path, csv_path: Path) -> None:
    """The metrics JSON and its CSV, each written atomically."""

    with atomic_path(csv_path) as tmp:
        tmp.write_text(format_csv(result))
    write_json(out, result)


def _print_result(result: dict, unmatched: list[str]) -> None:
    """The table, the unscored predictions and the written files, on stdout."""
    print(format_table(result))
    if unmatched:
        print(f"note: {len(unmatched)} prediction file(s) without ground truth were not scored: "
              + ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else ""))
    print(f"wrote {result['output']['json']} and {result['output']['csv']}")


def _unit_suffix(result: dict) -> str:
    """``mm``, ``px`` (2D images without a pixel size) or ``mm/px`` (both among the cases)."""
    return result.get("distance_unit", "mm").replace("pixels", "px")


def format_csv(result: dict) -> str:
    """CSV text: one row per case and class, then ``mean`` and ``std`` rows per class."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    u = _unit_suffix(result)
    w.writerow(["case", "class", "value", "dice", "jaccard", f"hd95_{u}", f"asd_{u}", "empty_gt", "empty_pred"])
    names = list(result["per_class"])
    for case, entry in result["cases"].items():
        for name in names:
            r = entry[name]
            w.writerow([case, name, result["classes"][name], *(_csv_num(r[m]) for m in METRICS),
                        int(r["empty_gt"]), int(r["empty_pred"])])
    for stat in ("mean", "std"):
        for name in names:
            pc = result["per_class"][name]
            w.writerow([stat, name, pc["value"], *(_csv_num(pc[m][stat]) for m in METRICS), "", ""])
    return buf.getvalue()


def _csv_num(x) -> str:
    """A CSV cell: the number's full repr, empty for None."""
    return "" if x is None else repr(float(x))


def _fmt(x) -> str:
    """A table cell: four decimals, ``-`` for None."""
    return "-" if x is None else f"{x:.4f}"


def format_table(result: dict) -> str:
    """A small text table: per class n, mean ± std of each metric, empty counts; the
    empty-mask convention as its footer."""
    u = _unit_suffix(result)
    head = (f"{'class':<16} {'n':>4} {'Dice':>16} {'Jaccard':>16} {'HD95 ' + u:>16} {'ASD ' + u:>16} "
            f"{'empty gt/pred':>14}")
    lines = [f"{result['n_cases']} case(s); classes from {result['classes_from']}", head, "-" * len(head)]
    for name, pc in result["per_class"].items():
        cells = []
        for m in METRICS:
            s = pc[m]
            cell = "-" if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}"
            cells.append(f"{cell:>16}")
        lines.append(f"{name[:16]:<16} {pc['n_cases']:>4} {' '.join(cells)} {pc['n_empty_gt']:>6}/{pc['n_empty_pred']:<7}")
    mf = result["mean_foreground"]
    lines.append(f"{'mean (fg)':<16} {'':>4} " + " ".join(f"{_fmt(mf[m]):>16}" for m in METRICS))
    lines.append(f"empty masks: {result.get('convention', CONVENTION)}")
    return "\n".join(lines)


SETTINGS = EvaluateSettings
STAGE = evaluate
