"""semisam-o1: segment a medical image cohort from a single annotated template.

Implements SemiSAM-O1 (Zhang et al., arXiv 2604.24109, 2026): a Segment Anything
image encoder turns every volume into dense features (``encode``), class
prototypes from the one template give round-0 pseudo-labels (``propagate``),
and rounds of a MONAI 3D UNet trained on the pseudo-labels (``train``,
``predict``) alternate with uncertainty-guided kNN relabelling in the
foundation model's feature space (``refine``).

Python API (:mod:`semisam_o1.api`): ``semisam_o1.run(images=..., template_image=...,
template_label=..., output=...)`` and ``semisam_o1.predict(model=..., input=..., output=...)``.
The package's layers import downward only: ``pipeline`` -> ``stages`` -> ``methods`` -> ``data``
-> ``core``; torch, MONAI, ONNX Runtime, Ray, nibabel, SimpleITK and ANTs are imported when first
needed, so ``import semisam_o1`` and ``semisam-o1 --help`` stay fast.
"""

from semisam_o1.api import predict, run
from semisam_o1.core.version import __version__

__all__ = ["__version__", "run", "predict"]
