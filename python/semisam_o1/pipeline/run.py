"""Run the whole SemiSAM-O1 loop: encode, propagate, R rounds of train / predict / refine, evaluate, report.

Layout of the work folder (every stage writes its own sub-folder with its record,
``stage.json``, which holds the command that reproduces that stage alone; a re-run
calls every stage again and each returns at once when its record says it finished,
so a killed run resumes where it stopped, and the stages skip finished cases)::

    WORK/
      run.json                  the run's own settings (a re-run with other settings is refused;
                                --rounds may grow) and the seconds of every stage
      features/                 encode: feature store of template + unlabeled pool
      round0/pseudo/            propagate: round-0 pseudo-labels (and class_planes.json when the
                                template's classes are separated by planes: every prediction
                                then gets the same structure, see semisam_o1.methods.class_planes)
      round{r}/model/           train (from scratch) on round{r-1}/pseudo
      round{r}/pred/            predict the unlabeled pool: labels + entropy maps
      round1/selection.json     with --select < 1: agreement of every pool case's round-0 label
                                with round 1's prediction, and the cases kept
      round{r}/pseudo/          refine: round-r pseudo-labels (with --refine-mode none, and in the
                                last round, the predictions themselves)
      round{r}/test/            predict the test cases with round r's model
      round{r}/test_metrics.json  evaluate round r's test predictions
      referee/                  the template's label registered to every pool case (--referee)
      round{r}/round.json       label-free evidence of round r: its labels' agreement with the
                                referee, the network's fit to its training labels, the change
      final/                    the kept round's labels, model bundle, cases.csv, report page
      report.json, report_dice_by_round.png, report_montage.png

A re-run whose inputs changed under it (a feature folder, or one case's features, deleted: encode
writes them again) says what it redid, and every stage downstream redoes the work whose inputs
changed (propagate only the cases whose features changed; a network whose training labels changed
is trained again, ...: ``redo_changed``, :func:`semisam_o1.core.resume.open_stage`), and so do the
files ``run`` derives from them (the referee's reliability, the case selection, the test metrics).

The rounds stop early when a round's labels do not agree better with the referee than the
best earlier round's, and the labels and model handed back are the best round's
(:mod:`semisam_o1.pipeline.rounds`, label-free); ``report.json`` gives per round the test-set
Dice, Jaccard, HD95 and ASD per class and the seconds per stage. As a diagnostic, and
only in the report, it also scores each round's pseudo-labels on the unlabeled pool
against the real labels where they exist; no stage ever reads those labels.

Method: SemiSAM-O1 (Zhang et al., arXiv 2604.24109, 2026).
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import shutil
import time
from pathlib import Path

from semisam_o1.core.device import resolve_device
from semisam_o1.core.engine import EngineOptions
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path, sweep_temporaries, write_json
from semisam_o1.core.resume import FolderLock, check_output_dir, read_record, result_settings
from semisam_o1.core.settings import ComputeOptions, as_dict, check_range, command_line, forwarded, option
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.folder_input import (
    DATASET,
    FolderInput,
    NnUNet2DInput,
    materialise,
    name_sources,
    nnunet_2d_ending,
)
from semisam_o1.data.images import read_label
from semisam_o1.methods.class_planes import CLASS_PLANES_JSON
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.methods.registration import POSITION_RULE, position_check, registration_labels
from semisam_o1.pipeline.final import write_final
from semisam_o1.pipeline.referee import POSITION_JSON, check_referee, summary_line
from semisam_o1.pipeline.report import write_report
from semisam_o1.pipeline.rounds import choose_round, criterion, keep_going, round_evidence
from semisam_o1.pipeline.selection import SELECTION_JSON, select_by_agreement
from semisam_o1.pipeline.validate import validate_run
from semisam_o1.stages import encode, evaluate, plan, predict, propagate, refine, train
from semisam_o1.stages.plan import encode_overrides, read_plan
from semisam_o1.stages.predict import label_file
from semisam_o1.stages.propagate import PropagateSettings
from semisam_o1.stages.refine import MODES as REFINE_MODES
from semisam_o1.stages.refine import RefineSettings
from semisam_o1.stages.train import TrainSettings

# Presets of the whole loop: cohort size, rounds, and the UNet's training time per round. With
# ``plan="auto"`` the network is planned from the data (semisam_o1.stages.plan: working spacing, patch,
# depth, iterations from ``budget_minutes``); ``unet`` (semisam_o1.stages.nets.PRESETS) then gives only the
# optimiser and inference settings. ``quick`` keeps a fixed tiny network (seconds, for tests).
RUN_PRESETS = {
    "quick": dict(rounds=1, max_unlabeled=3, max_test=2, unet="quick", plan="off", budget_minutes=None),
    "demo": dict(rounds=2, max_unlabeled=20, max_test=20, unet="cpu", plan="auto", budget_minutes=4.0),
    "cpu": dict(rounds=3, max_unlabeled=None, max_test=None, unet="cpu", plan="auto", budget_minutes=8.0),
    "paper": dict(rounds=3, max_unlabeled=None, max_test=None, unet="paper", plan="auto", budget_minutes=30.0),
}
SETTINGS_JSON = "run.json"


@dataclasses.dataclass(kw_only=True)
class RunSettings(ComputeOptions, EngineOptions):
    """Settings of ``semisam-o1 run``; None fields take the preset's value."""

    input: Path | None = option(None, "MSD / nnU-Net dataset folder (imagesTr/, labelsTr/, dataset.json; an nnU-Net "
                                "v2 2D one, file_ending .png / .jpg / .bmp / .tif, is converted into WORK/dataset); "
                                "or give --images, --template-image and --template-label instead",
                                flags=("-i", "--input"), type=Path, metavar="DATASET")
    split: Path | None = option(None, "split JSON with 'template', 'unlabeled' and 'test' (with -i)", type=Path,
                                metavar="FILE")
    images: Path | None = option(None, "a plain folder of scans (.nii.gz, .nii, .nrrd, .mha) or of 2D images (.png, .jpg, .bmp, .tif): the cohort to label "
                                 "(instead of -i and --split; written as an MSD dataset into WORK/dataset)",
                                 type=Path, metavar="DIR")
    template_image: Path | None = option(None, "with --images: the one labelled scan (inside DIR or not)",
                                         type=Path, metavar="FILE")
    template_label: Path | None = option(None, "with --images: the template's label, on its image's grid",
                                         type=Path, metavar="FILE")
    labels: str | None = option(None, "with --images: class names, VALUE=NAME,... (default: each label value "
                                "of the template names its class)", metavar="1=NAME,2=NAME")
    test_images: Path | None = option(None, "with --images: a folder of scans to evaluate the model on (needs "
                                      "--test-labels, files named like their images)", type=Path, metavar="DIR")
    test_labels: Path | None = option(None, "with --test-images: their labels", type=Path, metavar="DIR")
    pixel_size: Path | None = option(None, "with --images of 2D files (PNG, JPEG, BMP, TIFF): a CSV of CASE,"
                                     "PIXEL_SIZE_MM for every image (HD95 / ASD in mm); without it distances are "
                                     "in pixels", type=Path, metavar="CSV")
    modality: str | None = option(None, "with --images: the scans' modality as dataset.json names it (CT, MRI, "
                                  "MR, T1, T2, ...); CT selects CT's fixed-window normalisation. Default: "
                                  "unknown, and the plan recognises CT from the template's intensities (1st "
                                  "percentile <= -900 HU: air; integer values; 99th percentile <= 4000)",
                                  metavar="NAME")
    output: Path = option(help="work folder: every stage's output, report.json and pictures",
                          flags=("-o", "--output"), type=Path, metavar="WORK", neutral=True)
    preset: str = option("cpu", "quick: tests (3 unlabeled, 2 test cases, 1 round, seconds of training); "
                         "demo: 20 unlabeled, 20 test cases, 2 rounds of 4 minutes of UNet training (under 30 "
                         "minutes on 2 cores); cpu: the whole split, 3 rounds of 8 minutes; paper: the whole "
                         "split, 3 rounds of 30 minutes (a GPU's); the network is planned from the data for each (with --images the cases are every image of DIR and --test-images, whatever "
                         "the preset)", choices=tuple(RUN_PRESETS))
    rounds: int | None = option(None, "rounds of train / predict / refine (default: the preset's; may grow on a "
                                "re-run)", type=int, neutral=True)
    max_unlabeled: int | None = option(None, "use only the first N cases of the unlabeled pool", type=int,
                                       metavar="N")
    max_test: int | None = option(None, "evaluate only the first N test cases", type=int, metavar="N")
    iterations: int | None = forwarded(TrainSettings, "iterations", help="UNet optimiser steps per round (default: "
                                       "the plan's, from the time budget; with --plan off the UNet preset's)")
    ssl: str = forwarded(TrainSettings, "ssl")
    refine_mode: str = forwarded(RefineSettings, "mode", "none", flags=("--refine-mode",),
                                 choices=("none", *REFINE_MODES),
                                 help="between rounds: voxel (the paper's kNN relabelling of uncertain voxels), "
                                      "volume (the official code's), or none: the network's predictions are the "
                                      "next pseudo-labels (docs/experiments.md)")
    refine_k: int = forwarded(RefineSettings, "k", flags=("--refine-k",))
    refine_quantile: float = forwarded(RefineSettings, "quantile", flags=("--refine-quantile",))
    select: float = option(1.0, "rounds after the first train on the template plus this fraction of the "
                           "pool whose round-0 pseudo-labels agree best (Dice) with round 1's prediction; 1 keeps "
                           "every case", metavar="FRACTION")
    template_share: float | None = forwarded(TrainSettings, "template_share")
    spatial_aug: float = forwarded(TrainSettings, "spatial_aug")
    class_planes: str = forwarded(PropagateSettings, "class_planes", help="auto: if the template's foreground "
                                  "classes follow each other along one axis, separated by planes, every pseudo-label "
                                  "and prediction gets the same structure")
    plan: str | None = option(None, "auto: plan the UNet from the data first (semisam-o1 plan into WORK/plan.json: "
                       "working spacing from the cohort's spacings and the template's thinnest class, patch from "
                       "the median image shape shrunk to a voxel budget, strides from the spacing, iterations "
                       "from --budget-minutes at a fixed reference rate (the same plan on every machine), flips "
                       "and normalisation from the template and modality) instead of the preset's network; "
                       "default: the preset's (off only for quick)", choices=("off", "auto"))
    budget_minutes: float | None = option(None, "with --plan auto: UNet training minutes per round on the "
                                          "reference CPU (semisam_o1.stages.plan.REFERENCE_VOXELS_PER_SECOND; "
                                          "plan.json 'estimate' gives this machine's; default: the preset's)",
                                          type=float, metavar="MIN")
    position: str = option("auto", "the position term of the round-0 vote (propagate --position-weight): auto: on "
                           "when the template registered to every pool case shows the structure at a consistent "
                           "place in the volumes' boxes (semisam_o1.methods.registration.position_check; "
                           "WORK/referee/position.json), off otherwise; on; off", choices=("auto", "on", "off"))
    referee: str = option("registration", "label-free choice of the round handed back and early stopping: "
                          "registration: each round's pool labels are compared with the template's label warped "
                          "to every pool case (ANTs SyN), over the cases where the registration beats the pasted "
                          "template (semisam_o1.pipeline.referee); when most do not, the rounds train without "
                          "the template's label and are scored on it; none: every round runs and the last one "
                          "is kept (a finished run may be re-run with another value; where the registration "
                          "proved unreliable its rounds then train again)", choices=("registration", "none"),
                          neutral=True)
    seed: int = option(0, "seed of every random stream (independent streams per round: semisam_o1.core.seeds)")

    def __post_init__(self):
        super().__post_init__()
        self.output = Path(self.output)
        self._check_input_kind()
        preset = RUN_PRESETS.get(self.preset)
        if preset is None:
            raise InputError(f"--preset {self.preset}: choose one of {', '.join(RUN_PRESETS)}")
        for key in ("rounds", "max_unlabeled", "max_test", "plan", "budget_minutes"):
            if key in ("max_unlabeled", "max_test") and self.images is not None:
                continue  # with --images the cohort is every image of the folder
            if getattr(self, key) is None:
                setattr(self, key, preset[key])
        check_range("rounds", self.rounds, 1)
        check_range("max_unlabeled", self.max_unlabeled, 0)
        check_range("max_test", self.max_test, 0)
        check_range("iterations", self.iterations, 1)
        check_range("select", self.select, 0.0, 1.0, lo_open=True)
        if self.template_share is not None and self.template_share < 0:
            self.template_share = None  # as train: negative means every volume equally likely
        check_range("template_share", self.template_share, 0.0, 1.0, hi_open=True)
        check_range("spatial_aug", self.spatial_aug, 0.0, 1.0)
        check_range("refine_k", self.refine_k, 1)
        check_range("refine_quantile", self.refine_quantile, 0.0, 1.0, hi_open=True)
        if self.budget_minutes is not None:
            check_range("budget_minutes", self.budget_minutes, 0.0, lo_open=True)
        if self.plan == "auto" and self.budget_minutes is None:
            raise InputError("--plan auto needs --budget-minutes MIN (the quick preset has none)")

    def _check_input_kind(self) -> None:
        """Either ``-i DATASET --split FILE`` or ``--images DIR --template-image FILE --template-label
        FILE``; with the latter, ``input`` / ``split`` become ``WORK/dataset`` and its split."""

        for key in ("input", "split", "images", "template_image", "template_label", "test_images", "test_labels",
                    "pixel_size"):
            if getattr(self, key) is not None:
                setattr(self, key, Path(getattr(self, key)))
        if self.images is None:
            extra = [k for k in ("template_image", "template_label", "labels", "test_images", "test_labels",
                                 "modality", "pixel_size") if getattr(self, k) is not None]
            if extra:
                raise InputError(f"--{extra[0].replace('_', '-')} goes with --images DIR")
            if self.input is None or self.split is None:
                raise InputError("give -i DATASET and --split FILE, or --images DIR with --template-image FILE "
                                 "and --template-label FILE")
            return
        derived = self.output / DATASET
        if self.input not in (None, derived) or self.split not in (None, derived / "splits.json"):
            raise InputError("--images replaces -i and --split: give one or the other")
        if self.template_image is None:
            raise InputError("--images needs --template-image FILE (the labelled scan) and --template-label FILE")
        if self.template_label is None:
            raise InputError(f"--template-image {self.template_image}: needs its label, --template-label FILE")
        self.input, self.split = derived, derived / "splits.json"

    @property
    def folder_input(self):
        """What ``WORK/dataset`` is made from: the plain-folder inputs (a
        :class:`semisam_o1.data.folder_input.FolderInput`), an nnU-Net v2 2D dataset given as ``-i`` (a
        :class:`semisam_o1.data.folder_input.NnUNet2DInput`), or None (``-i`` a NIfTI dataset, read as it is)."""
        if self.images is None:
            if nnunet_2d_ending(self.input) is not None:
                return NnUNet2DInput(root=self.input, split=self.split)
            return None

        return FolderInput(images=self.images, template_image=self.template_image,
                           template_label=self.template_label, labels=self.labels,
                           test_images=self.test_images, test_labels=self.test_labels, modality=self.modality,
                           pixel_size=self.pixel_size)

    @property
    def dataset(self) -> Path:
        """The dataset folder the stages read: ``-i``, or ``WORK/dataset`` where ``run`` converts the
        input (``--images``, an nnU-Net v2 2D ``-i``)."""
        return self.input if self.folder_input is None else self.output / DATASET

    @property
    def unet(self) -> str:
        return RUN_PRESETS[self.preset]["unet"]

    @property
    def selecting(self) -> bool:
        """Case selection happens (it needs a round after the first)."""
        return self.select < 1.0 and self.rounds > 1


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Cohort:
    """The cases of one run: the template, the unlabeled pool and the test cases."""

    template: str
    unlabeled: list[str]
    test: list[str]


