"""Refinement latency on real features: the C++ kNN-vote kernel vs faiss-cpu + a NumPy vote.

Issue 7, point 5. On the Hippocampus feature store written by ``semisam-o1 encode``:

* **bank**: ``--bank`` (200,000) confident voxels drawn from the cohort, class-balanced
  per case (each case gives up to ceil(quota_c / n_cases) confident voxels of class c,
  then the bank is cut to exactly ``--bank`` at random), labels = the case's current
  labels;
* **queries**: the 10% most uncertain voxels of each of ``--volumes`` (20) volumes
  (about 120,000);
* **uncertainty and current labels**: the voxel-wise softmax entropy and labels of a
  ``predict`` folder when ``--pred`` is given; otherwise a stand-in (reported in the
  JSON): round-0 labels from class prototypes (the template's per-class mean feature,
  with its real label) and uncertainty = minus the margin between the best and the
  second-best prototype cosine score;
* **methods**, same thread count (``--threads``, 2): ``kernel`` =
  ``semisam_o1.kernels.knn_vote`` (fused cosine similarity, streaming top-k and
  weighted vote, float32 in); ``faiss`` = ``faiss.IndexFlatIP`` on L2-normalised
  float32 vectors (normalisation + add + search timed) followed by the same weighted
  vote in NumPy (weights max(sim, 0), highest total wins, ties -> lowest label);
* **dimension**: ``refine`` projects the store's concatenated features (256 x number
  of encoder axes) with a PCA fitted on the bank (``--project-dim``, default 64), so
  the headline and the scaling series run in that dimension; the full dimension is
  timed on the first ``--full-dim-queries`` queries, and the agreement of the
  projected vote with the full-dimension vote (and, as a diagnostic only, the accuracy
  of both against the real labels of the query voxels) is recorded for a few
  projection dimensions.

Series: headline (bank ``--bank``, ``--volumes`` volumes); bank size (``--bank-sizes``)
at ``--volumes`` volumes; number of volumes (``--volume-counts``) at bank ``--bank``,
with the seconds to read those volumes' features from the store.

Usage (writes benchmarks/results/refine.json)::

    python benchmarks/bench_refine.py --features work/features --data ../shared/data/hippocampus
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", default=str(REPO / "work" / "features"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    p.add_argument("--pred", default=None, help="predict folder with <case>.nii.gz and <case>_entropy.nii.gz")
    p.add_argument("--stand-in", choices=["propagate", "prototype"], default="propagate",
                   help="without --pred: current labels and uncertainty from `propagate` (round-0 pseudo-labels, "
                        "entropy of its kNN vote shares) or from template class prototypes (minus the top-2 margin)")
    p.add_argument("--scratch", default=str(REPO / "work" / "bench_refine_propagate"),
                   help="where the propagate stand-in writes its round-0 labels and scores (reused)")
    p.add_argument("--bank", type=int, default=200_000)
    p.add_argument("--volumes", type=int, default=20)
    p.add_argument("--query-fraction", type=float, default=0.10)
    p.add_argument("--bank-sizes", default="50000,100000,200000")
    p.add_argument("--volume-counts", default="5,10,20")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--project-dim", type=int, default=64)
    p.add_argument("--agreement-dims", default="32,64,128")
    p.add_argument("--centred-dims", default="64", help="also these dimensions with ordinary (centred) PCA")
    p.add_argument("--full-dim-queries", type=int, default=5_000)
    p.add_argument("--max-cases", type=int, default=0, help="bank cohort: at most this many cases (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="skip the quality diagnostic (refine on the propagate stand-in of the query volumes, Dice)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refine.json"))
    p.add_argument("--markdown", default=str(REPO / "benchmarks" / "refine.md"), help="table for the README ('' to skip)")
    p.add_argument("--from-json", default=None, help="only rewrite --markdown from an existing result JSON")
    p.add_argument("--quality-only", action="store_true",
                   help="rerun only the quality diagnostic on the query cases recorded in --out, update --out and --markdown")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- methods


def numpy_vote(idx, sim, bank_labels, n_cls):
    """Weighted vote of (Q, k) neighbours: weights max(sim, 0); ties -> lowest label;
    all weights 0 -> the nearest neighbour's label."""
    lab = bank_labels[idx]
    w = np.maximum(sim, 0).astype(np.float32)
    tot = np.zeros((len(idx), n_cls), np.float32)
    rows = np.arange(len(idx))
    for j in range(idx.shape[1]):
        tot[rows, lab[:, j]] += w[:, j]
    out = tot.argmax(axis=1).astype(np.int32)
    none = w.sum(axis=1) <= 0
    out[none] = lab[none, 0]
    return out


