"""semisam-o1: segment a medical image cohort from a single annotated template.

Implements SemiSAM-O1 (Zhang et al., arXiv 2604.24109, 2026): a Segment Anything
image encoder turns every volume into dense features (``encode``), class
prototypes from the one template give round-0 pseudo-labels (``propagate``),
and rounds of a MONAI 3D UNet trained on the pseudo-labels (``train``,
``predict``) alternate with uncertainty-guided kNN relabelling in the
foundation model's feature space (``refine``).

Python API (:mod:`semisam_o1.api`): ``semisam_o1.run(images=..., template_image=...,
template_label=..., output=...)`` and ``semisam_o1.predict(model=..., input=..., output=...)``;
both import their dependencies on first call, so ``import semisam_o1`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run", "predict"]


def __getattr__(name):
    # `run` and `predict` are the stage modules, made callable as the API functions (semisam_o1.api)
    if name in ("run", "predict"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
