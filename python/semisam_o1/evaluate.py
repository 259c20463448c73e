"""Score predicted label volumes against ground truth: Dice, Jaccard, HD95 and ASD per case and class.

``semisam-o1 evaluate -p PRED -g GT [--cases ID ...] [--dataset DATASET] [-o METRICS.json]``

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

Every file is read through :mod:`semisam_o1.io` (canonical orientation, float
labels rounded, undeclared values rejected); a prediction whose grid (shape or
affine) differs from its ground truth is one InputError naming the case.

Metrics (MONAI, per foreground class, on the binary masks of that class):
``DiceMetric``, ``MeanIoU`` (Jaccard), ``HausdorffDistanceMetric(percentile=95)``
(HD95, symmetric) and ``SurfaceDistanceMetric(symmetric=True)`` (ASD: mean of
the distances of both surfaces' edge voxels to the other surface), distances in
millimetres using the ground truth's voxel spacing. Empty masks are recorded as
MONAI returns them, never a crash:

======================  =====  =======  =====  =====
case                    Dice   Jaccard  HD95   ASD
======================  =====  =======  =====  =====
both empty              nan    nan      nan    nan
ground truth empty      nan    nan      nan    inf
prediction empty        0      0        nan    inf
======================  =====  =======  =====  =====

(MONAI's Dice / IoU with ``ignore_empty=True`` give NaN for an empty ground
truth; its HD95 is a 95th percentile over infinite distances, which torch
returns as NaN.) Each class's mean and standard deviation (population, ddof=0)
are taken over the cases with a finite value, and the numbers of NaN and inf
values, of empty ground truths and empty predictions are reported beside them.

Outputs (``-o``, default ``PRED/metrics.json``), written atomically: the JSON
(``command``, ``cases`` per case and class, ``per_class`` mean / std / counts,
``summary`` ``{metric: {class: mean}}`` and ``mean_foreground``), and a CSV
beside it (same name, ``.csv``) with one row per case and class then ``mean``
and ``std`` rows. In both files NaN and infinity are written as the strings
``"nan"`` and ``"inf"``; the dict :func:`evaluate` returns holds floats. A
small table is printed unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError

METRICS = ("dice", "jaccard", "hd95", "asd")
UNITS = {"dice": "", "jaccard": "", "hd95": "mm", "asd": "mm"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # default=SUPPRESS: the defaults are told in the help text (the CLI's formatter would add "(default: None)")
    p.add_argument("-p", "--pred", required=True, default=argparse.SUPPRESS, metavar="PRED", help="folder of predicted label files, one per case")
    p.add_argument("-g", "--gt", required=True, default=argparse.SUPPRESS, metavar="GT",
                   help="ground truth: an MSD / nnU-Net dataset folder (labelsTr/ + dataset.json) or a plain folder of label files")
    p.add_argument("--cases", nargs="+", default=argparse.SUPPRESS, metavar="ID",
                   help="case ids to score (default: every prediction that has a ground truth)")
    p.add_argument("--dataset", default=argparse.SUPPRESS, metavar="DATASET",
                   help="dataset folder or dataset.json whose 'labels' give the classes (default: GT's dataset.json; "
                        "for a plain GT folder without it, the union of the label values found)")
    p.add_argument("-o", "--output", default=argparse.SUPPRESS, metavar="METRICS.json",
                   help="metrics JSON; a CSV is written beside it (default: PRED/metrics.json)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")


def main(args: argparse.Namespace) -> int:
    out = getattr(args, "output", None) or str(Path(args.pred) / "metrics.json")
    evaluate(args.pred, args.gt, cases=getattr(args, "cases", None), dataset=getattr(args, "dataset", None),
             out=out, quiet=args.quiet)
    return 0


# --------------------------------------------------------------------------- inputs


def _label_map_from(dataset: str | Path):
    from .io import LabelMap

    path = Path(dataset)
    meta_path = path / "dataset.json" if path.is_dir() else path
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: dataset.json not found (--dataset takes a dataset folder or its dataset.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path}: cannot parse ({exc})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputError(f"{meta_path}: no 'labels' entry")
    return LabelMap.from_dataset_json(meta["labels"], source=str(meta_path))


def _ground_truth(gt: Path):
    """(case -> label file, LabelMap or None, kind) of a dataset folder or a plain folder."""
    from .io import Dataset, index_label_folder

    if not gt.is_dir():
        raise InputError(f"{gt}: ground-truth folder not found")
    if (gt / "dataset.json").is_file() and (gt / "labelsTr").is_dir():
        ds = Dataset(gt)
        return dict(ds.labels), ds.label_map, "dataset"
    files = index_label_folder(gt)
    if not files:
        raise InputError(f"{gt}: no label files (.nii.gz / .nii) and no dataset (dataset.json + labelsTr/)")
    return files, None, "folder"


def _resolve_cases(pred: Path, gt_files: dict, cases: Sequence[str] | None):
    """(cases, case -> prediction file, unmatched prediction ids). One InputError
    listing every missing file when ``cases`` names cases without them."""
    from .io import _list_paths, find_case_file, index_label_folder

    if not pred.is_dir():
        raise InputError(f"{pred}: prediction folder not found")
    if cases:
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
            problems.append("missing prediction file(s): " + _list_paths([pred / f"{c}.nii.gz" for c in no_pred]))
        if no_gt:
            problems.append("no ground truth for case(s): " + ", ".join(no_gt[:20])
                            + (f" and {len(no_gt) - 20} more" if len(no_gt) > 20 else ""))
        if problems:
            raise InputError("; ".join(problems))
        return cases, pred_files, []
    pred_index = index_label_folder(pred)
    chosen = sorted(set(pred_index) & set(gt_files))
    if not chosen:
        raise InputError(f"{pred}: no prediction file matches a ground-truth case "
                         f"({len(pred_index)} prediction files, {len(gt_files)} ground-truth files)")
    unmatched = sorted(set(pred_index) - set(gt_files))
    return chosen, {c: pred_index[c] for c in chosen}, unmatched


def _union_label_map(paths: Iterable[Path]):
    from .io import LabelMap, read_label_values

    found: set[int] = set()
    for p in paths:
        arr = read_label_values(p).array
        found.update(int(v) for v in np.unique(arr))
    return LabelMap.from_values(found)


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


class _Scorer:
    """MONAI's metric objects, reused across cases and classes."""

    def __init__(self):
        from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric

        self.dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
        self.iou = MeanIoU(include_background=True, reduction="none", ignore_empty=True)
        self.hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self.asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")

    def __call__(self, pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float]) -> dict:
        """Dice, Jaccard, HD95 (mm), ASD (mm) of two boolean masks (X, Y, Z) on the same grid."""
        import torch

        box = _bbox(pred_mask | gt_mask)
        if box is None:  # both empty: MONAI's answer on a small empty array
            pred_mask = gt_mask = np.zeros((3, 3, 3), dtype=bool)
        else:
            pred_mask, gt_mask = pred_mask[box], gt_mask[box]
        yp = torch.from_numpy(np.ascontiguousarray(pred_mask))[None, None].float()
        yt = torch.from_numpy(np.ascontiguousarray(gt_mask))[None, None].float()
        spacing = [float(s) for s in spacing]
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty masks; they are counted instead
            for name, metric, kwargs in (("dice", self.dice, {}), ("jaccard", self.iou, {}),
                                         ("hd95", self.hd95, {"spacing": spacing}),
                                         ("asd", self.asd, {"spacing": spacing})):
                value = metric(y_pred=yp, y=yt, **kwargs)
                metric.reset()
                out[name] = float(torch.as_tensor(value).reshape(-1)[0])
        return out


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "n": int(finite.size),
        "n_nan": int(np.isnan(arr).sum()),
        "n_inf": int(np.isinf(arr).sum()),
    }