def run_kernel(q, b, bl, k, threads):
    from semisam_o1 import kernels

    t = time.perf_counter()
    labels, _ = kernels.knn_vote(q, b, bl, k, threads=threads)
    return np.asarray(labels), time.perf_counter() - t, {}


def run_faiss(q, b, bl, k, threads, n_cls):
    import faiss

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    bn = np.array(b, dtype=np.float32, copy=True)
    qn = np.array(q, dtype=np.float32, copy=True)
    faiss.normalize_L2(bn)
    faiss.normalize_L2(qn)
    index = faiss.IndexFlatIP(bn.shape[1])
    index.add(bn)
    t1 = time.perf_counter()
    sim, idx = index.search(qn, k)
    t2 = time.perf_counter()
    labels = numpy_vote(idx, sim, bl, n_cls)
    t3 = time.perf_counter()
    return labels, t3 - t0, {"normalise_add_s": t1 - t0, "search_s": t2 - t1, "vote_s": t3 - t2}


def compare(q, b, bl, k, threads, n_cls, repeats, truth=None, keep_labels=None):
    """Time both methods (interleaved, best of ``repeats``); agreement of their labels;
    with ``truth``, the kernel vote's accuracy against it (diagnostic); with
    ``keep_labels`` (a dict), the kernel's labels are stored in it under "labels"."""
    best = {"kernel": math.inf, "faiss": math.inf}
    parts = {}
    labels = {}
    for _ in range(repeats):
        lk, sk, _ = run_kernel(q, b, bl, k, threads)
        lf, sf, pf = run_faiss(q, b, bl, k, threads, n_cls)
        if sk < best["kernel"]:
            best["kernel"], labels["kernel"] = sk, lk
        if sf < best["faiss"]:
            best["faiss"], labels["faiss"], parts = sf, lf, pf
    if keep_labels is not None:
        keep_labels["labels"] = labels["kernel"]
    extra = {}
    if truth is not None:
        extra["vote_accuracy_vs_real_labels_diagnostic"] = round(float((labels["kernel"] == truth).mean()), 4)
    return {
        **extra,
        "queries": int(len(q)), "bank": int(len(b)), "dim": int(q.shape[1]),
        "kernel_s": round(best["kernel"], 3), "faiss_s": round(best["faiss"], 3),
        "faiss_over_kernel": round(best["faiss"] / best["kernel"], 2),
        "faiss_parts_s": {k_: round(v, 3) for k_, v in parts.items()},
        "label_agreement": float((labels["kernel"] == labels["faiss"]).mean()),
        "kernel_queries_per_s": round(len(q) / best["kernel"]),
    }


def pca(bank, dim, seed, centred=False):
    """refine's projection: uncentred PCA fitted on at most PCA_FIT_ROWS bank rows (seeded);
    ``centred=True`` for ordinary PCA (compared in the grid)."""
    from semisam_o1.refine import PCA_FIT_ROWS, fit_projection

    rows = np.arange(len(bank))
    if len(bank) > PCA_FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed + 1).choice(len(bank), PCA_FIT_ROWS, replace=False))
    return fit_projection(bank[rows], dim, centred=centred)


