"""Class planes (semisam_o1.methods.class_planes): the rule learned from the template, and its application,
against brute-force NumPy references and the cohort's real labels (real Hippocampus or the synthetic
cohort, whose two classes also follow each other along axis 1)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from semisam_o1.core.errors import InputError
from semisam_o1.data.dataset import Dataset
from semisam_o1.methods import class_planes as CP


def _brute_force(label, axis, order):
    """Best agreement over every monotone split of the slices into len(order) runs (thresholds
    t_1 <= ... <= t_{m-1}), by enumeration."""
    n = label.shape[axis]
    other = tuple(a for a in range(3) if a != axis)
    counts = np.stack([(label == c).sum(axis=other) for c in order], 1)
    best, best_t = -1, None
    for ts in itertools.combinations_with_replacement(range(n + 1), len(order) - 1):
        edges = (0, *ts, n)
        agree = sum(counts[edges[j]:edges[j + 1], j].sum() for j in range(len(order)))
        if agree > best:
            best, best_t = agree, edges
    return best, best_t


def _agreement(a, b):
    fg = b > 0
    return int((a[fg] == b[fg]).sum())


@pytest.mark.parametrize("n_fg,axis,seed", [(2, 1, 0), (2, 0, 1), (3, 2, 2), (3, 1, 3)])
def test_apply_is_the_best_monotone_split(n_fg, axis, seed):
    rng = np.random.default_rng(seed)
    shape = (9, 11, 8)
    coord = np.indices(shape)[axis]
    # a noisy layered label: classes 1..n_fg in bands along `axis`, 30% of voxels relabelled at random
    cuts = np.sort(rng.choice(np.arange(1, shape[axis]), n_fg - 1, replace=False))
    lab = (np.searchsorted(cuts, coord, side="right") + 1).astype(np.uint8)
    noisy = np.where(rng.random(shape) < 0.3, rng.integers(1, n_fg + 1, shape), lab).astype(np.uint8)
    noisy[rng.random(shape) < 0.2] = 0  # some background, which must stay background
    rule = CP.ClassPlanes(axis, tuple(range(1, n_fg + 1)), 0.0, 0.01)
    out = CP.apply(noisy, rule)
    np.testing.assert_array_equal(out == 0, noisy == 0)
    best, edges = _brute_force(noisy, axis, rule.order)
    assert _agreement(out, noisy) == best
    # the result is layered: along the axis, the class index never decreases
    per_slice = [np.unique(np.moveaxis(out, axis, 0)[i]) for i in range(shape[axis])]
    seq = [int(u[u > 0][0]) for u in per_slice if (u > 0).any()]
    assert all(len(u[u > 0]) <= 1 for u in per_slice) and seq == sorted(seq)


def test_learn_rejects_interleaved_classes_and_accepts_layers():
    shape = (6, 6, 6)
    checker = (np.indices(shape).sum(0) % 2 + 1).astype(np.uint8)
    rule, errors = CP.learn(checker, 3)
    assert rule is None and min(errors) > 0.4
    layers = np.zeros(shape, np.uint8)
    layers[:, :3] = 2
    layers[:, 3:] = 1
    rule, errors = CP.learn(layers, 3)
    assert rule == CP.ClassPlanes(1, (2, 1), 0.0, CP.DEFAULT_TOLERANCE)
    one_class = (layers > 0).astype(np.uint8)
    assert CP.learn(one_class, 3)[0] is None
    with pytest.raises(InputError):
        CP.learn(np.zeros(shape, np.uint8), 3)
    with pytest.raises(InputError):
        CP.learn(layers, 3, tolerance=1.5)


def test_template_rule_and_real_labels(cohort):
    ds = Dataset(cohort.root)
    split = cohort.split
    rule, errors = CP.learn(ds.read_label(split["template"]).array, ds.label_map.num_classes)
    # MSD Hippocampus: Posterior then Anterior along the canonical posterior-anterior axis, no voxel off;
    # the synthetic cohort: class 1 then class 2 along axis 1
    assert rule is not None and rule.axis == 1 and rule.order == ((2, 1) if cohort.real else (1, 2))
    assert rule.template_error < 1e-3 and min(errors[0], errors[2]) > 0.1
    # the rule holds for real labels of the pool: re-splitting a real label changes almost nothing,
    # and re-splitting a real label whose classes were scrambled on 20% of the foreground restores it
    rng = np.random.default_rng(0)
    for case in split["unlabeled"][:5]:
        real = ds.read_label(case).array
        assert (CP.apply(real, rule) != real).sum() <= 0.01 * (real > 0).sum()
        scrambled = real.copy()
        fg = np.flatnonzero(real > 0)
        pick = rng.choice(fg, size=len(fg) // 5, replace=False)
        scrambled.flat[pick] = 3 - scrambled.flat[pick]
        fixed = CP.apply(scrambled, rule)
        assert (fixed != real).sum() <= 0.01 * len(fg)


def test_rule_file_round_trip_and_bad_file(tmp_path):
    rule = CP.ClassPlanes(1, (2, 1), 0.0004, 0.01)
    CP.write(tmp_path / CP.CLASS_PLANES_JSON, rule, ["background", "Anterior", "Posterior"])
    d = json.loads((tmp_path / CP.CLASS_PLANES_JSON).read_text())
    assert d["order_names"] == ["Posterior", "Anterior"] and d["axis_name"] == "posterior-anterior"
    assert CP.read(tmp_path / CP.CLASS_PLANES_JSON) == rule
    (tmp_path / "bad.json").write_text('{"axis": 1}')
    with pytest.raises(InputError, match="bad.json"):
        CP.read(tmp_path / "bad.json")
