"""Speed of the C++ core against the obvious alternatives, same thread count for all.

kNN vote: Q queries against a bank of N rows, C channels, k neighbours (float16 inputs,
as in the feature store), end to end from the float16 arrays to (label, share):
  ours    semisam_o1.core.kernels.knn_vote (fused similarity + streaming top-k + vote)
  faiss   faiss-cpu IndexFlatIP on float32-normalised rows + NumPy vote
  numpy   float32-normalised rows, matmul per query block + argpartition + NumPy vote
  torch   the same with torch.matmul + torch.topk per query block
  ours_<isa>  the same kernel with its instruction-set path forced (_core.set_isa), for
          every path this CPU supports besides the automatic one (``--isas``)
GFLOP/s = 2*Q*N*C / seconds; "GEMM ratio" = that over this machine's float32 GEMM rate
(NumPy matmul, inner dimension C, same threads) measured just before and just after that
method (the mean of the two: the machine is shared, the rate drifts during a run).

Prototype similarity: N rows x C channels (float16) against K prototypes: ours vs a
NumPy implementation (blocked float32 normalise + matmul + argmax); GB/s = bytes of
features read / seconds.

Writes benchmarks/results/kernels.json (with the command that produced it) and the
markdown table benchmarks/kernels.md.

Usage: python benchmarks/bench_kernels.py [--threads 2] [--repeats 2] [--isas avx512,avx2] [--small]
(--small: a quick scaled-down run for smoke testing; results go to work/ instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=None,
                    help="repeats for the slow NumPy/torch kNN baselines (default: --repeats)")
    ap.add_argument("--Q", type=int, default=20_000)
    ap.add_argument("--N", type=int, default=200_000)
    ap.add_argument("--C", type=int, default=256)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--proto-N", type=int, default=2_000_000)
    ap.add_argument("--proto-K", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma list of methods to skip: faiss,numpy,torch")
    ap.add_argument("--isas", default="",
                    help="comma list of the kernels' instruction-set paths to time (scalar,avx2,"
                         "avx512; default: every one this CPU supports except scalar)")
    ap.add_argument("--small", action="store_true", help="quick scaled-down smoke run")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels.json)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite benchmarks/kernels.md from the recorded JSON")
    return ap.parse_args(argv)


ARGS = parse_args()
# BLAS/OpenMP thread counts must be fixed before numpy/torch/faiss load.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

from semisam_o1.core import kernels


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, repeats):
    med, times, out, _ = timed_cpu(fn, repeats)
    return med, times, out


def timed_cpu(fn, repeats):
    """Median wall seconds, wall times, last output, and the process CPU seconds of each run
    (all threads; a thread descheduled by another job accrues none)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(times)), times, out, cpu


def normalise32(x, block=65536):
    out = np.empty(x.shape, np.float32)
    for s in range(0, len(x), block):
        b = x[s : s + block].astype(np.float32)
        n = np.linalg.norm(b, axis=1, keepdims=True)
        np.divide(b, n, out=b, where=n > 0)
        b[(n == 0)[:, 0]] = 0
        out[s : s + block] = b
    return out