def to_markdown(r: dict) -> str:
    """The README table of a result dict."""
    d = r["data"]
    h = r["headline"]
    lines = [
        "### Refinement latency (kNN vote): C++ kernel vs faiss-cpu + NumPy vote",
        "",
        f"Real LiteMedSAM features of Hippocampus ({d['cohort_cases']} encoded unlabeled cases of "
        f"{d['unlabeled_pool']}; store dimension {d['feature_dim']} = 64 channels x {len(d['encoder_axes'])} axes, "
        f"projected to {r['projection']['dim']} by uncentred PCA as `refine` does, keeping "
        f"{r['projection'].get('energy_kept', r['projection'].get('explained_variance', 0)):.0%} of the energy); bank = {h['bank']:,} confident voxels (class-balanced), queries = the "
        f"{r.get('args', {}).get('query_fraction', 0.1):.0%} most uncertain voxels of {d['query_volumes']} volumes "
        f"({h['queries']:,}); k = {d['k']}; {r['machine']['threads']} threads each, one machine with "
        f"{r['machine']['cpus']} cores shared with other jobs (load average {r['machine']['load_average_at_start'][0]:.1f} "
        f"at start). Uncertainty: {d['uncertainty']}.",
        "",
        "| bank | volumes | queries | dim | kernel s | faiss + vote s | faiss / kernel | same labels |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(row, row.get("volumes", d["query_volumes"])) for row in r["bank_size_series"]]
    rows += [(row, row["volumes"]) for row in r["volume_series"] if row["queries"] != h["queries"]]
    full = r["full_dimension"]
    rows.append((full, "slice"))
    for row, vols in rows:
        lines.append(f"| {row['bank']:,} | {vols} | {row['queries']:,} | {row['dim']} | {row['kernel_s']:.2f} | "
                     f"{row['faiss_s']:.2f} | {row['faiss_over_kernel']:.1f}x | {row['label_agreement']:.2%} |")
    lines += [
        "",
        f"Full dimension in float16 (the store's dtype): {full['kernel_float16_s']:.2f} s on the same slice "
        f"({full['float16_vs_float32_agreement']:.2%} of labels equal to float32).",
        "",
        "What the PCA projection and the bank size cost, on a slice of "
        f"{r['projection_agreement']['queries']:,} queries (agreement with the full dimension and the largest bank; "
        "accuracy against the real labels of the query voxels is a diagnostic only, never read by `refine`; "
        "*oracle*: the bank voxels carry their real labels, i.e. how far the features alone carry the label; "
        f"the current labels of these voxels are right {r['projection_agreement']['current_labels_accuracy']:.1%} "
        "of the time):",
        "",
        "| dim | projection | kept | bank | k | search s | agreement (current labels) | agreement (oracle) "
        "| accuracy (current bank labels) | accuracy (oracle bank) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in r["projection_agreement"]["grid"]:
        kept = g.get("kept", g.get("explained_variance", 0))
        lines.append(f"| {g['dim']} | {g.get('projection', '')} | {kept:.0%} | {g['bank']:,} | {g['k']} | {g['search_s']:.2f} | "
                     f"{g['agreement_with_full_dim_largest_bank']:.1%} | {g.get('agreement_oracle_labels', float('nan')):.1%} | "
                     f"{g['accuracy_current_bank_labels']:.1%} | {g['accuracy_oracle_bank_labels']:.1%} |")
    q = r.get("quality_diagnostic")
    if q:
        lines += [
            "",
            f"`refine` itself on the {q['cases']} query volumes (bank: these volumes and the template), with `propagate`'s round-0 pseudo-labels as the "
            "predictions and the entropy of its vote shares as the entropy maps (Dice against the real labels: "
            "a diagnostic of this benchmark; the real loop refines the UNet's predictions):",
            "",
            "| configuration | " + " | ".join(f"Dice {n}" for n in next(iter(q["dice_per_class"].values())))
            + " | mean | voxels changed | s |",
            "|---|" + "---:|" * (len(next(iter(q["dice_per_class"].values()))) + 3),
        ]
        for name, per in q["dice_per_class"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in per.values())
                         + f" | {q['dice_mean'][name]:.4f} | {q['voxels_changed'].get(name, 0):,} | "
                         + (f"{q['seconds'][name]:.0f}" if name in q["seconds"] else "") + " |")
    if q and q.get("command"):
        lines += ["", f"Quality diagnostic rerun with `{q['command']}`."]
    lines += ["", f"Command: `{r['command']}` (results: `benchmarks/results/refine.json`).", ""]
    return "\n".join(lines)


def quality_diagnostic(args, ds, template, cases):
    """`refine` itself on the propagate stand-in predictions of ``cases`` (labels = round-0
    pseudo-labels, entropy maps = entropy of propagate's vote shares): Dice per class against
    the real labels before and after, per configuration. A diagnostic of this benchmark only."""
    import nibabel as nib

    from semisam_o1.io import find_case_file, read_label, write_json, write_map
    from semisam_o1.refine import refine

    scratch = Path(args.scratch)
    pred = scratch / "as_pred"
    pred.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if (pred / f"{case}_entropy.nii.gz").is_file():
            continue
        img = ds.read_image(case)
        sc = nib.as_closest_canonical(nib.load(str(find_case_file(scratch / "scores", case))))
        sc = np.clip(np.asarray(sc.dataobj, dtype=np.float32), 0, None)
        p_ = sc / np.maximum(sc.sum(axis=-1, keepdims=True), 1e-12)
        write_map(pred / f"{case}_entropy.nii.gz", -(p_ * np.log(np.maximum(p_, 1e-12))).sum(axis=-1), img)
        lab = read_label(find_case_file(scratch, case), ds.label_map, reference=img).array
        from semisam_o1.io import write_label

        write_label(pred / f"{case}.nii.gz", lab, img, ds.label_map)
    truth = {c: ds.read_label(c).array for c in cases}
    n_cls = ds.label_map.num_classes

    def dice(folder):
        per = []
        for c in cases:
            p_ = read_label(find_case_file(folder, c), ds.label_map).array
            t_ = truth[c]
            per.append([2 * float(((p_ == k) & (t_ == k)).sum()) / max(float((p_ == k).sum() + (t_ == k).sum()), 1.0)
                        for k in range(1, n_cls)])
        return np.mean(per, axis=0)

    configs = {
        "round-0 labels (no refinement)": None,
        "voxel, PCA 64, position 1.5 (default)": dict(mode="voxel", project_dim=64, position_weight=1.5),
        "voxel, PCA 64, features only (position 0)": dict(mode="voxel", project_dim=64, position_weight=0.0),
        "voxel, full dimension 192, position 1.5": dict(mode="voxel", project_dim=0, position_weight=1.5),
        "voxel, full dimension 192, features only": dict(mode="voxel", project_dim=0, position_weight=0.0),
        "volume (official code)": dict(mode="volume"),
    }
    out = {"cases": len(cases), "dice_per_class": {}, "dice_mean": {}, "seconds": {}, "voxels_changed": {}}
    for name, cfg in configs.items():
        folder = pred
        if cfg is not None:
            folder = scratch / ("refined_" + "_".join(f"{k}{v}" for k, v in cfg.items()))
            t = time.perf_counter()
            info = refine(args.data, args.features, pred, folder, template=template, cases=cases,
                          threads=args.threads, quiet=True, **cfg)
            out["seconds"][name] = round(time.perf_counter() - t, 1)
            out["voxels_changed"][name] = info["voxels_changed_total"]
        d = dice(folder)
        out["dice_per_class"][name] = {ds.label_map.names[k + 1]: round(float(x), 4) for k, x in enumerate(d)}
        out["dice_mean"][name] = round(float(d.mean()), 4)
    write_json(scratch / "quality_diagnostic.json", out)
    return out


# --------------------------------------------------------------------------- data


def stand_in(feats, prototypes):
    """Labels (argmax of prototype cosine) and uncertainty (minus the top-2 margin)."""
    c = feats.shape[0]
    f = feats.reshape(c, -1).T
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    s = f @ prototypes.T
    top2 = np.sort(s, axis=1)[:, -2:]
    return s.argmax(axis=1).astype(np.int32), -(top2[:, 1] - top2[:, 0])


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        Path(args.markdown).write_text(to_markdown(json.loads(Path(args.from_json).read_text())))
        return
    if args.quality_only:
        from semisam_o1.io import Dataset

        result = json.loads(Path(args.out).read_text())
        ds = Dataset(args.data)
        split = json.loads((Path(args.data) / "splits.json").read_text())
        qcases = result["data"]["query_cases"]
        q = quality_diagnostic(args, ds, split["template"], qcases)
        q["command"] = "python benchmarks/bench_refine.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result["quality_diagnostic"] = q
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(to_markdown(result))
        print(q["dice_mean"], flush=True)
        return
    from semisam_o1.io import Dataset, find_case_file, read_image, read_label
    from semisam_o1.refine import class_quotas
    from semisam_o1.store import FeatureStore

    t_all = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    ds = Dataset(args.data)
    split = json.loads((Path(args.data) / "splits.json").read_text())
    template = split["template"]
    store = FeatureStore(args.features)
    stored = set(store.cases())
    if template not in stored:
        raise SystemExit(f"{args.features}: the template {template} is not encoded yet")
    cohort = [c for c in split["unlabeled"] if c in stored]
    if args.max_cases:
        cohort = cohort[: args.max_cases]
    if not cohort:
        raise SystemExit(f"{args.features}: no unlabeled case is encoded yet")
    qcases = cohort[: args.volumes]  # fewer when the store has not filled yet (recorded)
    n_cls = ds.label_map.num_classes
    print(f"cohort: {len(cohort)} encoded unlabeled cases of {len(split['unlabeled'])}; "
          f"queries from {len(qcases)}", flush=True)

    # stand-in labels / uncertainty when there are no predictions
    prototypes = None
    if args.pred is None and args.stand_in == "propagate":
        from semisam_o1.propagate import propagate

        t0 = time.perf_counter()
        propagate(args.data, args.features, template, args.scratch, cases=cohort, save_scores=True,
                  threads=args.threads, quiet=True)
        print(f"propagate stand-in: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.pred is None and args.stand_in == "prototype":
        t_img = ds.read_image(template)
        t_lab = ds.read_label(template, reference=t_img).array.ravel()
        tf = store.load(template).on_voxel_grid()
        f = tf.reshape(tf.shape[0], -1).T
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        prototypes = np.stack([f[t_lab == c].mean(axis=0) for c in range(n_cls)])
        prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
        del tf, f

    # per case and class, up to ceil(bank / n_cases) confident voxels; class-balanced cut afterwards
    per_case = [math.ceil(args.bank / len(cohort))] * n_cls
    bank_parts, bank_lab_parts, bank_truth_parts = [], [], []
    queries, query_truth, query_stand_in, query_case = [], [], [], []
    load_s = {}
    t0 = time.perf_counter()
    for i, case in enumerate(cohort):
        tc = time.perf_counter()
        feats = store.load(case).on_voxel_grid()
        load_s[case] = time.perf_counter() - tc
        c_dim = feats.shape[0]
        flat = feats.reshape(c_dim, -1)
        if args.pred is None and args.stand_in == "prototype":
            labels, unc = stand_in(feats, prototypes)
        elif args.pred is None:
            labels = read_label(find_case_file(args.scratch, case), ds.label_map).array.ravel().astype(np.int32)
            import nibabel as nib

            sc_img = nib.as_closest_canonical(nib.load(str(find_case_file(Path(args.scratch) / "scores", case))))
            sc = np.clip(np.asarray(sc_img.dataobj, dtype=np.float32), 0, None)  # (X, Y, Z, K) vote shares
            sc = sc.reshape(-1, sc.shape[-1]) if sc.ndim == 4 else sc.reshape(-1, 1)
            p_ = sc / np.maximum(sc.sum(axis=1, keepdims=True), 1e-12)
            unc = -(p_ * np.log(np.maximum(p_, 1e-12))).sum(axis=1)
        else:
            labels = read_label(find_case_file(args.pred, case), ds.label_map).array.ravel().astype(np.int32)
            unc = read_image(find_case_file(args.pred, f"{case}_entropy")).array.ravel()
        n_q = int(round(args.query_fraction * unc.size))
        order = np.argsort(-unc, kind="stable")
        qidx, conf_idx = order[:n_q], order[n_q:]  # the 10% most uncertain; the rest are confident
        truth = ds.read_label(case).array.ravel().astype(np.int32)  # diagnostics only (accuracy, oracle bank)
        for c in range(n_cls):
            cand = conf_idx[labels[conf_idx] == c]
            take = rng.choice(cand, size=min(per_case[c], len(cand)), replace=False)
            bank_parts.append(flat[:, take].T.astype(np.float32))
            bank_lab_parts.append(np.full(len(take), c, np.int32))
            bank_truth_parts.append(truth[take])
        if case in qcases:
            queries.append(flat[:, qidx].T.astype(np.float32))
            query_stand_in.append(labels[qidx])
            query_truth.append(truth[qidx])
            query_case.append(np.full(n_q, qcases.index(case), np.int32))
        del feats, flat
        if (i + 1) % 20 == 0:
            print(f"  read {i + 1}/{len(cohort)} cases ({time.perf_counter() - t0:.0f} s)", flush=True)
    read_s = time.perf_counter() - t0
    bank = np.concatenate(bank_parts)
    bank_labels = np.concatenate(bank_lab_parts)
    bank_truth = np.concatenate(bank_truth_parts)
    del bank_parts, bank_lab_parts, bank_truth_parts
    quotas = class_quotas(np.bincount(bank_labels, minlength=n_cls), args.bank)
    keep = np.concatenate([rng.choice(np.flatnonzero(bank_labels == c), size=quotas[c], replace=False)
                           for c in range(n_cls)])
    perm = keep[rng.permutation(len(keep))]  # shuffled, so a prefix is a random subset
    bank, bank_labels, bank_truth = np.ascontiguousarray(bank[perm]), bank_labels[perm], bank_truth[perm]
    q_full = np.concatenate(queries)
    q_truth = np.concatenate(query_truth)
    q_stand = np.concatenate(query_stand_in)
    q_case = np.concatenate(query_case)
    del queries
    print(f"bank {bank.shape}, queries {q_full.shape}, read {read_s:.0f} s", flush=True)

    result = {
        "command": "python benchmarks/bench_refine.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                    "load_average_at_start": list(os.getloadavg())},
        "data": {
            "features": str(args.features), "encoder_axes": list(getattr(store, "axes", ())),
            "feature_dim": int(q_full.shape[1]), "cohort_cases": len(cohort),
            "unlabeled_pool": len(split["unlabeled"]), "query_volumes": len(qcases),
            "uncertainty": ("predict entropy maps (" + str(args.pred) + ")") if args.pred else
            ("stand-in (no predictions were available): current labels = `propagate` round-0 pseudo-labels "
             "(default kNN label transfer from the template), uncertainty = entropy of its per-class vote shares"
             if args.stand_in == "propagate" else
             "stand-in (no predictions were available): minus the margin between the two best "
             "template-prototype cosine scores; current labels = prototype argmax"),
            "bank_per_class": {ds.label_map.names[c]: int((bank_labels == c).sum()) for c in range(n_cls)},
            "queries": int(len(q_full)), "k": args.k, "query_cases": qcases,
            "read_features_s_per_case": round(float(np.mean(list(load_s.values()))), 3),
        },
    }

    # projection fitted once on the bank
    t0 = time.perf_counter()
    mean, comps, explained = pca(bank, args.project_dim, args.seed)
    bank_p = np.ascontiguousarray((bank - mean) @ comps)
    q_p = np.ascontiguousarray((q_full - mean) @ comps)
    result["projection"] = {"kind": "uncentred PCA (as refine)", "dim": args.project_dim,
                            "energy_kept": round(explained, 4),
                            "fit_and_project_s": round(time.perf_counter() - t0, 3)}
    print(f"PCA {args.project_dim}: explained {explained:.3f}", flush=True)

    # headline
    print("headline ...", flush=True)
    result["headline"] = compare(q_p, bank_p, bank_labels, args.k, args.threads, n_cls, args.repeats,
                                 truth=q_truth)
    print(result["headline"], flush=True)

    # bank-size series (subsets of the same shuffled bank)
    result["bank_size_series"] = []
    for n in [int(x) for x in args.bank_sizes.split(",") if x]:
        if n == len(bank_p):
            row = dict(result["headline"])
        else:
            row = compare(q_p, bank_p[:n], bank_labels[:n], args.k, args.threads, n_cls, args.repeats,
                          truth=q_truth)
        result["bank_size_series"].append(row)
        print("bank", n, row, flush=True)

    # volume-count series
    result["volume_series"] = []
    for v in [int(x) for x in args.volume_counts.split(",") if x]:
        sel = q_case < v
        if v == len(qcases):
            row = dict(result["headline"])
        else:
            row = compare(q_p[sel], bank_p, bank_labels, args.k, args.threads, n_cls, args.repeats,
                          truth=q_truth[sel])
        row["volumes"] = v
        row["read_features_s"] = round(sum(load_s[c] for c in qcases[:v]), 3)
        result["volume_series"].append(row)
        print("volumes", v, row, flush=True)

    # full dimension on a slice, and what the projection costs in agreement
    nf = min(args.full_dim_queries, len(q_full)) if args.full_dim_queries else len(q_full)
    sl = np.random.default_rng(args.seed + 1).permutation(len(q_full))[:nf]
    print(f"full dimension ({q_full.shape[1]}) on {nf} queries ...", flush=True)
    bank16 = bank.astype(np.float16)
    kept = {}
    full = compare(q_full[sl], bank, bank_labels, args.k, args.threads, n_cls, args.repeats,
                   truth=q_truth[sl], keep_labels=kept)
    lab_full = kept["labels"]
    from semisam_o1 import kernels

    t = time.perf_counter()
    lab_full16, _ = kernels.knn_vote(q_full[sl].astype(np.float16), bank16, bank_labels, args.k,
                                     threads=args.threads)
    full["kernel_float16_s"] = round(time.perf_counter() - t, 3)
    full["float16_vs_float32_agreement"] = float((np.asarray(lab_full16) == lab_full).mean())
    result["full_dimension"] = full
    truth = q_truth[sl]

    # what the projection (and the bank size, and k) cost: one top-k search per (dim, bank size) on the
    # slice, then the vote in NumPy with the current labels and, as a diagnostic, with the bank voxels'
    # real labels (an oracle bank: how far the features alone carry the right label)
    dims = [(q_full.shape[1], False)] + [(int(x), False) for x in args.agreement_dims.split(",")
                                         if x and int(x) < q_full.shape[1]]
    dims += [(int(x), True) for x in args.centred_dims.split(",") if x and int(x) < q_full.shape[1]]
    sizes = [int(x) for x in args.bank_sizes.split(",") if x]
    ks = sorted({args.k, 2 * args.k})
    grid = []
    for d, centred in dims:
        if d == q_full.shape[1]:
            qd, bd, ex = q_full[sl], bank, 1.0
        else:
            m_, c_, ex = pca(bank, d, args.seed, centred=centred)
            qd, bd = np.ascontiguousarray((q_full[sl] - m_) @ c_), np.ascontiguousarray((bank - m_) @ c_)
        for n in sizes:
            t = time.perf_counter()
            _, _, idx, sim = kernels.knn_vote(qd, bd[:n], bank_labels[:n], max(ks), threads=args.threads,
                                              return_topk=True)
            secs = time.perf_counter() - t
            for k in ks:
                cur = numpy_vote(idx[:, :k], sim[:, :k], bank_labels[:n], n_cls)
                ora = numpy_vote(idx[:, :k], sim[:, :k], bank_truth[:n], n_cls)
                grid.append({"dim": d, "projection": "centred PCA" if centred else
                             ("none" if d == q_full.shape[1] else "uncentred PCA"), "kept": round(ex, 4),
                             "bank": n, "k": k,
                             "search_s": round(secs, 3), "labels": cur, "oracle": ora,
                             "accuracy_current_bank_labels": round(float((cur == truth).mean()), 4),
                             "accuracy_oracle_bank_labels": round(float((ora == truth).mean()), 4)})
            print(f"dim {d} bank {n}: {[{k_: v for k_, v in g.items() if k_ not in ('labels', 'oracle')} for g in grid[-len(ks):]]}",
                  flush=True)
    ref = next(g for g in grid if g["projection"] == "none" and g["bank"] == max(sizes) and g["k"] == args.k)
    ref_cur, ref_ora = ref["labels"], ref["oracle"]
    for g in grid:
        g["agreement_with_full_dim_largest_bank"] = round(float((g.pop("labels") == ref_cur).mean()), 4)
        g["agreement_oracle_labels"] = round(float((g.pop("oracle") == ref_ora).mean()), 4)
    result["projection_agreement"] = {
        "queries": int(nf),
        "reference": f"full dimension {q_full.shape[1]}, bank {max(sizes)}, k {args.k}",
        "current_labels_accuracy": round(float((q_stand[sl] == truth).mean()), 4),
        "note": "accuracy_* are diagnostics against the real labels of the query voxels (never used by refine); "
                "oracle = the bank voxels carry their real labels",
        "grid": grid,
    }
    if args.quality and args.pred is None and args.stand_in == "propagate":
        print("quality diagnostic ...", flush=True)
        result["quality_diagnostic"] = quality_diagnostic(args, ds, template, qcases)
        print(result["quality_diagnostic"]["dice_mean"], flush=True)
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(result))
        print(f"wrote {args.markdown}", flush=True)


if __name__ == "__main__":
    main()