def case_lists(dataset, settings: RunSettings) -> Cohort:
    """The run's cases from its split file, limited by ``max_unlabeled`` / ``max_test``.

    Raises:
        InputError: the split lacks a subset, names an unknown case, or the template has no label.
    """

    sp = load_split(settings.split)
    for key in ("template", "unlabeled", "test"):
        if key not in sp:
            raise InputError(f"{settings.split}: split has no {key!r}")
    template = sp["template"]
    unlabeled = [c for c in sp["unlabeled"] if c != template]
    test = list(sp["test"])
    if settings.max_unlabeled is not None:
        unlabeled = unlabeled[:settings.max_unlabeled]
    if settings.max_test is not None:
        test = test[:settings.max_test]
    dataset.select(cases=[template] + unlabeled + test)  # raises for unknown case ids
    dataset.label_path(template)  # the one label the method needs
    return Cohort(template, unlabeled, test)


def check_settings(work: Path, settings: RunSettings) -> None:
    """Refuse to resume ``work`` with settings that differ from the ones it was started with
    (``rounds`` may differ: later rounds only add stages). InputError naming the file."""

    path = work / SETTINGS_JSON
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable run settings ({exc}); delete it to start over") from None
    now = result_settings(settings)
    for key, value in now.items():
        if key in before and before[key] != value:
            raise InputError(f"{path}: this work folder was started with {key}={before[key]!r}, this run asks "
                             f"for {value!r}; use a new -o folder (finished stages would be reused as they are)")


