"""Run the whole SemiSAM-O1 loop: encode, propagate, R rounds of train / predict / refine, evaluate, report.

Layout of the work folder (every stage writes its own sub-folder and is skipped on
a re-run once its completion marker ``.done/<stage>.json`` exists, so a killed run
resumes where it stopped; the stages themselves also skip finished cases)::

    WORK/
      features/                 encode: feature store of template + unlabeled pool
      round0/pseudo/            propagate: round-0 pseudo-labels (and class_planes.json when the
                                template's classes are separated by planes: every prediction
                                then gets the same structure, see semisam_o1.class_planes)
      round{r}/model/           train (from scratch) on round{r-1}/pseudo
      round{r}/pred/            predict the unlabeled pool: labels + entropy maps
      round1/selection.json     select (with --select < 1): agreement of every pool case's
                                round-0 label with round 1's prediction; the cases kept
      round{r}/pseudo/          refine: round-r pseudo-labels (the last round: its
                                predictions, since nothing trains on them)
      round{r}/test/            predict the test cases with round r's model
      round{r}/test_metrics.json  evaluate round r's test predictions
      report.json, report_dice_by_round.png, report_montage.png
      run.json                  the settings the folder was started with; a re-run with
                                other settings (but --rounds) is refused

The final model is the last round's; ``report.json`` gives per round the test-set
Dice, Jaccard, HD95 and ASD per class, the voxels changed by refinement and the
seconds per stage. As a diagnostic, and only in the report, it also scores each
round's pseudo-labels on the unlabeled pool against the real labels where they
exist; no stage ever reads those labels.

Method: SemiSAM-O1 (Zhang et al., arXiv 2604.24109, 2026).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InputError, ReportedError

# Presets of the whole loop. ``train`` gets the same preset name.
# max_unlabeled / max_test limit the cohort (None: all); template_share and spatial_aug are train's
# --template-share and --spatial-aug for every round (spatial_aug off: it raised single UNets trained on
# pseudo-labels but not the loop's final model; quality.json spatial_augmentation).
RUN_PRESETS = {
    "quick": dict(rounds=1, max_unlabeled=3, max_test=2, iterations=None, select=1.0, template_share=0.1, spatial_aug=0.0),
    "demo": dict(rounds=2, max_unlabeled=20, max_test=20, iterations=500, select=1.0, template_share=0.1, spatial_aug=0.0),
    "cpu": dict(rounds=3, max_unlabeled=None, max_test=None, iterations=None, select=0.25, template_share=0.1, spatial_aug=0.0),
    "paper": dict(rounds=3, max_unlabeled=None, max_test=None, iterations=None, select=0.25, template_share=0.1, spatial_aug=0.0),
}
# The UNet preset that each run preset trains with.
TRAIN_PRESET = {"quick": "quick", "demo": "cpu", "cpu": "cpu", "paper": "paper"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, metavar="DATASET", help="MSD / nnU-Net dataset folder (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--split", required=True, metavar="FILE", help="split JSON with 'template', 'unlabeled' and 'test'")
    p.add_argument("-o", "--output", required=True, metavar="WORK", help="work folder: every stage's output, report.json and pictures")
    p.add_argument("--preset", default="cpu", choices=sorted(RUN_PRESETS),
                   help="quick: tests (3 unlabeled, 2 test cases, 1 round, seconds of training); "
                        "demo: 20 unlabeled, 20 test cases, 2 rounds of 500 UNet iterations (under 30 minutes on 2 cores); "
                        "cpu: the whole split, 3 rounds, UNet sized for a CPU; paper: the whole split, GPU-sized UNet")
    p.add_argument("--rounds", type=int, default=None, help="rounds of train / predict / refine (default: the preset's)")
    p.add_argument("--max-unlabeled", type=int, default=None, help="use only the first N cases of the unlabeled pool")
    p.add_argument("--max-test", type=int, default=None, help="evaluate only the first N test cases")
    p.add_argument("--ssl", default="none", choices=["none", "mt", "uamt"], help="semi-supervised consistency of the UNet")
    p.add_argument("--refine-mode", default="none", choices=["voxel", "volume", "none"],
                   help="refinement between rounds: voxel (the paper's kNN relabelling of uncertain voxels), volume "
                        "(the official code's), or none: the network's predictions are the next pseudo-labels "
                        "(default: none, the best measured on MSD Hippocampus; see README)")
    p.add_argument("--k", type=int, default=5, help="neighbours in the refinement vote")
    p.add_argument("--quantile", type=float, default=0.9, help="entropy quantile above which voxels are refined")
    p.add_argument("--select", type=float, default=None, metavar="FRACTION",
                   help="rounds after the first train on the template plus this fraction of the pool whose "
                        "round-0 pseudo-labels agree best (Dice) with round 1's prediction; 1 keeps every case, "
                        "--rounds 1 ignores it "
                        "(default: the preset's: 1 for quick and demo, 0.25 for cpu and paper)")
    p.add_argument("--template-share", type=float, default=None, metavar="F",
                   help="probability that a UNet training patch comes from the template's real label "
                        "(default 0.1; a negative value: every training volume equally likely)")
    p.add_argument("--spatial-aug", type=float, default=None, metavar="P",
                   help="probability of a random rotation / scaling of each UNet training volume "
                        "(train --spatial-aug; default 0, off)")
    p.add_argument("--class-planes", default="auto", choices=["auto", "off"],
                   help="auto: if the template's foreground classes follow each other along one axis, separated "
                        "by planes (MSD Hippocampus: Anterior | Posterior), every pseudo-label and prediction gets "
                        "the same structure (default: auto)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_inputs(dataset, template: str, cases) -> None:
    """Before anything is written: the template's label against its image (read in full: one
    case), and every other case's image header (no voxel data read). Raises InputError naming the
    file, so a bad file stops the run at once instead of after hours of encoding."""
    from .io import canonical_shape

    dataset.read_label(template, reference=dataset.read_image(template))
    for case in cases:
        canonical_shape(dataset.image_path(case))


def _case_lists(dataset, split_path, max_unlabeled, max_test):
    from .io import load_split

    sp = load_split(split_path)
    for key in ("template", "unlabeled", "test"):
        if key not in sp:
            raise InputError(f"{split_path}: split has no {key!r}")
    template = sp["template"]
    unlabeled = [c for c in sp["unlabeled"] if c != template]
    test = list(sp["test"])
    if max_unlabeled is not None:
        unlabeled = unlabeled[:max_unlabeled]
    if max_test is not None:
        test = test[:max_test]
    dataset.select(cases=[template] + unlabeled + test)  # raises for unknown case ids
    dataset.label_path(template)  # the one label the method needs
    return template, unlabeled, test


class _Stages:
    """Runs stages through the CLI's own parsers, records time, skips finished ones."""

    def __init__(self, work: Path, quiet: bool):
        self.work = work
        self.quiet = quiet
        self.done_dir = work / ".done"
        self.times: dict[str, float] = {}

    def marker(self, name: str) -> Path:
        return self.done_dir / f"{name}.json"

    def _stage(self, name: str, describe: str, fn, record: dict) -> bool:
        """Run ``fn()`` as stage ``name`` unless its marker exists; record its time and
        write the marker (``record`` plus the seconds) when it finishes."""
        from .io import write_json

        marker = self.marker(name)
        if marker.is_file():
            info = json.loads(marker.read_text())
            self.times[name] = float(info.get("seconds", 0.0))
            print(f"[run] {name}: done earlier ({info.get('seconds', 0):.0f} s), skipped", flush=True)
            return False
        print(f"[run] {name}: {describe}", flush=True)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self.times[name] = seconds
        write_json(marker, {"stage": name, **record, "seconds": seconds})
        print(f"[run] {name}: finished in {seconds:.0f} s", flush=True)
        return True

    def run_inline(self, name: str, what: str, fn) -> bool:
        """Run the in-process step ``fn()`` as stage ``name`` (same skip rules as :meth:`run`)."""
        return self._stage(name, what, fn, {"what": what})

    def run(self, name: str, command: str, argv: list[str]) -> bool:
        """Run stage ``name`` (``semisam-o1 command argv``) unless its marker exists.

        Returns True if it ran, False if it was skipped.
        """
        from .cli import build_parser

        full = [command] + argv + (["--quiet"] if self.quiet and command in {"encode", "train", "predict", "refine", "propagate"} else [])

        def call():
            args = build_parser().parse_args(full)
            rc = int(args._module.main(args) or 0)
            if rc != 0:  # the stage has printed its own error line(s)
                raise ReportedError(f"stage {name} (semisam-o1 {command}) failed with exit code {rc}", rc)

        return self._stage(name, f"semisam-o1 {' '.join(full)}", call, {"command": ["semisam-o1"] + full})


