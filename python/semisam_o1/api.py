"""The Python API: one call for a whole run, one for predicting new scans (TotalSegmentator's
``python_api`` style: keyword arguments as on the command line, the paths written returned).

    import semisam_o1
    out = semisam_o1.run(images="scans/", template_image="scans/case_01.nii.gz",
                         template_label="case_01_label.nii.gz", output="work")
    semisam_o1.predict(model=out["model"], input="new_scans/", output="new_labels")

Both are plain functions over the stage functions :func:`semisam_o1.pipeline.run.run` and
:func:`semisam_o1.stages.predict.predict`; the heavy dependencies (torch, ONNX Runtime, ...) are
imported when a stage first needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from semisam_o1.pipeline import run as run_module
from semisam_o1.stages import predict as predict_module


def run(*, images: str | os.PathLike, template_image: str | os.PathLike, template_label: str | os.PathLike,
        output: str | os.PathLike, labels: str | dict | None = None, test_images: str | os.PathLike | None = None,
        test_labels: str | os.PathLike | None = None, preset: str = "cpu", device: str = "auto",
        quiet: bool = False, **options) -> dict:
    """Label a folder of scans from one labelled scan (``semisam-o1 run --images ...``).

    Args:
        images: folder of scans (.nii.gz, .nii, .nrrd, .mha): the cohort.
        template_image, template_label: the labelled scan and its label.
        output: the work folder.
        labels: class names, ``"1=name,2=name"`` or ``{1: "name", 2: "name"}`` (default: the values).
        test_images, test_labels: optional folders to evaluate on.
        preset, device, quiet: as on the command line; ``options``: any other ``run`` option by its
            field name (``rounds=2``, ``max_unlabeled=10``, ...).

    Returns:
        ``{"final": WORK/final, "labels": [label files], "model": the bundle folder (None when
        no round was trained), "report": report.html, "cases": cases.csv}``.

    Raises:
        semisam_o1.core.errors.InputError: a bad input or option (one-line message).
    """

    if isinstance(labels, dict):
        labels = ",".join(f"{int(v)}={n}" for v, n in labels.items())
    settings = run_module.RunSettings(images=images, template_image=template_image, template_label=template_label,
                                      output=output, labels=labels, test_images=test_images,
                                      test_labels=test_labels, preset=preset, device=device, quiet=quiet, **options)
    run_module.run(settings)
    final = Path(output) / "final"
    model = final / "model"
    return {"final": final, "labels": sorted((final / "labels").iterdir()), "model": model if model.is_dir() else None,
            "report": final / "report.html", "cases": final / "cases.csv"}


def predict(*, model: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike,
            device: str = "auto", mirror: bool = False, quiet: bool = False, **options) -> list[Path]:
    """Label new scans with a bundle (``semisam-o1 predict -m MODEL -i INPUT -o OUTPUT``).

    Args:
        model: a bundle (``WORK/final/model``) or a ``train`` model folder.
        input: a folder of scans, one scan, or a dataset folder.
        output: the folder for the labels (each named like its scan).
        device: ``auto``, ``cpu`` or ``cuda``; mirror: test-time mirroring; quiet: no progress bar;
            ``options``: any other ``predict`` option by field name.

    Returns:
        the label files written (or already there from an earlier identical call).

    Raises:
        semisam_o1.core.errors.InputError: a bad input or option (one-line message).
    """

    settings = predict_module.PredictSettings(model=model, input=input, output=output, device=device,
                                              mirror=mirror, quiet=quiet, **options)
    summary = predict_module.predict(settings)
    if "labels" in summary:
        return [Path(p) for p in summary["labels"].values()]
    return [predict_module.label_file(output, c) for c in summary["entropy"]]
