"""Registration as a prior for ``propagate`` (issue #16, item 3), measured on one dataset.

For the split's first ``--max-pool`` unlabeled cases (the round-0 figures' cases) every case gets
four labels from the template alone, made by propagate's own function
(:func:`semisam_o1.stages.propagate.case_label`, settings of ``propagate`` but ``--prior``):

* ``atlas_syn``: ``--prior registration``, the template's label warped by ANTs SyN (antspyx,
  :mod:`semisam_o1.methods.registration`, 1 ITK thread, seed 1);
* ``knn``: ``--prior none``, today's round-0 vote (normalised box coordinates, one recentring);
* ``knn_registered``: ``--prior position``, the vote with each voxel's position taken in the
  template's frame through the SyN warp;
* ``choose``: ``--prior choose``, per case the label-free choice between ``knn_registered`` and
  ``atlas_syn``; the other label-free rules of this benchmark (``choose_*``) are recorded beside it.

Only the benchmark reads the real labels (mean foreground Dice, :mod:`semisam_o1.methods.metrics`). The
first ``--max-test`` test cases get ``atlas_syn`` alone (they have no features). With
``--referee NAME=FOLDER`` the labels of FOLDER (a round's predictions on the pool) are scored
against the registration's labels and against the real ones (the ``referee`` key).

    python -m benchmarks.bench_registration --dataset ../shared/data/la2018 \\
        --split ../shared/data/la2018/splits.json --features STORE --work SCRATCH \\
        --referee round0=/work/cache/la/round0 --write benchmarks/results/registration.json

Writes the dataset's key (its dataset.json name) of the results file (read-modify-write, atomic).

``--workers W`` measures the registrations alone instead (issue #34 item 3): the template registered
to the split's first ``--max-pool`` unlabeled cases by :func:`semisam_o1.methods.registration.warp_cases`,
once in this process one case after the other (``workers=1``) and once with W worker processes, each
into an empty cache under ``--work``, in one run; the warps must be identical (exact equality of the
warped labels and coordinate fields). Writes the key ``parallel`` (no ``--features`` needed):

    python -m benchmarks.bench_registration --dataset ../shared/data/hippocampus \
        --split ../shared/data/hippocampus/splits.json --work SCRATCH --max-pool 6 --workers 2 \
        --write benchmarks/results/registration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import read_label
from semisam_o1.methods import registration as R
from semisam_o1.methods.metrics import dice_per_class
from semisam_o1.stages import propagate as P

METHODS = ("atlas_syn", "knn", "knn_registered", "choose")


def _fg_dice(a, b, K) -> float:
    return float(np.mean(dice_per_class(a, b, range(1, K))))


def _warp(ds, t_img, t_lab, case, img, cache: Path, seconds: dict):
    """The cached warp of ``case``; the seconds of its first computation are kept in ``seconds``."""
    warp = R.cached_warp(cache, t_img, t_lab, case, img, ds.label_map, threads=1)
    if warp.seconds:
        seconds[case] = round(warp.seconds, 2)
    return warp


def _choices(img, labels: dict, scores_knn, K) -> dict:
    """Label-free per-case rules between ``knn_registered`` and ``atlas_syn``: the name of the label
    each picks."""
    sep = P.separation(img.array, [labels["knn_registered"], labels["atlas_syn"], labels["knn"]])
    agree_knn = _fg_dice(labels["knn"], labels["knn_registered"], K)
    agree_reg = _fg_dice(labels["knn"], labels["atlas_syn"], K)
    return {"choose_separation": "atlas_syn" if sep[1] > sep[0] else "knn_registered",
            "choose_separation3": ["knn_registered", "atlas_syn", "knn"][int(np.argmax(sep))],
            # the label that agrees more with the independent box-coordinate vote
            "choose_agreement": "atlas_syn" if agree_reg > agree_knn else "knn_registered",
            "separation": [round(v, 5) for v in sep], "agreement_knn_reg": round(agree_reg, 4)}


def pool_case(ds, s, model, rule, store, t_img, t_lab, case, cache, seconds) -> dict:
    img = ds.read_image(case)
    ref = ds.read_label(case, reference=img).array
    K = model.num_classes
    warp = _warp(ds, t_img, t_lab, case, img, cache, seconds)
    cf = store.load(case)
    labels, t = {}, {}
    for name, prior in (("atlas_syn", "registration"), ("knn", "none"), ("knn_registered", "position")):
        m = dataclasses.replace(model, params=dataclasses.replace(s, prior=prior))
        t0 = time.perf_counter()
        scores, labels[name], _ = P.case_label(m, rule, cf, img, warp, device="cpu", threads=s.threads)
        t[name] = time.perf_counter() - t0
    # --prior choose: propagate's rule on the knn_registered vote just made (no second vote)
    _, labels["choose"], chosen = P._choose(scores, labels["knn_registered"], warp, img, model)
    rules = _choices(img, labels, None, K)
    row = {"case": case, "chosen": chosen["source"], **rules,
           "dice": {n: round(_fg_dice(labels[n], ref, K), 4) for n in labels},
           "vote_seconds": {n: round(v, 2) for n, v in t.items()}}
    for r in ("choose_separation3", "choose_agreement"):
        row["dice"][r] = row["dice"][rules[r]]
    return row


def pool(args, ds, split) -> tuple[list[dict], dict]:
    cases = list(split["unlabeled"])[: args.max_pool]
    if not cases:  # --max-pool 0: atlas SyN on the test cases only
        return [], {}
    out = args.work / "propagate"
    s = P.PropagateSettings(input=args.dataset, features=args.features, template=split["template"], output=out,
                            cases=tuple(cases), threads=args.threads, quiet=True)
    inp = P._open_inputs(s)
    model, t_label = P._template_model(s, inp)
    out.mkdir(parents=True, exist_ok=True)
    rule = P._class_planes(s, inp, t_label, out)
    t_img = ds.read_image(s.template)
    t_lab = ds.read_label(s.template, reference=t_img)
    seconds, rows = {}, []
    for case in cases:
        rows.append(pool_case(ds, s, model, rule, inp.store, t_img, t_lab, case, args.work / "registration",
                              seconds))
        print(case, rows[-1]["dice"], rows[-1]["chosen"], file=sys.stderr, flush=True)
    return rows, seconds


def test(args, ds, split, seconds) -> list[dict]:
    t_img = ds.read_image(split["template"])
    t_lab = ds.read_label(split["template"], reference=t_img)
    rows = []
    for case in list(split["test"])[: args.max_test]:
        img = ds.read_image(case)
        warp = _warp(ds, t_img, t_lab, case, img, args.work / "registration", seconds)
        rows.append({"case": case, "dice": {"atlas_syn": round(
            _fg_dice(warp.label, ds.read_label(case, reference=img).array, ds.label_map.num_classes), 4)}})
    return rows


def referee(args, ds, split) -> dict:
    """Each ``--referee`` folder's labels: mean foreground Dice with the registration's labels and with
    the real labels, over the pool cases it holds."""
    K = ds.label_map.num_classes
    cases = list(split["unlabeled"])[: args.max_pool]
    reg = R.registration_labels(ds, split["template"], cases, args.work / "registration", threads=1)
    out = {}
    for spec in args.referee:
        name, folder = spec.split("=", 1)
        d_reg, d_real = [], []
        for case in cases:
            path = Path(folder) / f"{case}.nii.gz"
            if not path.exists():
                continue
            img = ds.read_image(case)
            lab = read_label(path, ds.label_map, reference=img).array
            d_reg.append(_fg_dice(lab, read_label(reg[case], ds.label_map, reference=img).array, K))
            d_real.append(_fg_dice(lab, ds.read_label(case, reference=img).array, K))
        out[name] = {"folder": folder, "cases": len(d_reg), "dice_with_registration": round(float(np.mean(d_reg)), 4),
                     "dice_real": round(float(np.mean(d_real)), 4),
                     "per_case": {"with_registration": [round(v, 4) for v in d_reg],
                                  "real": [round(v, 4) for v in d_real]}}
    return out


def _load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _burn(n: int = 3_000_000) -> float:
    """Seconds of a pure-Python loop (one core's speed, no memory traffic)."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i * i
    return time.perf_counter() - t0


def parallelism_probe(workers: int) -> dict:
    """How much parallelism the machine gives right now: ``workers`` copies of :func:`_burn` one after
    the other in this process vs at once in ``workers`` spawned processes (ratio = the best speedup
    any process pool could reach at this moment; a shared machine's other jobs take the rest)."""
    import multiprocessing

    t0 = time.perf_counter()
    for _ in range(workers):
        _burn()
    serial = time.perf_counter() - t0
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(abs, range(workers))  # started
        t0 = time.perf_counter()
        pool.map(_burn, [3_000_000] * workers)
        par = time.perf_counter() - t0
    return {"serial_s": round(serial, 2), "parallel_s": round(par, 2), "ratio": round(serial / par, 2)}


def parallel(args, ds, split) -> dict:
    """Seconds of the template's registrations to the first ``--max-pool`` pool cases: serial, then
    ``--workers`` processes (empty caches both times), and whether the warps are identical."""
    cases = list(split["unlabeled"])[: args.max_pool]
    probe = {"before": parallelism_probe(args.workers)}
    runs = {}
    for name, workers in (("serial", 1), ("parallel", args.workers)):
        cache = args.work / f"registration_{name}"
        shutil.rmtree(cache, ignore_errors=True)
        load = _load_1min()
        t0 = time.perf_counter()
        done = R.warp_cases(ds, split["template"], cases, cache, threads=1, workers=workers, quiet=False)
        runs[name] = {"seconds": time.perf_counter() - t0, "warp_dir": done["warp_dir"], "load_before": load,
                      "load_after": _load_1min(), "case_seconds": done["seconds"]}
        print(name, f"{runs[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    identical = True
    for case in cases:
        a = read_label(runs["serial"]["warp_dir"] / f"{case}.nii.gz", ds.label_map).array
        b = read_label(runs["parallel"]["warp_dir"] / f"{case}.nii.gz", ds.label_map).array
        with np.load(runs["serial"]["warp_dir"] / f"{case}_coords.npz") as za, \
                np.load(runs["parallel"]["warp_dir"] / f"{case}_coords.npz") as zb:
            identical &= bool(np.array_equal(a, b) and np.array_equal(za["coords"], zb["coords"]))
    probe["after"] = parallelism_probe(args.workers)
    serial_s, parallel_s = runs["serial"]["seconds"], runs["parallel"]["seconds"]
    return {"dataset": ds.meta.get("name", ds.root.name), "template": split["template"], "cases": len(cases),
            "workers": args.workers, "cpus_available": R.available_cpus(),
            "registration": R.RegistrationParams().to_json() | {"threads": 1},
            "serial_s": round(serial_s, 1), "parallel_s": round(parallel_s, 1),
            "speedup": round(serial_s / parallel_s, 2), "identical_warps": identical,
            "load_1min": {n: [r["load_before"], r["load_after"]] for n, r in runs.items()},
            "parallelism_probe": probe,
            "seconds_per_case_in_worker": {n: round(float(np.mean(list(r["case_seconds"].values()))), 2)
                                           for n, r in runs.items()}}


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    names = rows[0]["dice"].keys()
    return {n: round(float(np.mean([r["dice"][n] for r in rows])), 4) for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--features", type=Path, default=None,
                    help="feature store of the template and pool cases (required without --workers)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (warps cached there)")
    ap.add_argument("--max-pool", type=int, default=20)
    ap.add_argument("--max-test", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="kNN vote threads (registration: 1)")
    ap.add_argument("--referee", nargs="*", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--workers", type=int, default=None,
                    help="measure only the registrations of the --max-pool cases: serial vs this many processes "
                         "(key 'parallel')")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args(argv)
    ds, split = Dataset(args.dataset), load_split(args.split)
    command = "python -m benchmarks.bench_registration " + shlex.join(argv or sys.argv[1:])
    if args.workers is not None:
        entry = {"command": command, "cpu": cpu_model(), **parallel(args, ds, split)}
        print(json.dumps({k: entry[k] for k in ("cases", "serial_s", "parallel_s", "speedup", "identical_warps")}))
        if args.write:
            write_json_key(args.write, "parallel", entry)
        return 0
    if args.features is None:
        ap.error("--features is required (unless --workers)")
    t0 = time.perf_counter()
    seconds: dict = {}
    rows, seconds = pool(args, ds, split)
    trows = test(args, ds, split, seconds)
    entry = {"command": command, "cpu": cpu_model(), "template": split["template"],
             "registration": R.RegistrationParams().to_json() | {"threads": 1},
             "pool": {"cases": len(rows), "mean_fg_dice": summary(rows),
                      "chosen_registration": sum(r["chosen"] == "registration" for r in rows), "per_case": rows}
             if rows else None,
             "test": {"cases": len(trows), "mean_fg_dice": summary(trows), "per_case": trows},
             "registration_seconds_per_case": round(float(np.mean(list(seconds.values()))), 2) if seconds else None,
             "registration_seconds_computed_cases": len(seconds),
             "seconds": round(time.perf_counter() - t0, 1)}
    if args.referee:
        entry["referee"] = referee(args, ds, split)
    print(json.dumps(
        {"pool": (entry["pool"] or {}).get("mean_fg_dice"), "test": entry["test"]["mean_fg_dice"],
         "sec": entry["registration_seconds_per_case"], "referee": {k: (v["dice_with_registration"], v["dice_real"])
                                                                    for k, v in entry.get("referee", {}).items()}}))
    if args.write:
        write_json_key(args.write, ds.meta.get("name", ds.root.name), entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