# --------------------------------------------------------------------------- stages


class Stages:
    """Calls stage functions with their settings, prints each stage's command and what it did,
    and keeps the seconds of the stages that did work (``run.json``) and the names of those that
    did work in this call (``worked``: what ``run`` derives from their outputs is derived again)."""

    def __init__(self, work: Path, settings: RunSettings):
        self.work = work
        self.settings = settings
        self.times: dict[str, float] = {}
        self.worked: set[str] = set()
        path = work / SETTINGS_JSON
        if path.is_file():
            self.times = dict(json.loads(path.read_text()).get("seconds", {}))

    def save(self) -> None:
        write_json(self.work / SETTINGS_JSON, {"command": command_line("run", self.settings),
                                               "settings": result_settings(self.settings),
                                               "all_settings": as_dict(self.settings), "seconds": self.times})

    def call(self, name: str, command: str, module, stage_settings, folder: Path):
        """Run ``module.STAGE(stage_settings)`` as stage ``name`` writing into ``folder``;
        returns its summary. A stage whose record says it finished returns at once."""

        before = read_record(folder) if folder.is_dir() else None
        line = command_line(command, stage_settings)
        t0 = time.perf_counter()
        print(f"[run] {name}: {line}", flush=True)
        summary = module.STAGE(stage_settings)
        seconds = time.perf_counter() - t0
        after = read_record(folder) if folder.is_dir() else None
        same = bool(before and after and after.get("signature") == before.get("signature"))
        redone = _redone(summary, after, same, earlier=name in self.times or bool(before and before.get("finished")))
        if same and before.get("finished") and not redone:
            print(f"[run] {name}: done earlier ({self.times.get(name, 0):.0f} s), skipped", flush=True)
        else:
            self.worked.add(name)
            self.times[name] = seconds
            self.save()
            print(f"[run] {name}: {redone + ', ' if redone else ''}finished in {seconds:.0f} s", flush=True)
        return summary


