"""The model bundle: a ``train`` model folder (model.pt, config.json, stage.json, train_log.csv)
plus ``bundle.json`` (format, version, round, template, label names and values, normalisation,
spacing, patch, flips, largest-component classes, the network) and, when the run learned one,
``class_planes.json``. ``semisam-o1 predict -m BUNDLE`` needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import copy_atomic, write_json
from semisam_o1.core.version import __version__
from semisam_o1.stages import nets

BUNDLE_JSON = "bundle.json"
BUNDLE_FORMAT = "semisam-o1 bundle 1"
_MODEL_FILES = ("model.pt", "config.json", "stage.json", "train_log.csv")


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

    if not nets.is_finished(model):
        raise InputError(f"{model}: not a finished model; cannot bundle it")
    out.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        if (model / name).is_file():
            copy_atomic(model / name, out / name)
    config = json.loads((model / nets.CONFIG_NAME).read_text())
    if rule is not None:
        copy_atomic(rule, out / "class_planes.json")

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
        InputError: the file exists but is not a bundle, or its labels or patch differ from the
            ``config.json`` beside it.
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
    _check_against_config(path, info)
    return info


def _check_against_config(path: Path, info: dict) -> None:
    """Raise InputError (one line) when ``bundle.json``'s labels or patch differ from the
    ``config.json`` beside it (a config copied from another model); no config: load_model reports."""
    try:
        config = json.loads((path.parent / nets.CONFIG_NAME).read_text())
        labels = dict(zip(config["label_map"]["names"], config["label_map"]["values"]))
        described = {"labels": labels, "patch": config["patch"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    for key, value in described.items():
        if info.get(key) != value:
            raise InputError(f"{path}: {key} {info.get(key)} != {nets.CONFIG_NAME}'s {value}; "
                             f"{BUNDLE_JSON} and {nets.CONFIG_NAME} come from different models")


def bundle_rule(model: Path) -> Path | None:
    """The class-planes rule file a bundle carries, or None."""
    info = read_bundle(model)
    if info and info.get("class_planes"):
        return Path(model) / info["class_planes"]
    return None


# --------------------------------------------------------------------------- quality score


# --------------------------------------------------------------------------- WORK/final


