"""Independent random streams: one per (seed, purpose, round).

Round r of ``--seed s`` used to draw with seed ``s + r``, so round 2 of seed 0 and
round 1 of seed 1 shared initial weights and sampling. Every stream is now spawned
from ``numpy.random.SeedSequence([seed, *keys])`` (NumPy's recommended way to get
independent streams), so different seeds or rounds never share one.
"""

from __future__ import annotations

import numpy as np


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of ``seed`` and the integer ``keys`` (round, purpose ...)."""
    return np.random.SeedSequence([int(seed), *[int(k) for k in keys]])


def generator(seed: int, *keys: int) -> np.random.Generator:
    """A NumPy Generator on the stream of ``(seed, *keys)``."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def int_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed (for torch.manual_seed, MONAI's set_determinism) of the stream
    ``(seed, *keys)``."""
    return int(seed_sequence(seed, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))