def _redone(summary, after: dict | None, same: bool, earlier: bool) -> str:
    """What a stage that had finished before redid in this call, in words ('' when nothing): encode's
    cases written again (their features deleted or damaged), or the work of a stage whose inputs
    changed (its record's ``redone``, :func:`semisam_o1.core.resume.open_stage`)."""
    summary = summary if isinstance(summary, dict) else {}
    if "encoded" in summary:  # encode, whose record does not change when it writes a case again
        if not earlier or not summary["encoded"]:
            return ""
        damaged = len(summary.get("damaged") or {})
        parts = [(n, why) for n, why in ((summary["encoded"] - damaged, "were missing"),
                                         (damaged, "did not verify")) if n]
        return "; ".join(f"{n} case{'s' if n > 1 else ''} re-encoded ({'their' if n > 1 else 'its'} features {why})"
                         for n, why in parts)
    redone = (after or {}).get("redone")
    if same or not redone:
        return ""
    keys = ", ".join(redone["changed"][:3]) + (" ..." if len(redone["changed"]) > 3 else "")
    if redone["cases"] == "all":
        return f"redone (its inputs changed: {keys})"
    n = len(redone["cases"])
    return f"{n} case{'s' if n > 1 else ''} redone ({'their' if n > 1 else 'its'} inputs changed: {keys})"