def numpy_vote(sims, idx, bank_labels, label_values):
    """Vote from (Q, k) neighbours: weights max(sim, 0), per-label sums, lowest label on ties."""
    w = np.maximum(sims, 0)
    lab = bank_labels[idx]
    sums = np.stack([(w * (lab == v)).sum(axis=1) for v in label_values], axis=1)
    win = np.argmax(sums, axis=1)
    total = w.sum(axis=1)
    share = np.where(total > 0, sums[np.arange(len(w)), win] / np.where(total > 0, total, 1), 0)
    label = np.where(total > 0, label_values[win], lab[:, 0])
    return label.astype(np.int32), share.astype(np.float32)


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def machine_info(threads):
    info = {"python": platform.python_version(), "numpy": np.__version__, "threads": threads,
            "cpus_available": kernels.default_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "Vendor ID", "CPU family", "Model", "CPU(s)",
                               "Thread(s) per core", "L1d cache", "L2 cache", "L3 cache"):
                info[key.strip()] = val.strip()
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
        flag_set = set(flags.partition(":")[2].split())
        info["simd_flags"] = {f: f in flag_set for f in SIMD_FLAGS}
        info["flags"] = " ".join(sorted(flag_set))
        info["avx2"] = "avx2" in flag_set
        info["avx512f"] = "avx512f" in flag_set
    except OSError:
        pass
    info["loadavg_start"] = os.getloadavg()
    from semisam_o1.core import _core

    info["core_isa_auto"] = _core.isa()
    info["core_supported_isas"] = list(_core.supported_isas())
    info["core_uses_avx2"] = bool(_core.has_avx2())
    info["core_module"] = os.path.relpath(_core.__file__, REPO)
    try:
        info["openblas"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("openblas configuration")
    except Exception:  # older NumPy: no mode="dicts"
        pass
    info["openblas_core"] = openblas_core()
    return info


def openblas_core():
    """The kernel family OpenBLAS picked at run time (DYNAMIC_ARCH), e.g. 'SkylakeX'; or None."""
    import ctypes
    import glob

    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in sorted(glob.glob(str(libdir / "*openblas*"))):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                    "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def isa_paths(arg):
    """The instruction-set paths to time besides the automatic one ('ours')."""
    from semisam_o1.core import _core

    supported = list(_core.supported_isas())
    wanted = [x for x in arg.split(",") if x] if arg else [x for x in supported if x != "scalar"]
    bad = [x for x in wanted if x not in supported]
    if bad:
        raise SystemExit(f"--isas: this CPU cannot run {bad} (it supports {supported})")
    return [x for x in wanted if x != _core.isa()]


def bench_gemm(C, threads, repeats):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, C), dtype=np.float32)
    b = rng.standard_normal((C, 32768), dtype=np.float32)
    out = np.empty((4096, 32768), np.float32)
    np.matmul(a, b, out=out)  # warm-up
    med, times, _, cpu = timed_cpu(lambda: np.matmul(a, b, out=out), max(repeats, 5))
    flop = 2 * 4096 * C * 32768
    return {"shape": [4096, C, 32768], "seconds": med, "times": times, "cpu_times": cpu,
            "gflops": flop / med / 1e9,
            "gflops_cpu": flop / (float(np.median(cpu)) / threads) / 1e9}


