"""Largest-component post-processing against a plain breadth-first flood fill."""

from __future__ import annotations

from collections import deque
from itertools import product

import numpy as np

from semisam_o1.methods.components import count, largest_component


def _components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """26-connected components of a boolean mask by breadth-first search, in scan order."""
    seen = np.zeros(mask.shape, bool)
    steps = [d for d in product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            v = queue.popleft()
            comp.append(v)
            for d in steps:
                w = tuple(int(a + b) for a, b in zip(v, d))
                if all(0 <= w[i] < mask.shape[i] for i in range(3)) and mask[w] and not seen[w]:
                    seen[w] = True
                    queue.append(w)
        out.append(comp)
    return out


def test_largest_component_matches_flood_fill():
    rng = np.random.default_rng(0)
    for trial in range(6):
        lab = rng.choice([0, 1, 2], size=(9, 8, 7), p=[0.8, 0.12, 0.08]).astype(np.uint8)
        classes = [1] if trial % 2 else [1, 2]
        got = largest_component(lab, classes)
        want = lab.copy()
        for c in classes:
            comps = _components(lab == c)
            assert count(lab == c) == len(comps)
            sizes = [len(k) for k in comps]
            keep = int(np.argmax(sizes))
            if sizes.count(sizes[keep]) > 1:  # a tie: either is a correct answer, skip the voxel check
                continue
            for i, comp in enumerate(comps):
                if i != keep:
                    for v in comp:
                        want[v] = 0
        tied = [c for c in classes if (lambda s: s.count(max(s)) > 1)([len(k) for k in _components(lab == c)])]
        check = ~np.isin(lab, tied)
        np.testing.assert_array_equal(got[check], want[check])
        assert got.dtype == lab.dtype and got.shape == lab.shape
        if 2 not in classes:  # an unlisted class is untouched
            np.testing.assert_array_equal(got == 2, lab == 2)


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True
    mask[3, 0, 3] = True
    assert count(mask) == 2
    lab = mask.astype(np.uint8)
    got = largest_component(lab, [1])
    assert got[3, 0, 3] == 0 and got[1, 1, 1] == 1 and int(got.sum()) == 3
    assert count(np.zeros((2, 2, 2), bool)) == 0