def _compute(settings: RunSettings) -> dict:
    return dict(device=settings.device, threads=settings.threads, quiet=settings.quiet)


def _engine(settings: RunSettings) -> dict:
    """The --engine options, for the stages that take them (encode, predict: semisam_o1.core.engine)."""
    return dict(engine=settings.engine, ray_address=settings.ray_address, workers=settings.workers)


def _encode(stages: Stages, s: RunSettings, cohort: Cohort, work: Path, plan: Path | None) -> Path:
    feats = work / "features"
    if plan is None:
        planned = {}
    else:
        planned = encode_overrides(read_plan(plan))
    stages.call("encode", "encode", encode,
                encode.SETTINGS(input=s.dataset, output=feats, cases=(cohort.template, *cohort.unlabeled),
                                **planned, **_compute(s), **_engine(s)), feats)
    return feats


def _propagate(stages: Stages, s: RunSettings, cohort: Cohort, work: Path, feats: Path,
               position: bool) -> Path | None:
    """Round-0 pseudo-labels; returns the class-planes rule file when one was learned."""

    out = work / "round0" / "pseudo"
    weight = {} if position else {"position_weight": 0.0}
    stages.call("propagate", "propagate", propagate,
                propagate.SETTINGS(input=s.dataset, features=feats, template=cohort.template, output=out,
                                   cases=tuple(cohort.unlabeled), class_planes=s.class_planes, **weight,
                                   redo_changed=True, **_compute(s)), out)
    rule = out / CLASS_PLANES_JSON
    return rule if rule.is_file() else None


def _plan(stages: Stages, s: RunSettings) -> Path | None:
    """``WORK/plan.json`` (with ``--plan auto``; planned once, reused on a re-run)."""
    if s.plan == "off":
        return None

    path = stages.work / "plan.json"
    if not path.is_file():
        settings = plan.SETTINGS(input=s.dataset, split=s.split, output=path, budget_minutes=s.budget_minutes,
                                 device=s.device, threads=s.threads, quiet=s.quiet)
        print(f"[run] plan: {command_line('plan', settings)}", flush=True)
        plan.STAGE(settings)
    return path