def bench_knn(a, threads, gemm_start, save=lambda part: None):
    rng = np.random.default_rng(1)
    Q, N, C, k = a.Q, a.N, a.C, a.k
    log(f"kNN data: Q={Q} N={N} C={C} k={k} float16")
    queries = rng.standard_normal((Q, C), dtype=np.float32).astype(np.float16)
    bank = rng.standard_normal((N, C), dtype=np.float32).astype(np.float16)
    # give the bank some structure so the vote is not pure noise
    bank_labels = rng.integers(0, 3, N).astype(np.int32)
    label_values = np.unique(bank_labels)
    flops = 2.0 * Q * N * C
    skip = set(filter(None, a.skip.split(",")))
    res = {"Q": Q, "N": N, "C": C, "k": k, "dtype": "float16", "flop": flops, "methods": {},
           "gemm_series": [gemm_start]}
    outs = {}
    from semisam_o1.core import _core

    def record(name, med, times, cpu, note="", **extra):
        # GEMM right after this method; the ratio uses the mean of the GEMM before and after
        before_run = res["gemm_series"][-1]
        after_run = bench_gemm(C, threads, a.repeats)
        res["gemm_series"].append(after_run)
        before, after = before_run["gflops"], after_run["gflops"]
        ref = 0.5 * (before + after)
        g = flops / med / 1e9
        # The same on CPU time (FLOP / (process CPU seconds / threads)): insensitive to the
        # time other jobs take the cores from us; threads that spin while waiting (OpenBLAS,
        # OpenMP) count against their method.
        g_cpu = flops / (float(np.median(cpu)) / threads) / 1e9
        ref_cpu = 0.5 * (before_run["gflops_cpu"] + after_run["gflops_cpu"])
        res["methods"][name] = {"seconds": med, "times": times, "repeats": len(times), "gflops": g,
                                "gemm_before": before, "gemm_after": after, "gemm_ratio": g / ref,
                                "gemm_ratio_start": g / gemm_start["gflops"],
                                "cpu_times": cpu, "gflops_cpu": g_cpu, "gemm_cpu_before": before_run["gflops_cpu"],
                                "gemm_cpu_after": after_run["gflops_cpu"], "gemm_ratio_cpu": g_cpu / ref_cpu,
                                "note": note, **extra}
        log(f"  {name}: {med:.2f} s  {g:.1f} GFLOP/s  ({g / ref:.0%} of GEMM {before:.0f}/{after:.0f}; "
            f"CPU-time basis {g_cpu:.0f} GFLOP/s, {g_cpu / ref_cpu:.0%} of GEMM)")
        save(res)

    # ours: the automatic path, then each other instruction-set path forced
    def ours():
        return kernels.knn_vote(queries, bank, bank_labels, k, threads=threads, return_topk=True)

    auto_isa = _core.isa()
    med, times, out, cpu = timed_cpu(ours, a.repeats)
    outs["ours"] = out
    record("ours", med, times, cpu, f"semisam_o1.core.kernels.knn_vote, fused, float16 in, automatic path "
           f"({auto_isa})", isa=auto_isa)
    for isa in isa_paths(a.isas):
        _core.set_isa(isa)
        try:
            assert _core.isa() == isa
            med, times, out, cpu = timed_cpu(ours, a.repeats)
        finally:
            _core.set_isa("auto")
        outs[f"ours_{isa}"] = out
        record(f"ours_{isa}", med, times, cpu, f"the same, {isa} path forced (_core.set_isa)", isa=isa)

    if "faiss" not in skip:
        import faiss

        faiss.omp_set_num_threads(threads)

        def run_faiss():
            index = faiss.IndexFlatIP(C)
            index.add(normalise32(bank))
            D, I = index.search(normalise32(queries), k)
            lab, share = numpy_vote(D, I, bank_labels, label_values)
            return lab, share, I, D

        med, times, out, cpu = timed_cpu(run_faiss, a.repeats)
        outs["faiss"] = out
        record("faiss", med, times, cpu, f"faiss {faiss.__version__} IndexFlatIP + NumPy vote")

    qblock = 256
    if "torch" not in skip:
        import torch

        torch.set_num_threads(threads)

        def run_torch():
            bn = torch.from_numpy(normalise32(bank))
            qn = torch.from_numpy(normalise32(queries))
            I = torch.empty((Q, k), dtype=torch.int64)
            D = torch.empty((Q, k), dtype=torch.float32)
            with torch.inference_mode():
                for s in range(0, Q, qblock):
                    e = min(Q, s + qblock)
                    v, i = torch.topk(qn[s:e] @ bn.T, k, dim=1)
                    I[s:e] = i
                    D[s:e] = v
            lab, share = numpy_vote(D.numpy(), I.numpy(), bank_labels, label_values)
            return lab, share, I.numpy(), D.numpy()

        med, times, out, cpu = timed_cpu(run_torch, a.baseline_repeats or a.repeats)
        outs["torch"] = out
        record("torch", med, times, cpu, f"torch {torch.__version__}, blocks of {qblock}: matmul + topk + NumPy vote")

    if "numpy" not in skip:

        def run_numpy():
            bn = normalise32(bank)
            qn = normalise32(queries)
            I = np.empty((Q, k), np.int64)
            D = np.empty((Q, k), np.float32)
            S = np.empty((qblock, N), np.float32)
            for s in range(0, Q, qblock):
                e = min(Q, s + qblock)
                Sb = S[: e - s]
                np.matmul(qn[s:e], bn.T, out=Sb)
                part = np.argpartition(-Sb, k - 1, axis=1)[:, :k]
                ps = np.take_along_axis(Sb, part, axis=1)
                order = np.argsort(-ps, axis=1, kind="stable")
                I[s:e] = np.take_along_axis(part, order, axis=1)
                D[s:e] = np.take_along_axis(ps, order, axis=1)
            lab, share = numpy_vote(D, I, bank_labels, label_values)
            return lab, share, I, D

        med, times, out, cpu = timed_cpu(run_numpy, a.baseline_repeats or a.repeats)
        outs["numpy"] = out
        record("numpy", med, times, cpu, f"blocks of {qblock} queries: matmul + argpartition + NumPy vote")

    # agreement with ours (labels; top-k similarity values)
    ref = outs["ours"]
    for name, out in outs.items():
        if name == "ours":
            continue
        res["methods"][name]["label_agreement_with_ours"] = float(np.mean(out[0] == ref[0]))
        res["methods"][name]["max_abs_topk_sim_diff"] = float(np.abs(out[3] - ref[3]).max())
    if "faiss" in res["methods"]:
        res["speedup_vs_faiss"] = res["methods"]["faiss"]["seconds"] / res["methods"]["ours"]["seconds"]
    return res