def run(
    input: str | Path,
    split: str | Path,
    output: str | Path,
    *,
    preset: str = "cpu",
    rounds: int | None = None,
    max_unlabeled: int | None = None,
    max_test: int | None = None,
    ssl: str = "none",
    refine_mode: str = "none",
    k: int = 5,
    quantile: float = 0.9,
    select: float | None = None,
    template_share: float | None = None,
    spatial_aug: float | None = None,
    class_planes: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Run the whole SemiSAM-O1 loop and write ``WORK/report.json`` and its pictures.

    Parameters are those of ``semisam-o1 run`` (see ``--help``). Returns the report dict.

    Raises
    ------
    InputError
        Bad dataset / split, or a stage that raised one.
    ReportedError
        A stage that printed its own error line(s) and returned a non-zero status
        (``code``); the CLI adds no further line.
    """
    from .io import Dataset

    if preset not in RUN_PRESETS:
        raise InputError(f"unknown preset {preset!r} (choose from {', '.join(RUN_PRESETS)})")
    cfg = dict(RUN_PRESETS[preset])
    if rounds is not None:
        cfg["rounds"] = rounds
    if max_unlabeled is not None:
        cfg["max_unlabeled"] = max_unlabeled
    if max_test is not None:
        cfg["max_test"] = max_test
    if cfg["rounds"] < 1:
        raise InputError("--rounds must be at least 1")
    if select is not None:
        cfg["select"] = float(select)
    if not (0.0 < cfg["select"] <= 1.0):
        raise InputError(f"--select {cfg['select']}: must be in (0, 1]")
    if template_share is not None:
        cfg["template_share"] = None if template_share < 0 else float(template_share)
    if cfg["template_share"] is not None and cfg["template_share"] >= 1.0:
        raise InputError(f"--template-share {cfg['template_share']}: must be below 1")
    from .train import spatial_aug_probability

    cfg["spatial_aug"] = spatial_aug_probability(cfg["spatial_aug"] if spatial_aug is None else spatial_aug)

    dataset = Dataset(input)
    template, unlabeled, test = _case_lists(dataset, split, cfg["max_unlabeled"], cfg["max_test"])
    _check_inputs(dataset, template, unlabeled + test)
    work = Path(output)
    settings = dict(preset=preset, rounds=cfg["rounds"], max_unlabeled=cfg["max_unlabeled"], max_test=cfg["max_test"],
                    iterations=cfg["iterations"], select=cfg["select"], ssl=ssl, refine_mode=refine_mode, k=k,
                    quantile=quantile, seed=seed, template=template, class_planes=class_planes,
                    template_share=cfg["template_share"], spatial_aug=cfg["spatial_aug"])
    _check_settings(work, settings)
    work.mkdir(parents=True, exist_ok=True)
    _write_settings(work, settings)
    stages = _Stages(work, quiet)
    common = ["--device", device] + (["--threads", str(threads)] if threads else [])
    ds = str(input)
    feats = str(work / "features")

    stages.run("encode", "encode", ["-i", ds, "-o", feats, "--cases", template, *unlabeled, *common])
    stages.run("propagate", "propagate", ["-i", ds, "-f", feats, "--template", template,
                                          "-o", str(work / "round0" / "pseudo"), "--cases", *unlabeled,
                                          "--class-planes", class_planes, *common])
    from .class_planes import CLASS_PLANES_JSON

    rule_file = work / "round0" / "pseudo" / CLASS_PLANES_JSON
    planes_arg = ["--class-planes", str(rule_file)] if rule_file.is_file() else []
    train_cases = list(unlabeled)
    selecting = cfg["select"] < 1.0 and cfg["rounds"] > 1  # selection needs a round after the first
    for r in range(1, cfg["rounds"] + 1):
        rd = work / f"round{r}"
        prev = work / f"round{r - 1}" / "pseudo"
        stages.run(f"round{r}/train", "train", ["-i", ds, "-l", str(prev), "--template", template,
                                                "--cases", template, *train_cases, "-o", str(rd / "model"),
                                                "--ssl", ssl, "--preset", TRAIN_PRESET[preset],
                                                "--seed", str(seed + r), *common,
                                                *([] if cfg["template_share"] is None
                                                  else ["--template-share", str(cfg["template_share"])]),
                                                "--spatial-aug", str(cfg["spatial_aug"]),
                                                *(["--iterations", str(cfg["iterations"])] if cfg["iterations"] else [])])
        stages.run(f"round{r}/predict", "predict", ["-i", ds, "-m", str(rd / "model"), "-o", str(rd / "pred"),
                                                    "--cases", *unlabeled, *planes_arg, *common])
        if refine_mode == "none" or r == cfg["rounds"]:
            # the last round's pseudo-labels are its predictions: nothing trains on them
            _copy_labels(rd / "pred", rd / "pseudo", unlabeled)
        else:
            stages.run(f"round{r}/refine", "refine", ["-i", ds, "-f", feats, "-p", str(rd / "pred"),
                                                      "-o", str(rd / "pseudo"), "--template", template,
                                                      "--cases", *unlabeled, "--mode", refine_mode,
                                                      "--k", str(k), "--quantile", str(quantile),
                                                      "--seed", str(seed), *planes_arg, *common])
        if r == 1 and selecting:
            from .selection import SELECTION_JSON, select_cases

            sel_path = rd / SELECTION_JSON
            stages.run_inline("round1/select", f"keep the {cfg['select']:g} of the pool whose round-0 "
                              "pseudo-labels agree best with round 1's prediction",
                              lambda: select_cases(dataset, work / "round0" / "pseudo", rd / "pred", unlabeled,
                                                   cfg["select"], output=sel_path))
            try:
                train_cases = list(json.loads(sel_path.read_text())["selected"])
            except (OSError, ValueError, KeyError) as exc:
                raise InputError(f"{sel_path}: cannot read the case selection ({exc}); delete it and "
                                 f"{stages.marker('round1/select')} to redo it") from None
        stages.run(f"round{r}/predict_test", "predict", ["-i", ds, "-m", str(rd / "model"), "-o", str(rd / "test"),
                                                         "--cases", *test, *planes_arg, *common])
        stages.run(f"round{r}/evaluate", "evaluate", ["-p", str(rd / "test"), "-g", ds, "--cases", *test,
                                                      "-o", str(rd / "test_metrics.json")])

    from .report import write_report

    report = write_report(work, dataset, template=template, unlabeled=unlabeled, test=test,
                          rounds=cfg["rounds"], times=stages.times,
                          config=dict(cfg, preset=preset, ssl=ssl, refine_mode=refine_mode, k=k,
                                      quantile=quantile, device=device, seed=seed, class_planes=class_planes,
                                      class_planes_rule=json.loads(rule_file.read_text()) if planes_arg else None),
                          selected=train_cases if selecting else None)
    print(f"[run] report: {work / 'report.json'}", flush=True)
    return report


SETTINGS_JSON = "run.json"
# settings a finished stage depends on; a resumed run must ask for the same ones
# (rounds may grow: later rounds only add stages)
_RESUME_KEYS = ("preset", "max_unlabeled", "max_test", "iterations", "select", "ssl", "refine_mode", "k",
                "quantile", "seed", "template", "class_planes", "template_share", "spatial_aug")


def _check_settings(work: Path, settings: dict) -> None:
    """Refuse to resume ``work`` with settings that differ from the ones it was started
    with (the finished stages would silently be reused). InputError naming the file."""
    path = work / SETTINGS_JSON
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable run settings ({exc}); delete it to start over") from None
    for key in _RESUME_KEYS:
        if key in before and before[key] != settings[key]:
            raise InputError(f"{path}: this work folder was started with {key}={before[key]!r}, this run asks for "
                             f"{settings[key]!r}; use a new -o folder (finished stages would be reused as they are)")


def _write_settings(work: Path, settings: dict) -> None:
    from .io import write_json

    write_json(work / SETTINGS_JSON, settings)


def _copy_labels(src: Path, dst: Path, cases: list[str]) -> None:
    import shutil

    from .io import atomic_path, find_case_file

    dst.mkdir(parents=True, exist_ok=True)
    for case in cases:
        f = find_case_file(src, case, what="prediction")
        target = dst / f.name
        if not target.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(f, tmp)


def main(args: argparse.Namespace) -> int:
    run(args.input, args.split, args.output, preset=args.preset, rounds=args.rounds,
        max_unlabeled=args.max_unlabeled, max_test=args.max_test, ssl=args.ssl,
        refine_mode=args.refine_mode, k=args.k, quantile=args.quantile, select=args.select,
        template_share=args.template_share, spatial_aug=args.spatial_aug, class_planes=args.class_planes,
        device=args.device,
        threads=args.threads, seed=args.seed, quiet=args.quiet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main as cli_main

    sys.exit(cli_main(["run"] + sys.argv[1:]))