def _train(stages: Stages, s: RunSettings, cohort: Cohort, r: int, cases: list[str], plan: Path | None,
           hold_out_template: bool = False) -> Path:
    """Round ``r``'s network; ``hold_out_template``: trained without the template's label (the
    fallback criterion of :mod:`semisam_o1.pipeline.referee` scores it on the template)."""
    rd = stages.work / f"round{r}"
    model = rd / "model"
    stages.call(f"round{r}/train", "train", train,
                train.SETTINGS(input=s.dataset, labels=stages.work / f"round{r - 1}" / "pseudo",
                               template=cohort.template, cases=(cohort.template, *cases), output=model,
                               ssl=s.ssl, confidence=_confidence(stages, s, r), preset=s.unet,
                               iterations=s.iterations,
                               template_share=0.0 if hold_out_template else s.template_share,
                               spatial_aug=s.spatial_aug, seed=s.seed, round=r,
                               plan=plan, redo_changed=True,
                               **_compute(s)), model)
    return model


def _confidence(stages: Stages, s: RunSettings, r: int) -> Path | None:
    """With ``--ssl w2s``, round ``r``'s pseudo-labels are weighted by the entropy maps of round
    ``r - 1``'s predictions (``round{r-1}/pred``); round 1 trains on round 0's labels, whose vote
    shares are not kept, so every voxel weighs 1 there."""
    if s.ssl != "w2s" or r < 2:
        return None
    return stages.work / f"round{r - 1}" / "pred"


def _predict(stages: Stages, s: RunSettings, name: str, model: Path, out: Path, cases: list[str],
             rule: Path | None) -> None:
    stages.call(name, "predict", predict,
                predict.SETTINGS(input=s.dataset, model=model, output=out, cases=tuple(cases), class_planes=rule,
                                 redo_changed=True, **_compute(s), **_engine(s)), out)


def _refine(stages: Stages, s: RunSettings, cohort: Cohort, r: int, feats: Path, rule: Path | None) -> None:
    """Round r's pseudo-labels: refined predictions, or the predictions themselves (``--refine-mode
    none``, and the last round, whose labels nothing trains on)."""
    rd = stages.work / f"round{r}"
    if s.refine_mode == "none" or r == s.rounds:
        copy_labels(rd / "pred", rd / "pseudo", cohort.unlabeled)
        return

    stages.call(f"round{r}/refine", "refine", refine,
                refine.SETTINGS(input=s.dataset, features=feats, pred=rd / "pred", output=rd / "pseudo",
                                template=cohort.template, cases=tuple(cohort.unlabeled), mode=s.refine_mode,
                                k=s.refine_k, quantile=s.refine_quantile, seed=s.seed, class_planes=rule,
                                redo_changed=True, **_compute(s)),
                rd / "pseudo")