def bench_prototype(a, threads):
    rng = np.random.default_rng(2)
    N, C, K = a.proto_N, a.C, a.proto_K
    log(f"prototype data: N={N} C={C} K={K} float16")
    feats = np.empty((N, C), np.float16)
    for s in range(0, N, 262144):
        e = min(N, s + 262144)
        feats[s:e] = rng.standard_normal((e - s, C), dtype=np.float32)
    protos = rng.standard_normal((K, C), dtype=np.float32)
    nbytes = feats.nbytes

    def ours():
        return kernels.prototype_similarity(feats, protos, threads=threads)

    def numpy_impl(block=131072):
        pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
        scores = np.empty((N, K), np.float32)
        for s in range(0, N, block):
            f = feats[s : s + block].astype(np.float32)
            n = np.linalg.norm(f, axis=1, keepdims=True)
            sc = f @ pn.T
            np.divide(sc, n, out=sc, where=n > 0)
            scores[s : s + block] = sc
        return scores, np.argmax(scores, axis=1).astype(np.int32)

    from semisam_o1.core import _core

    ours()  # warm-up (page in)
    med_o, t_o, out_o = timed(ours, a.repeats)
    paths = {_core.isa(): {"seconds": med_o, "times": t_o, "GBps": nbytes / med_o / 1e9}}
    for isa in isa_paths(a.isas):
        _core.set_isa(isa)
        try:
            med_i, t_i, out_i = timed(ours, a.repeats)
        finally:
            _core.set_isa("auto")
        paths[isa] = {"seconds": med_i, "times": t_i, "GBps": nbytes / med_i / 1e9,
                      "max_abs_score_diff_vs_auto": float(np.abs(out_i[0] - out_o[0]).max())}
        log(f"  ours [{isa}] {med_i:.3f} s ({nbytes / med_i / 1e9:.1f} GB/s)")
    med_n, t_n, out_n = timed(numpy_impl, a.repeats)
    res = {"N": N, "C": C, "K": K, "dtype": "float16", "bytes_read": nbytes,
           "ours": {"seconds": med_o, "times": t_o, "GBps": nbytes / med_o / 1e9, "isa": _core.isa()},
           "isa_paths": paths,
           "numpy": {"seconds": med_n, "times": t_n, "GBps": nbytes / med_n / 1e9,
                     "note": "blocks of 131072 rows: astype(float32), norm, matmul, divide, argmax"},
           "speedup_vs_numpy": med_n / med_o,
           "max_abs_score_diff": float(np.abs(out_o[0] - out_n[0]).max()),
           "label_agreement": float(np.mean(out_o[1] == out_n[1]))}
    log(f"  ours {med_o:.3f} s ({nbytes / med_o / 1e9:.1f} GB/s), numpy {med_n:.3f} s "
        f"({nbytes / med_n / 1e9:.2f} GB/s): {med_n / med_o:.1f}x")
    return res


def _speedup_vs_faiss(kn):
    m = kn.get("methods", {})
    if "faiss" in m and "ours" in m:
        return m["faiss"]["seconds"] / m["ours"]["seconds"]
    return float("nan")


def targets_of(res):
    kn, p = res.get("knn_vote", {}), res.get("prototype_similarity")
    if "ours" not in kn.get("methods", {}) or p is None:
        return {}
    t = {
        "knn_at_least_faiss": _speedup_vs_faiss(kn) >= 1.0,
        "knn_at_least_half_gemm": kn["methods"]["ours"]["gemm_ratio"] >= 0.5,
        "prototype_at_least_3x_numpy": p["speedup_vs_numpy"] >= 3.0,
    }
    avx512 = _isa_entry(kn, "avx512")
    if avx512 is not None:
        t["knn_avx512_at_least_80pct_gemm"] = avx512["gemm_ratio"] >= 0.8
    return t


def _isa_entry(kn, isa):
    """The kNN method entry timed on instruction-set path `isa` (automatic or forced)."""
    for name, m in kn.get("methods", {}).items():
        if name.startswith("ours") and m.get("isa") == isa:
            return m
    return None


ISA_NAMES = {"avx512": "AVX-512 (14x32 zmm tiles, vcvtph2ps zmm)", "avx2": "AVX2/FMA (6x16 ymm tiles)",
             "scalar": "scalar C++"}


