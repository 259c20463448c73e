"""Refinement latency on real features: the C++ kNN-vote kernel vs faiss-cpu + a NumPy vote.

On a feature store written by ``semisam-o1 encode`` and a ``predict`` folder (labels and
entropy maps), the bank and the queries are built by ``semisam_o1.stages.refine``'s own steps, so
the benchmark measures the shipped code:

* **threshold**: the cohort-wide ``--quantile`` of the entropies (``refine._entropy_threshold``);
* **bank**: ``--bank`` confident voxels drawn class-balanced over the whole cohort plus the
  template (``refine._layout_bank``, ``refine._bank_features``), projected by refine's
  uncentred PCA and, with ``--position-weight`` > 0 (default: refine's), given the position
  term (``refine._kernel_bank``); labels = the predictions;
* **queries**: the query voxels (entropy at or above the threshold) of the first ``--volumes``
  cases, as refine builds them (``refine._query_features``);
* **methods**, same thread count (``--threads``): ``kernel`` = ``semisam_o1.core.kernels.knn_vote``
  (fused cosine similarity, streaming top-k and weighted vote); ``faiss`` =
  ``faiss.IndexFlatIP`` on L2-normalised float32 vectors (normalisation + add + search timed)
  followed by the same weighted vote in NumPy (weights max(sim, 0), highest total wins,
  ties -> lowest label). Both without refine's prior vote weights, to compare like with like.

Series: headline (bank ``--bank``, ``--volumes`` volumes); bank size (``--bank-sizes``, random
subsets of the bank); number of volumes (``--volume-counts``), with the seconds to read those
volumes' features from the store. The full dimension is timed on ``--full-dim-queries`` queries,
and the agreement of projected votes with the full-dimension vote (and, as a diagnostic only,
the accuracy of both against the real labels of the query voxels) is recorded for a few
projection dimensions. ``--quality`` also runs ``refine`` itself on the cases and scores the
refined labels against the real ones (a diagnostic).

Usage, from the repository root (writes benchmarks/results/refine.json and benchmarks/refine.md)::

    python -m benchmarks.bench_refine --features work/demo/features --pred work/demo/round1/pred
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


def parse_args(argv=None):
    from semisam_o1.stages import refine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", help="feature store written by `semisam-o1 encode` (required)")
    p.add_argument("--pred", help="predict folder with <case>.nii.gz and <case>_entropy.nii.gz (required)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    p.add_argument("--split", default=None, help="split file (default: DATA/splits.json)")
    p.add_argument("--scratch", default=str(REPO / "work" / "bench_refine"), help="refine's outputs (--quality)")
    p.add_argument("--bank", type=int, default=200_000)
    p.add_argument("--volumes", type=int, default=20)
    p.add_argument("--quantile", type=float, default=0.9, help="refine's entropy quantile")
    p.add_argument("--bank-sizes", default="50000,100000,200000")
    p.add_argument("--volume-counts", default="5,10,20")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--project-dim", type=int, default=64)
    p.add_argument("--position-weight", type=float, default=refine.RefineSettings.__dataclass_fields__["position_weight"].default)
    p.add_argument("--agreement-dims", default="32,64,128")
    p.add_argument("--centred-dims", default="64", help="also these dimensions with ordinary (centred) PCA")
    p.add_argument("--full-dim-queries", type=int, default=5_000)
    p.add_argument("--max-cases", type=int, default=0, help="bank cohort: at most this many cases (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality", action="store_true", help="also refine the cases and score them (diagnostic)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refine.json"))
    p.add_argument("--markdown", default=str(REPO / "benchmarks" / "refine.md"), help="table for the README ('' to skip)")
    p.add_argument("--from-json", default=None, help="only rewrite --markdown from an existing result JSON")
    args = p.parse_args(argv)
    if not args.from_json and not (args.features and args.pred):
        p.error("--features and --pred are required (or --from-json)")
    return args


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
    from semisam_o1.core import kernels

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


def to_markdown(r: dict) -> str:
    """The README table of a result dict."""
    d = r["data"]
    h = r["headline"]
    lines = [
        "### Refinement latency (kNN vote): C++ kernel vs faiss-cpu + NumPy vote",
        "",
        f"Real features of {d['cohort_cases']} encoded unlabeled cases of {d['unlabeled_pool']} (store dimension "
        f"{d['feature_dim']}, {len(d['encoder_axes'])} encoder axes), projected to {r['projection']['dim']} by "
        f"uncentred PCA as `refine` does, keeping {r['projection'].get('energy_kept', 1.0):.0%} of the energy"
        + (f", with refine's position term (weight {d['position_weight']:g}, 6 more dimensions)"
           if d.get("position_weight") else "")
        + f"; bank = {h['bank']:,} confident voxels (class-balanced over the cohort, as `refine` draws it), "
        f"queries = the voxels at or above the cohort's {r.get('args', {}).get('quantile', 0.9):.0%} entropy "
        f"quantile in {d['query_volumes']} volumes ({h['queries']:,}); k = {d['k']}; {r['machine']['threads']} "
        f"threads each, one machine with {r['machine']['cpus']} cores (load average "
        f"{r['machine']['load_average_at_start'][0]:.1f} "
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
            f"`refine` itself on the {q['cases']} cases (mean Dice per class against the real labels: a "
            "diagnostic of this benchmark; `refine` never reads them):",
            "",
            "| configuration | " + " | ".join(f"Dice {n}" for n in next(iter(q["dice_per_class"].values())))
            + " | mean | voxels changed | s |",
            "|---|" + "---:|" * (len(next(iter(q["dice_per_class"].values()))) + 3),
        ]
        for name, per in q["dice_per_class"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in per.values())
                         + f" | {q['dice_mean'][name]:.4f} | {q['voxels_changed'].get(name, 0):,} | "
                         + (f"{q['seconds'][name]:.0f}" if name in q["seconds"] else "") + " |")
    lines += ["", f"Command: `{r['command']}` (results: `benchmarks/results/refine.json`).", ""]
    return "\n".join(lines)


def kernel_inputs(bank16, positions, queries, dim, seed, position_weight, centred=False):
    """Bank and query vectors for the kernel at projection ``dim`` (the store's dimension: none),
    as refine builds them (``refine._kernel_bank``); ``centred``: ordinary PCA instead
    (``linalg.pca_basis(centred=True)``, compared in the grid).

    Args:
        bank16: (N, C) float16 bank features (``refine._bank_features``).
        positions: (N, 3) bank positions, or None.
        queries: list of ``(features (Q, C) float32, positions (Q, 3))`` blocks.

    Returns:
        ``(bank (N, D) float32, queries (sum Q, D) float32, projection description)``.
    """
    from semisam_o1.methods import knn
    from semisam_o1.methods.linalg import pca_basis
    from semisam_o1.methods.template_vote import augment_with_position
    from semisam_o1.stages import refine

    if centred:
        rows = np.arange(len(bank16))
        if len(bank16) > refine.PCA_FIT_ROWS:
            rows = np.sort(np.random.default_rng(seed + 1).choice(len(bank16), refine.PCA_FIT_ROWS, replace=False))
        mean, basis, kept = pca_basis(bank16[rows], dim, centred=True)
        projection, info = (mean, basis), {"kind": "centred-pca", "dim": dim, "energy_kept": kept}
        bank = knn.project(bank16, projection)
        if position_weight:
            bank = augment_with_position(bank, positions, position_weight, "bank")
    else:
        bank, projection, info = refine._kernel_bank(bank16, positions, dim, seed, position_weight)
    q = [np.ascontiguousarray(knn.project(f, projection), dtype=np.float32) for f, _ in queries]
    if position_weight:
        q = [augment_with_position(f, p, position_weight, "query") for f, (_, p) in zip(q, queries)]
    return np.ascontiguousarray(bank, dtype=np.float32), np.concatenate(q), info


def build(args):
    """The bank and the queries, by refine's own steps, with the real labels of both (diagnostics)."""
    from semisam_o1.data.dataset import load_split
    from semisam_o1.methods import knn
    from semisam_o1.stages import refine

    split_path = Path(args.split or Path(args.data) / "splits.json")
    split = load_split(split_path)
    pool = [c for c in split["unlabeled"] if c != split["template"]]
    cohort = pool[: args.max_cases] if args.max_cases else pool
    s = refine.RefineSettings(input=Path(args.data), features=Path(args.features), pred=Path(args.pred),
                              output=Path(args.scratch) / "unused", template=split["template"], cases=tuple(cohort),
                              quantile=args.quantile, bank_size=args.bank, k=args.k, project_dim=args.project_dim,
                              position_weight=args.position_weight, seed=args.seed, threads=args.threads, quiet=True)
    inputs = refine._open_inputs(s)
    t0 = time.perf_counter()
    threshold, _ = refine._entropy_threshold(inputs, s.quantile, True)
    t_label = inputs.read_template()
    plan = refine._layout_bank(inputs, t_label, threshold, s.bank_size, s.seed, True)
    bank16, bank_labels, bank_pos, origin = refine._bank_features(inputs, plan, t_label, threshold,
                                                                  bool(s.position_weight), True)
    ds = inputs.dataset
    sources = [inputs.template, *inputs.cases]
    bank_truth = np.empty(len(bank_labels), np.int32)
    for i, case in enumerate(sources):
        sel = origin[:, 0] == i
        if sel.any():
            bank_truth[sel] = ds.read_label(case).array.ravel()[origin[sel, 1]]
    qcases = inputs.cases[: args.volumes]
    queries, q_truth, q_current, q_case, load_s = [], [], [], [], {}
    for j, case in enumerate(qcases):
        _, lab, ent = inputs.read_case(case)
        qmask = knn.query_mask(ent, threshold)
        tc = time.perf_counter()
        f = refine._query_features(inputs, case, lab, qmask, None, 0.0)  # projected per dimension below
        load_s[case] = time.perf_counter() - tc
        where = np.flatnonzero(qmask.ravel())
        queries.append((f, knn.flat_positions(where, lab.shape)))
        q_truth.append(ds.read_label(case).array.ravel()[where])
        q_current.append(lab.ravel()[where])
        q_case.append(np.full(len(where), j, np.int32))
    return dict(settings=s, inputs=inputs, split=split, threshold=threshold, qcases=qcases, plan=plan,
                bank16=bank16, bank_labels=bank_labels, bank_pos=bank_pos, bank_truth=bank_truth,
                queries=queries, q_truth=np.concatenate(q_truth), q_current=np.concatenate(q_current),
                q_case=np.concatenate(q_case), load_s=load_s, read_s=time.perf_counter() - t0)


def quality_diagnostic(args, data):
    """``refine`` itself on the cases (default settings but the benchmark's), and the mean Dice of
    the predictions and of the refined labels against the real ones (a diagnostic only)."""
    import dataclasses

    from semisam_o1.data.images import read_label
    from semisam_o1.methods.metrics import dice_per_class
    from semisam_o1.stages import refine

    s, inputs = data["settings"], data["inputs"]
    ds = inputs.dataset
    names = ds.label_map.names
    fg = ds.label_map.foreground

    def score(folder):
        per = [dice_per_class(read_label(Path(folder) / f"{c}.nii.gz", ds.label_map).array, ds.read_label(c).array, fg)
               for c in inputs.cases]
        return {names[c]: round(float(x), 4) for c, x in zip(fg, np.mean(per, axis=0))}

    out = {"cases": len(inputs.cases), "dice_per_class": {"predictions": score(s.pred)}, "seconds": {},
           "voxels_changed": {}}
    for name, cfg in {"voxel (refine's defaults)": {}, "voxel, features only": dict(position_weight=0.0),
                      "volume (official code)": dict(mode="volume")}.items():
        folder = Path(args.scratch) / name.split(" ")[0] / ("pos0" if cfg.get("position_weight") == 0.0 else "default")
        t = time.perf_counter()
        info = refine.refine(dataclasses.replace(s, output=folder, overwrite=True, **cfg))
        out["seconds"][name] = round(time.perf_counter() - t, 1)
        out["voxels_changed"][name] = info["voxels_changed_total"]
        out["dice_per_class"][name] = score(folder)
    out["dice_mean"] = {k: round(float(np.mean(list(v.values()))), 4) for k, v in out["dice_per_class"].items()}
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        Path(args.markdown).write_text(to_markdown(json.loads(Path(args.from_json).read_text())))
        return
    from semisam_o1.core import kernels

    t_all = time.perf_counter()
    data = build(args)
    ds = data["inputs"].dataset
    n_cls = ds.label_map.num_classes
    qcases, q_case, q_truth = data["qcases"], data["q_case"], data["q_truth"]
    bank16, bank_labels, bank_truth = data["bank16"], data["bank_labels"], data["bank_truth"]
    # shuffled once, so that a prefix is a random subset (the kNN result does not depend on the order)
    perm = np.random.default_rng(args.seed).permutation(len(bank16))
    bank16, bank_labels, bank_truth = bank16[perm], bank_labels[perm], bank_truth[perm]
    bank_pos = data["bank_pos"][perm] if data["bank_pos"] is not None else None
    bank_p, q_p, proj = kernel_inputs(bank16, bank_pos, data["queries"], args.project_dim, args.seed,
                                      args.position_weight)
    print(f"bank {bank_p.shape}, queries {q_p.shape}, built in {data['read_s']:.0f} s", flush=True)
    command = "python -m benchmarks.bench_refine " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": command, "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                    "load_average_at_start": list(os.getloadavg())},
        "data": {"features": str(args.features), "encoder_axes": list(data["inputs"].store.axes),
                 "feature_dim": int(bank16.shape[1]), "cohort_cases": len(data["inputs"].cases),
                 "unlabeled_pool": len(data["split"]["unlabeled"]), "query_volumes": len(qcases),
                 "uncertainty": f"predict entropy maps ({args.pred}), threshold {data['threshold']:.4g} nats "
                                f"(quantile {args.quantile})",
                 "bank_per_class": {ds.label_map.names[c]: int((bank_labels == c).sum()) for c in range(n_cls)},
                 "queries": int(len(q_p)), "k": args.k, "query_cases": qcases,
                 "position_weight": args.position_weight,
                 "read_features_s_per_case": round(float(np.mean(list(data["load_s"].values()))), 3)},
        "projection": proj,
    }
    result["headline"] = compare(q_p, bank_p, bank_labels, args.k, args.threads, n_cls, args.repeats, truth=q_truth)
    print("headline", result["headline"], flush=True)
    result["bank_size_series"] = []
    for n in [int(x) for x in args.bank_sizes.split(",") if x]:
        row = dict(result["headline"]) if n >= len(bank_p) else compare(
            q_p, bank_p[:n], bank_labels[:n], args.k, args.threads, n_cls, args.repeats, truth=q_truth)
        result["bank_size_series"].append(row)
        print("bank", n, row, flush=True)
    result["volume_series"] = []
    for v in [int(x) for x in args.volume_counts.split(",") if x]:
        sel = q_case < v
        row = dict(result["headline"]) if v >= len(qcases) else compare(
            q_p[sel], bank_p, bank_labels, args.k, args.threads, n_cls, args.repeats, truth=q_truth[sel])
        row["volumes"] = min(v, len(qcases))
        row["read_features_s"] = round(sum(data["load_s"][c] for c in qcases[:v]), 3)
        result["volume_series"].append(row)
        print("volumes", v, row, flush=True)
    full_and_grid(args, result, data, bank16, bank_pos, bank_labels, bank_truth, n_cls, kernels)
    if args.quality:
        result["quality_diagnostic"] = quality_diagnostic(args, data)
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


