"""The C++ core (semisam_o1.core._core) and the CUDA kernels' logic against NumPy references.

Reference (float64 NumPy): cosine = (a/|a|) . (b/|b|), zero vectors -> 0; kNN top-k
ordered by similarity descending, ties lowest bank index; vote weights max(sim, 0)
summed per label, highest sum wins, ties lowest label; all weights 0 -> label of the
most similar neighbour, share 0.

Non-contiguous inputs: the ``semisam_o1.core.kernels`` wrappers copy them (tested here to
give the same result); the raw ``_core`` functions raise ValueError naming the argument.

Instruction-set paths: the CPU kernels have a scalar, an AVX2 and an AVX-512 path, picked
at call time (``_core.isa()``); the ``isa`` fixture forces each one with ``_core.set_isa``
and runs the reference tests on it, skipping (with the reason) a path this CPU lacks.

CUDA: the kernels' per-thread code is run on the CPU through
``_core_cuda._emulate_*`` (needs the CUDA module to be built, not a GPU); the real
device path runs only where a GPU exists and is skipped with a reason otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

from semisam_o1.core import kernels

core = pytest.importorskip("semisam_o1.core._core", reason="C++ core not built (pip install .)")

try:
    from semisam_o1.core import _core_cuda
except ImportError:  # CUDA module not built on this machine
    _core_cuda = None


# ---- NumPy references ------------------------------------------------------------------


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(n > 0, x / np.where(n > 0, n, 1), 0.0)
    return out


def ref_prototype(features, prototypes):
    s = _normalise(features) @ _normalise(prototypes).T
    return s, np.argmax(s, axis=1)


def ref_cos(queries, bank):
    return _normalise(queries) @ _normalise(bank).T


def ref_vote(sims_ranked, idx_ranked, bank_labels, label_weights=None):
    """Vote of one query from its neighbours in rank order (optional per-label weights)."""
    labs = bank_labels[idx_ranked]
    w = np.maximum(sims_ranked, 0.0)
    if label_weights is not None:
        w = w * np.asarray(label_weights, np.float64)[labs]
    total = w.sum()
    if total <= 0:
        return int(labs[0]), 0.0
    sums = {}
    for lab, wt in zip(labs, w):
        sums[int(lab)] = sums.get(int(lab), 0.0) + wt
    best = max(sums.values())
    winner = min(lab for lab, v in sums.items() if v == best)
    return winner, best / total


def ref_knn(queries, bank, bank_labels, k, label_weights=None):
    S = ref_cos(queries, bank)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(S, order, axis=1)
    labels, share = zip(*(ref_vote(sims[i], order[i], bank_labels, label_weights) for i in range(len(S))))
    return np.array(labels), np.array(share), order, sims, S


def rand(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- instruction-set paths ------------------------------------------------------------------

ISAS = ["scalar", "avx2", "avx512"]


def _force_isa(name):
    """Forces the CPU kernels' path; pytest.skip (with the reason) where the CPU lacks it."""
    supported = core.supported_isas()
    if name not in supported:
        pytest.skip(f"this CPU cannot run the {name} kernels (it supports {supported})")
    core.set_isa(name)
    assert core.isa() == name


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per instruction-set path (scalar, AVX2, AVX-512)."""
    _force_isa(request.param)
    try:
        yield request.param
    finally:
        core.set_isa("auto")


# ---- prototype similarity -----------------------------------------------------------------


@pytest.mark.parametrize("fdt", [np.float16, np.float32])
@pytest.mark.parametrize("pdt", [np.float16, np.float32])
@pytest.mark.parametrize("C", [256, 37, 3])
def test_prototype_random(fdt, pdt, C, isa):
    rng = np.random.default_rng(C)
    f = rand(rng, (3001, C), fdt)
    p = rand(rng, (11, C), pdt)  # K=11: one group of 8 + a group of 3
    s, lab = kernels.prototype_similarity(f, p, threads=2)
    rs, rl = ref_prototype(f, p)
    assert s.dtype == np.float32 and s.shape == (3001, 11)
    assert lab.dtype == np.int32 and lab.shape == (3001,)
    np.testing.assert_allclose(s, rs, atol=2e-6)
    srt = np.sort(rs, axis=1)
    clear = srt[:, -1] - srt[:, -2] > 1e-5  # argmax well defined
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(lab[clear], rl[clear])


def test_prototype_threads_and_generic_path_agree():
    rng = np.random.default_rng(1)
    f = rand(rng, (5000, 64), np.float16)
    p = rand(rng, (8, 64))
    s1, l1 = kernels.prototype_similarity(f, p, threads=1)
    s2, l2 = kernels.prototype_similarity(f, p, threads=2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(l1, l2)
    core._force_generic(True)
    try:
        sg, lg = kernels.prototype_similarity(f, p, threads=2)
    finally:
        core._force_generic(False)
    np.testing.assert_allclose(sg, s1, atol=2e-6)
    np.testing.assert_allclose(sg, ref_prototype(f, p)[0], atol=2e-6)


def test_prototype_zero_vectors_ties_and_float16_range(isa):
    rng = np.random.default_rng(2)
    C = 40
    f = rand(rng, (20, C), np.float16)
    f[3] = 0  # zero feature: scores 0, label 0
    p = rand(rng, (4, C))
    p[2] = 0  # zero prototype: score 0
    p[3] = p[1]  # duplicate prototype: argmax takes the lower index
    s, lab = kernels.prototype_similarity(f, p, threads=2)
    assert np.isfinite(s).all()
    np.testing.assert_array_equal(s[3], 0)
    assert lab[3] == 0
    np.testing.assert_array_equal(s[:, 2], 0)
    np.testing.assert_array_equal(s[:, 1], s[:, 3])
    assert not (lab == 3).any()
    np.testing.assert_allclose(s, ref_prototype(f, p)[0], atol=2e-6)
    # float16 near its range (65504): squares overflow float16 but not float32
    big = (rng.uniform(-1, 1, (100, 256)) * 60000).astype(np.float16)
    big[0] = 60000
    pb = (rng.uniform(-1, 1, (5, 256)) * 60000).astype(np.float16)
    s, lab = kernels.prototype_similarity(big, pb, threads=2)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, ref_prototype(big, pb)[0], atol=2e-6)
    # tiny float32 values (squares underflow float32): recomputed in double
    tiny = rand(rng, (10, 16)) * np.float32(1e-25)
    s, _ = kernels.prototype_similarity(tiny, p[:, :16].copy(), threads=1)
    np.testing.assert_allclose(s, ref_prototype(tiny, p[:, :16])[0], atol=2e-6)


def test_prototype_non_contiguous_and_torch():
    rng = np.random.default_rng(3)
    base = rand(rng, (500, 64), np.float16)
    f = base[::2, ::2]  # non-contiguous view (250, 32)
    p = rand(rng, (32, 5)).T  # transposed (5, 32)
    s, lab = kernels.prototype_similarity(f, p, threads=2)
    np.testing.assert_allclose(s, ref_prototype(f, p)[0], atol=2e-6)
    with pytest.raises(ValueError, match="features"):
        core.prototype_similarity(f, np.ascontiguousarray(p), 1)
    with pytest.raises(ValueError, match="prototypes"):
        core.prototype_similarity(np.ascontiguousarray(f), p, 1)
    torch = pytest.importorskip("torch")
    s2, _ = kernels.prototype_similarity(torch.from_numpy(np.ascontiguousarray(f)), p)
    np.testing.assert_array_equal(s, s2)


@pytest.mark.parametrize(
    "features,prototypes,name",
    [
        (np.zeros((4, 8), np.float64), np.zeros((2, 8), np.float32), "features"),
        (np.zeros((4, 8), np.int32), np.zeros((2, 8), np.float32), "features"),
        (np.zeros((4, 8, 1), np.float32), np.zeros((2, 8), np.float32), "features"),
        (np.zeros((4, 8), np.float32), np.zeros((2, 7), np.float32), "prototypes"),
        (np.zeros((4, 8), np.float32), np.zeros((0, 8), np.float32), "prototypes"),
        (np.zeros((4, 8), np.float32), np.zeros((2, 8), np.int64), "prototypes"),
        (np.zeros((4, 0), np.float32), np.zeros((2, 0), np.float32), "features"),
    ],
)
def test_prototype_bad_arguments(features, prototypes, name):
    with pytest.raises(ValueError, match=name):
        kernels.prototype_similarity(features, prototypes)
    if features.dtype != np.float64 or name != "features":
        with pytest.raises(ValueError, match=name):
            core.prototype_similarity(
                np.ascontiguousarray(features), np.ascontiguousarray(prototypes), 1
            )


def test_prototype_bad_threads():
    f = np.ones((3, 4), np.float32)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads"):
            kernels.prototype_similarity(f, f, threads=bad)


def test_prototype_empty_features():
    s, lab = kernels.prototype_similarity(np.zeros((0, 8), np.float16), np.ones((3, 8), np.float32))
    assert s.shape == (0, 3) and lab.shape == (0,)


# ---- kNN vote -------------------------------------------------------------------------------


def check_knn(out, q, b, bl, k, label_weights=None):
    labels, share, idx, sims = out
    rl, rs, ridx, rsims, S = ref_knn(q, b, bl, k, label_weights)
    Q = len(q)
    assert labels.shape == (Q,) and labels.dtype == np.int32
    assert share.shape == (Q,) and share.dtype == np.float32
    assert idx.shape == (Q, k) and idx.dtype == np.int64
    assert sims.shape == (Q, k) and sims.dtype == np.float32
    # similarities of the k best, in rank order, and the indices really have them
    np.testing.assert_allclose(sims, rsims, atol=3e-6)
    np.testing.assert_allclose(np.take_along_axis(S, idx, axis=1), sims, atol=3e-6)
    assert (np.diff(sims, axis=1) <= 0).all()
    for i in range(Q):  # no repeated neighbour
        assert len(set(idx[i].tolist())) == k
    # the vote, recomputed from the kernel's own neighbours, matches exactly the rule
    for i in range(Q):
        lab, sh = ref_vote(sims[i].astype(np.float64), idx[i], bl, label_weights)
        assert labels[i] == lab
        assert abs(share[i] - sh) < 1e-5
    # and agrees with the float64 reference wherever neighbours are unambiguous
    same = (idx == ridx).all(axis=1)
    assert same.mean() > 0.9
    np.testing.assert_array_equal(labels[same], rl[same])
    np.testing.assert_allclose(share[same], rs[same], atol=1e-5)


@pytest.mark.parametrize("qdt", [np.float16, np.float32])
@pytest.mark.parametrize("bdt", [np.float16, np.float32])
def test_knn_random(qdt, bdt, isa):
    rng = np.random.default_rng(10)
    # N crosses the 2048-row bank super-block and is not a multiple of 16; C not of 8
    q = rand(rng, (61, 37), qdt)
    b = rand(rng, (4133, 37), bdt)
    bl = rng.integers(0, 4, 4133).astype(np.int32)
    out = kernels.knn_vote(q, b, bl, 7, threads=2, return_topk=True)
    check_knn(out, q, b, bl, 7)
    lab2, share2 = kernels.knn_vote(q, b, bl, 7, threads=2)
    np.testing.assert_array_equal(lab2, out[0])
    np.testing.assert_array_equal(share2, out[1])


def test_knn_c256_threads_and_generic_path():
    rng = np.random.default_rng(11)
    q = rand(rng, (100, 256), np.float16)
    b = rand(rng, (3000, 256), np.float16)
    bl = rng.integers(0, 3, 3000).astype(np.int32)
    o1 = kernels.knn_vote(q, b, bl, 5, threads=1, return_topk=True)
    o2 = kernels.knn_vote(q, b, bl, 5, threads=2, return_topk=True)
    for a, c in zip(o1, o2):
        np.testing.assert_array_equal(a, c)
    check_knn(o2, q, b, bl, 5)
    core._force_generic(True)
    try:
        og = kernels.knn_vote(q, b, bl, 5, threads=2, return_topk=True)
    finally:
        core._force_generic(False)
    check_knn(og, q, b, bl, 5)


def test_knn_large_k_and_k_equals_n(isa):
    rng = np.random.default_rng(12)
    q = rand(rng, (30, 16))
    b = rand(rng, (150, 16))
    bl = rng.integers(-2, 5, 150).astype(np.int32)  # negative labels are fine
    check_knn(kernels.knn_vote(q, b, bl, 100, threads=2, return_topk=True), q, b, bl, 100)
    out = kernels.knn_vote(q, b, bl, 150, threads=2, return_topk=True)
    check_knn(out, q, b, bl, 150)
    np.testing.assert_array_equal(np.sort(out[2], axis=1), np.tile(np.arange(150), (30, 1)))


@pytest.mark.parametrize("k", [5, 100])  # k <= 64: vote.hpp's rank-order rule; k > 64: the sort path
def test_knn_label_weights(k, isa):
    """Per-label vote weights against the float64 reference; weights of 1 = no weights."""
    rng = np.random.default_rng(13)
    q = rand(rng, (80, 24), np.float16)
    b = rand(rng, (900, 24))
    bl = rng.integers(0, 4, 900).astype(np.int32)
    w = np.array([3.0, 1.0, 0.25, 2.0], np.float32)
    out = kernels.knn_vote(q, b, bl, k, threads=2, return_topk=True, label_weights=w)
    check_knn(out, q, b, bl, k, label_weights=w)
    plain = kernels.knn_vote(q, b, bl, k, threads=2, return_topk=True)
    assert (out[0] != plain[0]).sum() > 5  # the weights really change winners here
    ones = kernels.knn_vote(q, b, bl, k, threads=1, label_weights=[1, 1, 1, 1])
    np.testing.assert_array_equal(ones[0], plain[0])
    np.testing.assert_allclose(ones[1], plain[1], atol=1e-6)
    # a zero weight removes a label from the vote (and from the share's denominator)
    w0 = np.array([1, 0, 1, 1], np.float32)
    lab0, share0 = kernels.knn_vote(q, b, bl, k, threads=2, label_weights=w0)
    assert not np.any((lab0 == 1) & (share0 > 0))
    with pytest.raises(ValueError, match="bank_labels: label 3 .* has no weight"):
        kernels.knn_vote(q, b, bl, k, label_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="label_weights: weights must be finite and >= 0"):
        kernels.knn_vote(q, b, bl, k, label_weights=[1, -1, 1, 1])
    with pytest.raises(ValueError, match="label_weights: weights must be finite"):
        kernels.knn_vote(q, b, bl, k, label_weights=[1, np.nan, 1, 1])
    with pytest.raises(ValueError, match="label_weights: expected a 1-D"):
        kernels.knn_vote(q, b, bl, k, label_weights=np.ones((2, 2)))


def test_knn_ties_duplicates_zero_vectors(isa):
    C = 8
    e = np.eye(C, dtype=np.float32)
    # bank: rows 0, 2, 3 are the same vector; 1 and 4 other directions
    b = np.stack([e[0], e[1], e[0], e[0], e[2]])
    bl = np.array([5, 1, 2, 7, 0], np.int32)
    q = np.stack([e[0], -e[0], np.zeros(C, np.float32), e[0] + e[1]])
    lab, share, idx, sims = kernels.knn_vote(q, b, bl, 3, threads=2, return_topk=True)
    # query 0: three exact ties (sim 1) -> lowest indices 0, 2, 3; labels 5, 2, 7 tie by
    # weight -> lowest label 2, share 1/3
    np.testing.assert_array_equal(idx[0], [0, 2, 3])
    np.testing.assert_allclose(sims[0], 1.0, atol=1e-6)
    assert lab[0] == 2 and abs(share[0] - 1 / 3) < 1e-6
    # query 1: opposite direction: rows 1, 4 have sim 0, rows 0,2,3 sim -1: all weights 0
    # -> label of the most similar neighbour (row 1, label 1), share 0
    np.testing.assert_array_equal(idx[1], [1, 4, 0])
    assert lab[1] == 1 and share[1] == 0.0
    # query 2: zero vector: every similarity 0 (never NaN) -> rows 0, 1, 2; label 5
    np.testing.assert_array_equal(idx[2], [0, 1, 2])
    np.testing.assert_array_equal(sims[2], 0.0)
    assert lab[2] == 5 and share[2] == 0.0
    # query 3: (e0 + e1)/sqrt2: rows 0,2,3 at 0.7071 win, row 1 also at 0.7071 (index 1)
    np.testing.assert_array_equal(idx[3], [0, 1, 2])
    # zero bank rows: similarity 0
    bz = b.copy()
    bz[1] = 0
    _, _, idx, sims = kernels.knn_vote(-q[:1], bz, bl, 5, threads=1, return_topk=True)
    np.testing.assert_array_equal(idx[0], [1, 4, 0, 2, 3])
    np.testing.assert_allclose(sims[0], [0, 0, -1, -1, -1], atol=1e-6)


def test_knn_vote_label_tie_and_weights(isa):
    C = 4
    e = np.eye(C, dtype=np.float32)
    b = np.stack([e[0], e[0], e[0] + e[1], e[0] + e[1]])
    bl = np.array([9, 9, 3, 4], np.int32)
    q = e[:1]
    lab, share, idx, sims = kernels.knn_vote(q, b, bl, 4, threads=1, return_topk=True)
    # weights 1, 1, 0.707, 0.707 -> label 9 wins with 2 / (2 + 1.414)
    assert lab[0] == 9
    np.testing.assert_allclose(share[0], 2 / (2 + 2 * 0.5**0.5), atol=1e-6)
    # two labels with equal weight: lowest label wins
    lab, share = kernels.knn_vote(q, b[2:], bl[2:], 2)
    assert lab[0] == 3 and abs(share[0] - 0.5) < 1e-6


def test_knn_float16_near_range_and_many_work_items(isa):
    rng = np.random.default_rng(13)
    q = (rng.uniform(-1, 1, (700, 256)) * 60000).astype(np.float16)
    b = (rng.uniform(-1, 1, (2100, 256)) * 60000).astype(np.float16)
    b[5] = np.float16(65504)
    bl = rng.integers(0, 3, 2100).astype(np.int32)
    out = kernels.knn_vote(q, b, bl, 5, threads=2, return_topk=True)
    assert np.isfinite(out[3]).all() and np.isfinite(out[1]).all()
    check_knn(out, q, b, bl, 5)


def test_knn_non_contiguous_and_label_dtypes():
    rng = np.random.default_rng(14)
    qb = rand(rng, (40, 64), np.float16)
    bb = rand(rng, (800, 64))
    q, b = qb[::2, ::2], bb[::2, ::2]  # (20, 32) and (400, 32) views
    bl64 = rng.integers(0, 3, 400).astype(np.int64)
    out = kernels.knn_vote(q, b, bl64, 4, threads=2, return_topk=True)
    check_knn(out, q, b, bl64.astype(np.int32), 4)
    out_u8 = kernels.knn_vote(q, b, bl64.astype(np.uint8), 4, threads=2, return_topk=True)
    for a, c in zip(out, out_u8):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="queries"):
        core.knn_vote(q, np.ascontiguousarray(b), bl64.astype(np.int32), 4, 1, False)
    with pytest.raises(ValueError, match="bank"):
        core.knn_vote(np.ascontiguousarray(q), b, bl64.astype(np.int32), 4, 1, False)
    with pytest.raises(ValueError, match="bank_labels"):
        core.knn_vote(np.ascontiguousarray(q), np.ascontiguousarray(b), bl64, 4, 1, False)


@pytest.mark.parametrize(
    "q,b,bl,k,name",
    [
        (np.ones((2, 4), np.float64), np.ones((5, 4), np.float32), np.zeros(5, np.int32), 1, "queries"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.int8), np.zeros(5, np.int32), 1, "bank"),
        (np.ones((2, 4), np.float32), np.ones((5, 3), np.float32), np.zeros(5, np.int32), 1, "bank"),
        (np.ones(4, np.float32), np.ones((5, 4), np.float32), np.zeros(5, np.int32), 1, "queries"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.zeros(4, np.int32), 1, "bank_labels"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.zeros(5, np.float32), 1, "bank_labels"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.zeros((5, 1), np.int32), 1, "bank_labels"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.zeros(5, np.int32), 0, "k"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.zeros(5, np.int32), 6, "k"),
        (np.ones((2, 4), np.float32), np.ones((0, 4), np.float32), np.zeros(0, np.int32), 1, "k"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.zeros(5, np.int32), 2.0, "k"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), np.full(5, 2**40), 1, "bank_labels"),
    ],
)
def test_knn_bad_arguments(q, b, bl, k, name):
    with pytest.raises(ValueError, match=name):
        kernels.knn_vote(q, b, bl, k)
    if isinstance(k, int) and bl.dtype in (np.int32, np.float32) and q.dtype != np.float64:
        with pytest.raises(ValueError, match=name):
            core.knn_vote(q, b, bl, k, 1, False)


def test_knn_empty_queries_and_threads_error():
    b = np.eye(4, dtype=np.float32)
    lab, share, idx, sims = kernels.knn_vote(np.zeros((0, 4), np.float16), b, [0, 1, 2, 3], 2, return_topk=True)
    assert lab.shape == (0,) and idx.shape == (0, 2)
    with pytest.raises(ValueError, match="threads"):
        kernels.knn_vote(b, b, [0, 1, 2, 3], 1, threads=0)


# ---- instruction-set paths: selection, odd shapes, ties at tile boundaries ------------------


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_isa_detection_matches_cpu_flags():
    supported = core.supported_isas()
    assert supported[0] == "scalar" and set(supported) <= set(ISAS)
    assert core.isa() in supported
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags line: cannot cross-check the detection")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert ("avx2" in supported) == avx2
    assert ("avx512" in supported) == avx512
    # with no override and no SEMISAM_ISA the best path the CPU has is used
    assert core.isa() == supported[-1] or "SEMISAM_ISA" in __import__("os").environ
    assert core.has_avx2() == (core.isa() != "scalar")


def test_isa_override_and_environment(monkeypatch):
    supported = core.supported_isas()
    best = supported[-1]
    monkeypatch.delenv("SEMISAM_ISA", raising=False)
    try:
        assert core.isa() == best
        for name in supported:
            core.set_isa(name)
            assert core.isa() == name
        core.set_isa("auto")
        assert core.isa() == best
        with pytest.raises(ValueError, match="isa: expected"):
            core.set_isa("sse9")
        for name in set(ISAS) - set(supported):
            with pytest.raises(ValueError, match=f"cannot run the {name} kernels"):
                core.set_isa(name)
        # SEMISAM_ISA is read at every call; set_isa() takes precedence over it
        monkeypatch.setenv("SEMISAM_ISA", "scalar")
        assert core.isa() == "scalar" and not core.has_avx2()
        core.set_isa(best)
        assert core.isa() == best
        core.set_isa("auto")
        assert core.isa() == "scalar"
        # a path the CPU lacks falls back to the best one it has below it
        monkeypatch.setenv("SEMISAM_ISA", "avx512")
        assert core.isa() == ("avx512" if "avx512" in supported else best)
        monkeypatch.setenv("SEMISAM_ISA", "auto")
        assert core.isa() == best
        monkeypatch.setenv("SEMISAM_ISA", "avx3")
        with pytest.raises(ValueError, match="SEMISAM_ISA: expected scalar, avx2, avx512 or auto"):
            core.isa()
        q = np.eye(4, dtype=np.float32)
        with pytest.raises(ValueError, match="SEMISAM_ISA"):
            kernels.knn_vote(q, q, [0, 1, 2, 3], 1)
        # _force_generic (older testing aid) is set_isa('scalar') / set_isa('auto')
        monkeypatch.delenv("SEMISAM_ISA")
        core._force_generic(True)
        assert core.isa() == "scalar"
        core._force_generic(False)
        assert core.isa() == best
    finally:
        core.set_isa("auto")


def test_isa_environment_variable_selects_the_path(monkeypatch):
    """SEMISAM_ISA=<path> gives exactly the result of set_isa(<path>), for every path."""
    rng = np.random.default_rng(40)
    q = rand(rng, (45, 40), np.float16)
    b = rand(rng, (700, 40), np.float16)
    bl = rng.integers(0, 3, 700).astype(np.int32)
    for name in core.supported_isas():
        core.set_isa(name)
        try:
            forced = kernels.knn_vote(q, b, bl, 4, threads=2, return_topk=True)
        finally:
            core.set_isa("auto")
        monkeypatch.setenv("SEMISAM_ISA", name)
        assert core.isa() == name
        env = kernels.knn_vote(q, b, bl, 4, threads=2, return_topk=True)
        for a, c in zip(forced, env):
            np.testing.assert_array_equal(a, c)
        check_knn(env, q, b, bl, 4)


@pytest.mark.parametrize("bdt", [np.float16, np.float32])
@pytest.mark.parametrize("C", [17, 37, 256])  # 17, 37: C not a multiple of 16 (masked tails)
def test_knn_isa_odd_shapes(isa, bdt, C):
    """Q not a multiple of the tile rows (6 / 14), N not of the bank tile (16 / 32) nor of
    the 2048-row super-block, k > 1, float16 queries: each path against the reference."""
    rng = np.random.default_rng(41 + C)
    Q, N, k = 71, 4133, 6
    q = rand(rng, (Q, C), np.float16)
    b = rand(rng, (N, C), bdt)
    bl = rng.integers(0, 5, N).astype(np.int32)
    out = kernels.knn_vote(q, b, bl, k, threads=2, return_topk=True)
    check_knn(out, q, b, bl, k)
    # label weights on this path too
    w = np.array([2.0, 0.5, 1.0, 3.0, 0.0], np.float32)
    out_w = kernels.knn_vote(q, b, bl, k, threads=2, return_topk=True, label_weights=w)
    check_knn(out_w, q, b, bl, k, label_weights=w)
    np.testing.assert_array_equal(out_w[2], out[2])  # same neighbours, another vote
    assert not np.any((out_w[0] == 4) & (out_w[1] > 0))  # weight 0: label 4 never wins
    # one query, one thread: the padded tile and the partial last bank tile
    one = kernels.knn_vote(q[:1], b[: N - 3], bl[: N - 3], k, threads=1, return_topk=True)
    check_knn(one, q[:1], b[: N - 3], bl[: N - 3], k)


@pytest.mark.parametrize("bdt", [np.float16, np.float32])
def test_knn_isa_ties_across_tile_and_block_boundaries(isa, bdt):
    """Exact duplicates of one bank row placed on both sides of the tile (16, 32) and
    super-block (2048) boundaries: the top-k keeps the lowest indices, in index order."""
    rng = np.random.default_rng(42)
    N, C = 4200, 37
    b = rand(rng, (N, C), bdt)
    dup = [5, 15, 16, 31, 32, 47, 2047, 2048, 4127]
    b[dup] = b[5]
    bl = rng.integers(0, 4, N).astype(np.int32)
    q = np.stack([b[5], b[5] * 3, -b[5]]).astype(np.float32)
    lab, share, idx, sims = kernels.knn_vote(q, b, bl, 8, threads=2, return_topk=True)
    for i in (0, 1):  # the same direction: 9 exact ties at similarity 1, lowest 8 kept
        np.testing.assert_array_equal(idx[i], dup[:8])
        np.testing.assert_allclose(sims[i], 1.0, atol=1e-6)
        assert (sims[i] == sims[i][0]).all()  # duplicates give bit-identical similarities
        exp_lab, exp_share = ref_vote(sims[i].astype(np.float64), idx[i], bl)
        assert lab[i] == exp_lab and abs(share[i] - exp_share) < 1e-6
    assert not np.isin(idx[2], dup).any()  # the opposite direction: none of them
    check_knn((lab, share, idx, sims), q, b, bl, 8)


def test_knn_isa_paths_agree():
    """Every supported path on the same C=256 float16 problem: the same neighbours where
    the similarities are separated, similarities within 1e-6 of each other."""
    rng = np.random.default_rng(43)
    q = rand(rng, (150, 256), np.float16)
    b = rand(rng, (5000, 256), np.float16)
    bl = rng.integers(0, 3, 5000).astype(np.int32)
    outs = {}
    try:
        for name in core.supported_isas():
            core.set_isa(name)
            outs[name] = kernels.knn_vote(q, b, bl, 5, threads=2, return_topk=True)
    finally:
        core.set_isa("auto")
    if len(outs) < 2:
        pytest.skip("only the scalar path runs on this CPU")
    ref = outs["scalar"]
    rl, rs, ridx, rsims, _ = ref_knn(q, b, bl, 5)
    for name, out in outs.items():
        np.testing.assert_allclose(out[3], ref[3], atol=1e-6)
        np.testing.assert_allclose(out[3], rsims, atol=3e-6)
        same = (out[2] == ridx).all(axis=1)
        assert same.mean() > 0.97, name
        np.testing.assert_array_equal(out[0][same], rl[same])


def test_prototype_isa_paths(isa):
    """Prototype similarity on each path: C with a masked tail, K over two groups."""
    rng = np.random.default_rng(44)
    for fdt in (np.float16, np.float32):
        f = rand(rng, (2500, 45), fdt)
        f[10] = 0
        p = rand(rng, (10, 45))
        s, lab = kernels.prototype_similarity(f, p, threads=2)
        rs, rl = ref_prototype(f, p)
        np.testing.assert_allclose(s, rs, atol=2e-6)
        np.testing.assert_array_equal(s[10], 0)
        assert lab[10] == 0
        srt = np.sort(rs, axis=1)
        clear = srt[:, -1] - srt[:, -2] > 1e-5
        np.testing.assert_array_equal(lab[clear], rl[clear])


# ---- CUDA kernels: host emulation of the per-thread code, and the device path ---------------

needs_cuda_module = pytest.mark.skipif(
    _core_cuda is None, reason="semisam_o1._core_cuda not built (no CUDA compiler at install)"
)


@needs_cuda_module
@pytest.mark.parametrize("dt", [np.float16, np.float32])
def test_cuda_logic_emulated_on_host(dt):
    rng = np.random.default_rng(20)
    f = rand(rng, (500, 37), dt)
    f[7] = 0
    p = rand(rng, (9, 37), dt)
    s, lab = _core_cuda._emulate_prototype_similarity(f, p)
    rs, rl = ref_prototype(f, p)
    np.testing.assert_allclose(s, rs, atol=3e-6)
    assert lab[7] == 0 and (s[7] == 0).all()
    q = rand(rng, (40, 37), dt)
    q[3] = 0
    b = rand(rng, (301, 37), dt)
    bl = rng.integers(0, 4, 301).astype(np.int32)
    out = _core_cuda._emulate_knn_vote(q, b, bl, 6)
    check_knn(out, q, b, bl, 6)
    w = np.array([0.5, 2.0, 1.0, 4.0], np.float32)
    out_w = _core_cuda._emulate_knn_vote(q, b, bl, 6, label_weights=w)
    check_knn(out_w, q, b, bl, 6, label_weights=w)
    cpu_w = kernels.knn_vote(q, b, bl, 6, threads=1, label_weights=w)
    same = (out_w[2] == out[2]).all(axis=1)
    np.testing.assert_array_equal(out_w[0][same], cpu_w[0][same])
    # same ties rule as the CPU core
    e = np.eye(8, dtype=dt)
    bt = np.stack([e[0], e[1], e[0], e[0], e[2]])
    blt = np.array([5, 1, 2, 7, 0], np.int32)
    qt = np.stack([e[0], -e[0], np.zeros(8, dt)])
    lab, share, idx, sims = _core_cuda._emulate_knn_vote(qt, bt, blt, 3)
    np.testing.assert_array_equal(idx, [[0, 2, 3], [1, 4, 0], [0, 1, 2]])
    np.testing.assert_array_equal(lab, [2, 1, 5])
    np.testing.assert_allclose(share, [1 / 3, 0, 0], atol=1e-6)


class _FakeDeviceArray:
    """Exposes __cuda_array_interface__ without a GPU: lets the boundary checks run."""

    def __init__(self, shape, typestr, strides=None):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (0, False), "version": 3,
            "strides": strides,
        }


@needs_cuda_module
def test_cuda_boundary_checks_without_gpu():
    good = _FakeDeviceArray((4, 8), "<f4")
    with pytest.raises(ValueError, match="features"):
        _core_cuda.prototype_similarity(_FakeDeviceArray((4, 8), "<f8"), good)
    with pytest.raises(ValueError, match="prototypes"):
        _core_cuda.prototype_similarity(good, _FakeDeviceArray((4, 7), "<f2"))
    with pytest.raises(ValueError, match="queries"):
        _core_cuda.knn_vote(_FakeDeviceArray((4, 8), "<f4", (4, 32)), good,
                            _FakeDeviceArray((4,), "<i4"), 1)
    with pytest.raises(ValueError, match="bank_labels"):
        _core_cuda.knn_vote(good, good, _FakeDeviceArray((4,), "<i8"), 1)
    with pytest.raises(ValueError, match="k"):
        _core_cuda.knn_vote(good, good, _FakeDeviceArray((4,), "<i4"), 5)
    with pytest.raises(ValueError, match="bank"):
        _core_cuda.knn_vote(good, np.ones((4, 8), np.float32), _FakeDeviceArray((4,), "<i4"), 1)


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


@pytest.mark.skipif(
    not kernels.cuda_available() or _torch_cuda() is None,
    reason="no CUDA GPU here (or _core_cuda/torch CUDA missing): device kernels not run",
)
def test_cuda_device_matches_cpu():
    torch = _torch_cuda()
    rng = np.random.default_rng(21)
    f = rand(rng, (5000, 256), np.float16)
    p = rand(rng, (8, 256))
    s_cpu, l_cpu = kernels.prototype_similarity(f, p)
    s_gpu, l_gpu = kernels.prototype_similarity(torch.from_numpy(f).cuda(), torch.from_numpy(p).cuda())
    assert s_gpu.is_cuda
    np.testing.assert_allclose(s_gpu.cpu().numpy(), s_cpu, atol=3e-6)
    q = rand(rng, (300, 256), np.float16)
    b = rand(rng, (7000, 256), np.float16)
    bl = rng.integers(0, 3, 7000).astype(np.int32)
    out = kernels.knn_vote(torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda(),
                           torch.from_numpy(bl).cuda(), 5, return_topk=True)
    check_knn(tuple(o.cpu().numpy() for o in out), q, b, bl, 5)
    w = np.array([0.5, 3.0, 1.0], np.float32)
    out = kernels.knn_vote(torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda(),
                           torch.from_numpy(bl).cuda(), 5, return_topk=True, label_weights=w)
    check_knn(tuple(o.cpu().numpy() for o in out), q, b, bl, 5, label_weights=w)


def test_memory_mapped_float16_store(tmp_path):
    """The feature store is memory-mapped read-only: the kernels read it without copies."""
    rng = np.random.default_rng(30)
    f = rand(rng, (1000, 32), np.float16)
    np.save(tmp_path / "f.npy", f)
    fm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert not fm.flags.writeable
    p = rand(rng, (3, 32))
    s, lab = kernels.prototype_similarity(fm, p, threads=2)
    np.testing.assert_allclose(s, ref_prototype(f, p)[0], atol=2e-6)
    bl = rng.integers(0, 2, 1000).astype(np.int32)
    out = kernels.knn_vote(fm[:50], fm, bl, 3, threads=2, return_topk=True)
    check_knn(out, f[:50], f, bl, 3)
    np.testing.assert_array_equal(out[2][:, 0], np.arange(50))  # each query finds itself