def markdown(res):
    kn = res["knn_vote"]
    m0 = res["machine"]
    flags = m0.get("simd_flags", {})
    lines = [
        f"Kernel benchmark ({m0.get('Model name', '?')}, {m0['threads']} threads for every method, "
        f"median of {res['repeats']} runs (see the repeats column); `{res['command']}`; raw numbers "
        "in `benchmarks/results/kernels.json`).",
        "",
        "CPU flags: " + (", ".join(f for f, on in flags.items() if on) or "?") +
        f"; the core's paths on this CPU: {', '.join(m0.get('core_supported_isas', []))} "
        f"(automatic choice: {m0.get('core_isa_auto', '?')}).",
        "",
        f"kNN vote, Q = {kn['Q']:,} queries, bank N = {kn['N']:,}, C = {kn['C']}, k = {kn['k']}, "
        f"float16 in. Reference: float32 GEMM (NumPy matmul {res['gemm']['shape'][0]} x {kn['C']} x "
        f"{res['gemm']['shape'][2]}; OpenBLAS, {m0.get('openblas_core') or '?'} kernels chosen at run time), "
        "measured before and after every "
        "method; \"% of GEMM\" divides by the mean of those two.",
        "",
        "Instruction-set paths of the fused kernel (one run, one after another):",
        "",
        "| path | seconds | repeats | GFLOP/s | GEMM before / after (GFLOP/s) | % of GEMM | "
        "CPU-time basis: GFLOP/s, % of GEMM |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for isa in ("avx512", "avx2", "scalar"):
        m = _isa_entry(kn, isa)
        if m is None:
            continue
        cpu = (f"{m['gflops_cpu']:.0f}, {100 * m['gemm_ratio_cpu']:.0f}%" if "gflops_cpu" in m else "-")
        lines.append(f"| {ISA_NAMES[isa]} | {m['seconds']:.1f} | {len(m['times'])} | {m['gflops']:.0f} | "
                     f"{m['gemm_before']:.0f} / {m['gemm_after']:.0f} | {100 * m['gemm_ratio']:.0f}% | {cpu} |")
    lines += ["", "CPU-time basis: FLOP / (process CPU seconds / threads), for the kernel and for the "
              "GEMM alike; it does not count the time other jobs on this shared machine take the cores "
              "(a descheduled thread accrues no CPU time), so it varies less than the wall-clock rate.",
              "",
              "The path is chosen at call time from the CPU (AVX-512 F/BW/VL/DQ, else AVX2+FMA+F16C, "
              "else scalar); `semisam_o1._core.isa()` names it, `_core.set_isa('avx2')` or "
              "`SEMISAM_ISA=avx2|avx512|scalar|auto` forces one (a path the CPU lacks falls back to "
              "the best it has). The AVX code is compiled with target attributes, so the same binary "
              "runs on AVX2-only and older x86-64 CPUs."]
    a5, a2 = _isa_entry(kn, "avx512"), _isa_entry(kn, "avx2")
    if a5 is not None and a2 is not None:
        lines += ["", f"AVX-512 over AVX2: {a2['seconds'] / a5['seconds']:.2f}x; labels equal "
                  f"{100 * kn['methods'].get('ours_avx2', {}).get('label_agreement_with_ours', float('nan')):.2f}%, "
                  f"largest top-k similarity difference "
                  f"{kn['methods'].get('ours_avx2', {}).get('max_abs_topk_sim_diff', float('nan')):.1e}."]
    lines += [
        "",
        "Against the alternatives:",
        "",
        "| method | seconds | repeats | GFLOP/s | % of GEMM | labels equal to ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"ours": f"semisam_o1 `knn_vote` (fused C++, {kn['methods'].get('ours', {}).get('isa', '?')})",
             "faiss": "faiss-cpu IndexFlatIP + NumPy vote",
             "numpy": "NumPy matmul + argpartition (blocks)", "torch": "torch matmul + topk (blocks)"}
    for name, m in kn["methods"].items():
        if name.startswith("ours_"):
            continue
        agree = m.get("label_agreement_with_ours")
        lines.append(f"| {names.get(name, name)} | {m['seconds']:.1f} | {len(m['times'])} | {m['gflops']:.0f} | "
                     f"{100 * m['gemm_ratio']:.0f}% | {'-' if agree is None else f'{100 * agree:.2f}%'} |")
    p = res["prototype_similarity"]
    lines += [
        "",
        f"Prototype similarity, N = {p['N']:,} rows, C = {p['C']}, K = {p['K']}, float16 "
        f"({p['bytes_read'] / 1e9:.2f} GB read):",
        "",
        "| method | seconds | GB/s read |",
        "|---|---:|---:|",
    ]
    paths = p.get("isa_paths") or {p["ours"].get("isa", "?"): p["ours"]}
    for isa, m in paths.items():
        lines.append(f"| semisam_o1 `prototype_similarity` (C++, {isa}) | {m['seconds']:.3f} | {m['GBps']:.1f} |")
    lines += [
        f"| NumPy (blocked float32 normalise + matmul + argmax) | {p['numpy']['seconds']:.3f} | "
        f"{p['numpy']['GBps']:.2f} |",
        "",
    ]
    if len(paths) > 1:
        spread = "; ".join(f"{isa} {min(m['times']):.3f}-{max(m['times']):.3f} s" for isa, m in paths.items())
        lines += [
            "Prototype similarity reads every feature row once (K = 8 prototypes: about 8 FLOP per "
            "byte read), so it is bound by memory bandwidth rather than by the vector width; on this "
            f"shared machine the per-path times spread over {spread} across repeats.",
            "",
        ]
    lines += [
        f"Speed-ups: kNN vote {_speedup_vs_faiss(kn):.2f}x faiss-cpu; prototype "
        f"similarity {p['speedup_vs_numpy']:.1f}x NumPy.",
    ]
    t = res.get("targets_met") or targets_of(res)
    if t:
        ours = kn["methods"]["ours"]
        lines += [
            "",
            "Targets: kNN vote at least as fast as faiss-cpu + NumPy vote: "
            f"{'met' if t['knn_at_least_faiss'] else 'missed'} "
            f"({_speedup_vs_faiss(kn):.2f}x); at least 50% of the measured GEMM rate: "
            f"{'met' if t['knn_at_least_half_gemm'] else 'missed'} ({100 * ours['gemm_ratio']:.0f}%); "
            "prototype similarity at least 3x NumPy: "
            f"{'met' if t['prototype_at_least_3x_numpy'] else 'missed'} ({p['speedup_vs_numpy']:.1f}x)"
            + (f"; AVX-512 path at least 80% of the GEMM rate: "
               f"{'met' if t['knn_avx512_at_least_80pct_gemm'] else 'missed'} ({100 * a5['gemm_ratio']:.0f}%)."
               if "knn_avx512_at_least_80pct_gemm" in t else "."),
        ]
    if "gemm_end" in res:
        series = ", ".join(f"{g['gflops']:.0f}" for g in kn.get("gemm_series", []))
        lines += [
            "",
            f"The machine is shared (load average {m0['loadavg_start'][0]:.1f} at the start, "
            f"{m0.get('loadavg_end', [float('nan')])[0]:.1f} at the end, on {m0.get('CPU(s)', '?')} CPUs), so "
            f"absolute rates are noisy: the GEMM measured {series} GFLOP/s over the kNN part of the run "
            "(before the first method and after each), which is why each ratio uses the GEMM "
            "measured around that method; every method ran under the same conditions, one after another.",
        ]
    return "\n".join(lines) + "\n"


def main():
    a = ARGS
    if a.markdown_only:
        src = Path(a.out) if a.out else REPO / "benchmarks" / "results" / "kernels.json"
        md = markdown(json.loads(src.read_text()))
        (REPO / "benchmarks" / "kernels.md").write_text(md)
        print(md)
        return
    if a.small:
        a.Q, a.N, a.proto_N = 2000, 20000, 100_000
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + sys.argv[1:])
    res = {"command": command, "repeats": a.repeats, "machine": machine_info(a.threads),
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    log(f"machine: { {k: v for k, v in res['machine'].items() if k != 'flags'} }")
    res["prototype_similarity"] = bench_prototype(a, a.threads)
    res["gemm"] = bench_gemm(a.C, a.threads, a.repeats)
    log(f"GEMM float32 {res['gemm']['shape']}: {res['gemm']['gflops']:.1f} GFLOP/s")
    if a.out:
        out = Path(a.out)
    elif a.small:
        out = REPO / "work" / "bench_kernels_small.json"
    else:
        out = REPO / "benchmarks" / "results" / "kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(knn_part=None):
        if knn_part is not None:
            res["knn_vote"] = knn_part
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(out)

    save()
    res["knn_vote"] = bench_knn(a, a.threads, res["gemm"], save)
    # The GEMM is measured after every method (gemm_series); the last one is the end value.
    res["gemm_end"] = res["knn_vote"]["gemm_series"][-1]
    log(f"GEMM at the end: {res['gemm_end']['gflops']:.1f} GFLOP/s")
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    targets = targets_of(res)
    res["targets_met"] = targets
    log(f"targets: {targets}")
    save()
    md = markdown(res)
    md_path = out.with_name("kernels.md") if a.small or a.out else REPO / "benchmarks" / "kernels.md"
    md_path.write_text(md)
    log(f"wrote {out} and {md_path}")
    print(md)


if __name__ == "__main__":
    main()