def _jsonable(obj):
    """NaN / inf -> "nan" / "inf" / "-inf" (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else "inf"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _command(pred, gt, cases, dataset, out) -> str:
    parts = ["semisam-o1", "evaluate", "-p", str(pred), "-g", str(gt)]
    if cases:
        parts += ["--cases", *cases]
    if dataset is not None:
        parts += ["--dataset", str(dataset)]
    if out is not None:
        parts += ["-o", str(out)]
    return shlex.join(parts)


# --------------------------------------------------------------------------- the stage


def evaluate(
    pred: str | Path,
    gt: str | Path,
    *,
    cases: Sequence[str] | None = None,
    dataset: str | Path | None = None,
    out: str | Path | None = None,
    quiet: bool = True,
) -> dict:
    """Score the label files of ``pred`` against ``gt`` (see the module docstring).

    Parameters
    ----------
    pred : folder of predicted label NIfTI files, ``CASE.nii.gz`` / ``CASE.nii``.
    gt : MSD / nnU-Net dataset folder or plain folder of ground-truth label files.
    cases : case ids to score; default every prediction with a ground truth.
    dataset : dataset folder or ``dataset.json`` giving the classes (see module doc).
    out : metrics JSON path (CSV written beside it, ``.csv``); None writes nothing.
    quiet : do not print the table.

    Returns
    -------
    dict with ``command``, ``classes`` (name -> label value), ``cases``
    (case -> class name -> {dice, jaccard, hd95, asd, empty_gt, empty_pred};
    hd95 / asd in mm, NaN / inf as float), ``per_class`` (class name ->
    {value, n_cases, n_empty_gt, n_empty_pred, n_both_empty, and per metric
    {mean, std, n, n_nan, n_inf}}), ``summary`` ({metric: {class: mean}}) and
    ``mean_foreground`` ({metric: mean of the class means}).

    Raises
    ------
    InputError : missing folders or files, unreadable NIfTI, undeclared label
        values, or a prediction whose grid differs from its ground truth (the
        message names the case). Nothing is written then.
    """
    from .io import check_same_grid, read_label, write_json

    pred, gt = Path(pred), Path(gt)
    command = _command(pred, gt, cases, dataset, out)
    gt_files, label_map, gt_kind = _ground_truth(gt)
    chosen, pred_files, unmatched = _resolve_cases(pred, gt_files, cases)
    if dataset is not None:
        label_map = _label_map_from(dataset)
        classes_from = str(dataset)
    elif label_map is not None:
        classes_from = str(gt / "dataset.json")
    else:
        label_map = _union_label_map([gt_files[c] for c in chosen] + [pred_files[c] for c in chosen])
        classes_from = "union of the label values found in the ground truth and predictions"

    scorer = _Scorer()
    fg_names = [label_map.names[c] for c in label_map.foreground]
    if not fg_names:
        raise InputError(f"{classes_from}: no foreground class to score (only background declared or found)")
    per_case: dict = {}
    from tqdm import tqdm

    with tqdm(total=len(chosen), desc="evaluate", unit="case", file=sys.stderr, disable=quiet, leave=False) as bar:
        for case in chosen:
            try:
                gt_vol = read_label(gt_files[case], label_map)
                pred_vol = read_label(pred_files[case], label_map)
                check_same_grid(pred_vol, gt_vol, what="ground truth")
            except InputError as exc:
                raise InputError(f"case {case}: {exc}") from None
            spacing = gt_vol.spacing
            entry = {}
            for c, name in zip(label_map.foreground, fg_names):
                p, g = pred_vol.array == c, gt_vol.array == c
                scores = scorer(p, g, spacing)
                scores["empty_gt"] = not bool(g.any())
                scores["empty_pred"] = not bool(p.any())
                entry[name] = scores
            per_case[case] = entry
            bar.update()

    per_class = {}
    for c, name in zip(label_map.foreground, fg_names):
        rows = [per_case[case][name] for case in chosen]
        info = {
            "value": int(label_map.values[c]),
            "n_cases": len(rows),
            "n_empty_gt": sum(r["empty_gt"] for r in rows),
            "n_empty_pred": sum(r["empty_pred"] for r in rows),
            "n_both_empty": sum(r["empty_gt"] and r["empty_pred"] for r in rows),
        }
        for m in METRICS:
            info[m] = _stats([r[m] for r in rows])
        per_class[name] = info
    summary = {m: {name: per_class[name][m]["mean"] for name in fg_names} for m in METRICS}
    mean_fg = {}
    for m in METRICS:
        vals = [v for v in summary[m].values() if v is not None]
        mean_fg[m] = float(np.mean(vals)) if vals else None

    import monai

    result = {
        "command": command,
        "prediction": str(pred),
        "ground_truth": str(gt),
        "ground_truth_kind": gt_kind,
        "classes_from": classes_from,
        "classes": {name: int(v) for name, v in zip(label_map.names, label_map.values)},
        "metrics": {"dice": "MONAI DiceMetric", "jaccard": "MONAI MeanIoU",
                    "hd95": "MONAI HausdorffDistanceMetric(percentile=95), mm",
                    "asd": "MONAI SurfaceDistanceMetric(symmetric=True), mm"},
        "monai_version": monai.__version__,
        "n_cases": len(chosen),
        "unmatched_predictions": unmatched,
        "cases": per_case,
        "per_class": per_class,
        "summary": summary,
        "mean_foreground": mean_fg,
    }
    if out is not None:
        out = Path(out)
        csv_path = out.with_suffix(".csv") if out.suffix.lower() == ".json" else out.with_name(out.name + ".csv")
        _write_csv(csv_path, result, fg_names)
        write_json(out, _jsonable(result))
        result["output"] = {"json": str(out), "csv": str(csv_path)}
    if not quiet:
        print(format_table(result))
        if unmatched:
            print(f"note: {len(unmatched)} prediction file(s) without ground truth were not scored: "
                  + ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else ""))
        if out is not None:
            print(f"wrote {out} and {result['output']['csv']}")
    return result


def _write_csv(path: Path, result: dict, fg_names: list[str]) -> None:
    from .io import atomic_path

    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "class", "value", "dice", "jaccard", "hd95_mm", "asd_mm", "empty_gt", "empty_pred"])
    for case, entry in result["cases"].items():
        for name in fg_names:
            r = entry[name]
            w.writerow([case, name, result["classes"][name], *(_csv_num(r[m]) for m in METRICS),
                        int(r["empty_gt"]), int(r["empty_pred"])])
    for stat in ("mean", "std"):
        for name in fg_names:
            pc = result["per_class"][name]
            w.writerow([stat, name, pc["value"], *(_csv_num(pc[m][stat]) for m in METRICS), "", ""])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _csv_num(x) -> str:
    if x is None:
        return ""
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return repr(float(x))


def format_table(result: dict) -> str:
    """A small text table: per class n, mean ± std of each metric, empty counts."""
    head = f"{'class':<16} {'n':>4} {'Dice':>16} {'Jaccard':>16} {'HD95 mm':>16} {'ASD mm':>16} {'empty gt/pred':>14}"
    lines = [f"{result['n_cases']} case(s); classes from {result['classes_from']}", head, "-" * len(head)]
    for name, pc in result["per_class"].items():
        cells = []
        for m in METRICS:
            s = pc[m]
            cell = "-" if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}"
            if s["n_nan"] or s["n_inf"]:
                cell += "*"
            cells.append(f"{cell:>16}")
        lines.append(f"{name[:16]:<16} {pc['n_cases']:>4} {' '.join(cells)} {pc['n_empty_gt']:>6}/{pc['n_empty_pred']:<7}")
    mf = result["mean_foreground"]
    lines.append(f"{'mean (fg)':<16} {'':>4} " + " ".join(f"{_fmt(mf[m]):>16}" for m in METRICS))
    if any(pc[m]["n_nan"] or pc[m]["n_inf"] for pc in result["per_class"].values() for m in METRICS):
        lines.append("* some cases gave NaN or inf (empty masks) and are left out of that mean; see the JSON counts")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main as cli_main

    sys.exit(cli_main(["evaluate"] + sys.argv[1:]))