def full_and_grid(args, result, data, bank16, bank_pos, bank_labels, bank_truth, n_cls, kernels):
    """The full dimension on a slice of the queries, and what the projection, the bank size and k
    cost in agreement with it (one top-k search per (dim, bank size), votes in NumPy with the
    current labels and, as a diagnostic, with the bank voxels' real labels: an oracle bank)."""
    full_dim = bank16.shape[1]
    n_q = sum(len(f) for f, _ in data["queries"])
    nf = min(args.full_dim_queries, n_q) if args.full_dim_queries else n_q
    sl = np.random.default_rng(args.seed + 1).permutation(n_q)[:nf]
    truth, current = data["q_truth"][sl], data["q_current"][sl]
    bank_f, q_f, _ = kernel_inputs(bank16, bank_pos, data["queries"], 0, args.seed, args.position_weight)
    kept = {}
    full = compare(q_f[sl], bank_f, bank_labels, args.k, args.threads, n_cls, args.repeats, truth=truth,
                   keep_labels=kept)
    t = time.perf_counter()
    lab16, _ = kernels.knn_vote(q_f[sl].astype(np.float16), bank_f.astype(np.float16), bank_labels, args.k,
                                threads=args.threads)
    full["kernel_float16_s"] = round(time.perf_counter() - t, 3)
    full["float16_vs_float32_agreement"] = float((np.asarray(lab16) == kept["labels"]).mean())
    result["full_dimension"] = full
    dims = [(full_dim, False)] + [(int(x), False) for x in args.agreement_dims.split(",") if x and int(x) < full_dim]
    dims += [(int(x), True) for x in args.centred_dims.split(",") if x and int(x) < full_dim]
    sizes = [min(int(x), len(bank16)) for x in args.bank_sizes.split(",") if x]
    ks = sorted({args.k, 2 * args.k})
    grid = []
    for d, centred in dims:
        bd, qd, info = (bank_f, q_f, {"energy_kept": 1.0}) if d == full_dim else kernel_inputs(
            bank16, bank_pos, data["queries"], d, args.seed, args.position_weight, centred=centred)
        for n in sizes:
            t = time.perf_counter()
            _, _, idx, sim = kernels.knn_vote(qd[sl], bd[:n], bank_labels[:n], max(ks), threads=args.threads,
                                              return_topk=True)
            secs = time.perf_counter() - t
            for k in ks:
                cur = numpy_vote(idx[:, :k], sim[:, :k], bank_labels[:n], n_cls)
                ora = numpy_vote(idx[:, :k], sim[:, :k], bank_truth[:n], n_cls)
                grid.append({"dim": d, "projection": "centred PCA" if centred else
                             ("none" if d == full_dim else "uncentred PCA"), "kept": round(info["energy_kept"], 4),
                             "bank": n, "k": k, "search_s": round(secs, 3), "labels": cur, "oracle": ora,
                             "accuracy_current_bank_labels": round(float((cur == truth).mean()), 4),
                             "accuracy_oracle_bank_labels": round(float((ora == truth).mean()), 4)})
        print(f"dim {d}{' centred' if centred else ''}: done", flush=True)
    ref = next(g for g in grid if g["projection"] == "none" and g["bank"] == max(sizes) and g["k"] == args.k)
    ref_cur, ref_ora = ref["labels"], ref["oracle"]
    for g in grid:
        g["agreement_with_full_dim_largest_bank"] = round(float((g.pop("labels") == ref_cur).mean()), 4)
        g["agreement_oracle_labels"] = round(float((g.pop("oracle") == ref_ora).mean()), 4)
    result["projection_agreement"] = {
        "queries": int(nf), "reference": f"full dimension {full_dim}, bank {max(sizes)}, k {args.k}",
        "current_labels_accuracy": round(float((current == truth).mean()), 4),
        "note": "accuracy_* are diagnostics against the real labels of the query voxels (never used by refine); "
                "oracle = the bank voxels carry their real labels",
        "grid": grid}


if __name__ == "__main__":
    main()