def _select(dataset, stages: Stages, s: RunSettings, cohort: Cohort) -> list[str]:
    """The pool cases the rounds after the first train on (``round1/selection.json``; made again when
    the labels it compares were written in this call)."""

    work = stages.work
    path = work / "round1" / SELECTION_JSON
    if not path.is_file() or stages.worked & {"propagate", "round1/predict"}:
        print(f"[run] round1/select: keep the {s.select:g} of the pool whose round-0 pseudo-labels agree best "
              "with round 1's prediction", flush=True)
        select_by_agreement(dataset, work / "round0" / "pseudo", work / "round1" / "pred", cohort.unlabeled,
                            s.select, output=path)
    try:
        return list(json.loads(path.read_text())["selected"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: cannot read the case selection ({exc}); delete it to redo it") from None


def _evaluate(stages: Stages, s: RunSettings, cohort: Cohort, r: int) -> None:
    rd = stages.work / f"round{r}"
    out = rd / "test_metrics.json"
    if out.is_file() and f"round{r}/predict_test" not in stages.worked:
        return
    print(f"[run] round{r}/evaluate", flush=True)
    evaluate.STAGE(evaluate.SETTINGS(input=rd / "test", gt=s.dataset, cases=tuple(cohort.test), output=out,
                                     quiet=True))


def copy_labels(src: Path, dst: Path, cases: list[str]) -> None:
    """Copy the label files of ``cases`` from ``src`` to ``dst`` (atomically; those missing or, the
    prediction being redone, different)."""

    dst.mkdir(parents=True, exist_ok=True)
    for case in cases:
        f = find_case_file(src, case, what="prediction")
        target = dst / f.name
        if not target.exists() or not filecmp.cmp(f, target, shallow=False):
            with atomic_path(target) as tmp:
                shutil.copyfile(f, tmp)


def _position(stages: Stages, s: RunSettings, dataset, cohort: Cohort) -> bool:
    """Whether the round-0 vote uses its position term (``--position``); with ``auto`` the evidence
    goes to ``WORK/referee/position.json`` (the registrations are the referee's)."""
    if s.position != "auto":
        return s.position == "on"

    path = stages.work / "referee" / POSITION_JSON
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("rule") == POSITION_RULE:  # else decided by an earlier rule: decide again (warps cached)
            return bool(cached["applies"])
    t0 = time.perf_counter()
    # registers the template to every pool case into the referee's cache (one ITK thread, as _referee;
    # --threads cases at once)
    check = position_check(dataset, cohort.template, list(cohort.unlabeled), stages.work / "referee", threads=1,
                           workers=s.threads, quiet=s.quiet)
    stages.times.setdefault("position", time.perf_counter() - t0)
    write_json(path, check)
    print(f"[run] position term: {check['reason']}", flush=True)
    return bool(check["applies"])


def _template_dice(stages: Stages, s: RunSettings, dataset, cohort: Cohort, r: int, model: Path,
                   rule: Path | None) -> float:
    """Round ``r``'s network (trained without the template's label) scored on the template."""
    out = stages.work / f"round{r}" / "template"
    _predict(stages, s, f"round{r}/predict_template", model, out, [cohort.template], rule)
    lm = dataset.label_map
    truth = dataset.read_label(cohort.template)
    pred = read_label(label_file(out, cohort.template), lm, reference=truth)
    return float(mean_dice(pred.array, truth.array, lm.foreground))


def _check_referee(dataset, cohort: Cohort, stages: Stages, referee: Path | None) -> str:
    """The referee's reliability (``WORK/referee/reliability.json``, checked again when the round-0
    labels were written in this call; one terminal line); returns the round rule's criterion
    (:func:`semisam_o1.pipeline.rounds.criterion`)."""
    if referee is None:
        return "none"
    work = stages.work
    info = check_referee(dataset, cohort.template, cohort.unlabeled, referee, work / "round0" / "pseudo",
                         again="propagate" in stages.worked)
    print(f"[run] {summary_line(info)}", flush=True)
    if not info["reliable"] and (work / "referee" / POSITION_JSON).is_file():
        print("[run] position term: WARNING: --position auto decided it from these registrations, which the "
              "round-0 labels show unreliable; compare with --position on / off", flush=True)
    return criterion(work)


def _referee(stages: Stages, s: RunSettings, dataset, cohort: Cohort) -> Path | None:
    """``WORK/referee``: the template's label registered to every pool case (``--referee``)."""
    if s.referee == "none":
        return None

    out = stages.work / "referee"
    print(f"[run] referee: the template's label registered to {len(cohort.unlabeled)} pool cases", flush=True)
    t0 = time.perf_counter()
    # one ITK thread: warps are then identical from run to run (two threads differ by up to a voxel);
    # --threads cases at once (default: the available CPUs), each still on one thread
    paths = registration_labels(dataset, cohort.template, list(cohort.unlabeled), out, threads=1,
                                workers=s.threads, quiet=s.quiet)
    stages.times.setdefault("referee", time.perf_counter() - t0)
    return next(iter(paths.values())).parent if paths else None


def _rounds(dataset, stages: Stages, s: RunSettings, cohort: Cohort, feats: Path, rule: Path | None,
            plan: Path | None, referee: Path | None) -> tuple[int, list[str] | None]:
    """Rounds 1..R of train / predict / refine / evaluate, stopping early when a round does not
    help (:func:`semisam_o1.pipeline.rounds.keep_going`); returns ``(rounds done, selected cases or None)``."""

    train_cases = list(cohort.unlabeled)
    round_evidence(dataset, stages.work, 0, cohort.unlabeled, referee)
    held_out = _check_referee(dataset, cohort, stages, referee) == "template"
    done = 0
    for r in range(1, s.rounds + 1):
        rd = stages.work / f"round{r}"
        model = _train(stages, s, cohort, r, train_cases, plan, hold_out_template=held_out)
        template_dice = _template_dice(stages, s, dataset, cohort, r, model, rule) if held_out else None
        _predict(stages, s, f"round{r}/predict", model, rd / "pred", cohort.unlabeled, rule)
        _refine(stages, s, cohort, r, feats, rule)
        if r == 1 and s.selecting:
            train_cases = _select(dataset, stages, s, cohort)
        if cohort.test:
            _predict(stages, s, f"round{r}/predict_test", model, rd / "test", cohort.test, rule)
            _evaluate(stages, s, cohort, r)
        trained = train_cases if r > 1 else list(cohort.unlabeled)
        round_evidence(dataset, stages.work, r, cohort.unlabeled, referee, trained_on=trained,
                       template_dice=template_dice)
        done = r
        if r < s.rounds and not keep_going(stages.work, r):
            why = (f"its network scores no better on the held-out template than round {r - 1}'s" if held_out else
                   f"by the referee, its labels are worse than round 0's or no better than round {r - 1}'s")
            print(f"[run] round{r}: {why} (semisam_o1.pipeline.rounds): no further rounds", flush=True)
            break
    return done, (train_cases if s.selecting else None)


def run(settings: RunSettings) -> dict:
    """Run the whole SemiSAM-O1 loop and write ``WORK/report.json`` and its pictures.

    Args:
        settings: the run's settings (see ``semisam-o1 run --help``).

    Returns:
        the report dict (also in ``WORK/report.json``).

    Raises:
        InputError: bad dataset, split, inputs or output folder, or a stage that raised one
            (nothing is written before the inputs are checked).
        ReportedError: a stage that printed its own error lines.
    """

    s = settings
    work = check_output_dir(s.output, "work folder")
    resolve_device(s.device)  # --device cuda without a GPU: refused before anything is written
    dataset, cohort = _checked_inputs(s, work)
    with FolderLock(work):
        sweep_temporaries(work)  # WORK's own files and a killed materialise's WORK/dataset; stages sweep theirs
        stages = Stages(work, s)
        stages.save()
        plan = _plan(stages, s)
        feats = _encode(stages, s, cohort, work, plan)
        position = _position(stages, s, dataset, cohort)
        rule = _propagate(stages, s, cohort, work, feats, position)
        referee = _referee(stages, s, dataset, cohort)
        done, selected = _rounds(dataset, stages, s, cohort, feats, rule, plan, referee)
        choice = choose_round(work, done)
        report = _report(dataset, stages, s, cohort, rule, selected, done, choice)
        _final(dataset, stages, s, cohort, rule, choice)
        return report


def _validated(s: RunSettings, work: Path) -> tuple[Dataset, Cohort]:
    """The dataset and the run's cases, every input read and checked (:func:`validate_run`)."""
    dataset = Dataset(s.dataset)
    cohort = case_lists(dataset, s)
    check_settings(work, s)
    validate_run(dataset, cohort.template, cohort.unlabeled, cohort.test, work, rounds=s.rounds,
                 quiet=s.quiet)
    return dataset, cohort


def _checked_inputs(s: RunSettings, work: Path) -> tuple[Dataset, Cohort]:
    """:func:`_validated`; with ``--images``, on the ``WORK/dataset`` made from the folder first. A
    failed check names the user's file (not its link under ``WORK/dataset``) and removes the
    ``WORK/dataset`` (and ``WORK``) this call made, so the same command runs once the file is fixed."""
    if s.folder_input is None:
        return _validated(s, work)
    made_work, made_dataset = not work.exists(), not (work / DATASET).exists()
    try:
        materialise(s.folder_input, work)
        return _validated(s, work)
    except InputError as exc:
        message = name_sources(str(exc), work / DATASET)
        if made_dataset:
            shutil.rmtree(work / DATASET, ignore_errors=True)
        if made_work and work.is_dir() and not any(work.iterdir()):
            work.rmdir()
        raise InputError(message) from None


def _report(dataset, stages: Stages, s: RunSettings, cohort: Cohort, rule: Path | None,
            selected: list[str] | None, done: int, choice: tuple[int, int, str]) -> dict:
    """Write ``WORK/report.json`` and its pictures; returns the report."""

    work = stages.work
    report = write_report(work, dataset, template=cohort.template, unlabeled=cohort.unlabeled, test=cohort.test,
                          rounds=done, times=stages.times,
                          config=dict(_report_config(s), class_planes_rule=json.loads(rule.read_text()) if rule else None),
                          selected=selected, chosen=choice)
    print(f"[run] report: {work / 'report.json'}", flush=True)
    return report


def _report_config(s: RunSettings) -> dict:
    return dict(as_dict(s), unet=s.unet)


def _final(dataset, stages: Stages, s: RunSettings, cohort: Cohort, rule: Path | None,
           choice: tuple[int, int, str]) -> None:
    """``WORK/final``: the kept round's labels under the images' own names, the model bundle,
    the per-case quality table and the report page (:mod:`semisam_o1.stages.bundle`)."""

    labels, model, reason = choice
    out = write_final(stages.work, dataset, template=cohort.template, unlabeled=cohort.unlabeled, round_=labels,
                      model_round=model, reason=reason, rule=rule, settings=_report_config(s))
    print(f"[run] final: labels of round {labels}, model of round {model} ({reason}) -> {out}", flush=True)


SETTINGS = RunSettings
STAGE = run
