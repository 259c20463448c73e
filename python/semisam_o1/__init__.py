"""semisam-o1: segment a medical image cohort from a single annotated template.

Implements SemiSAM-O1 (Zhang et al., arXiv 2604.24109, 2026): a Segment Anything
image encoder turns every volume into dense features (``encode``), class
prototypes from the one template give round-0 pseudo-labels (``propagate``),
and rounds of a MONAI 3D UNet trained on the pseudo-labels (``train``,
``predict``) alternate with uncertainty-guided kNN relabelling in the
foundation model's feature space (``refine``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
