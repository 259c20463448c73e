"""Weak-to-strong consistency for the rounds' UNet (``train --ssl w2s``).

The rounds train a UNet on the template's real label and the cohort's pseudo-labels. Plain
supervision can at best reproduce the pseudo-labels' errors; ``w2s`` adds what the unlabelled
images themselves can teach, after UniMatch (Yang et al., "Revisiting weak-to-strong consistency in
semi-supervised semantic segmentation", CVPR 2023; its ``more-scenarios/medical`` variant), made
3D and adapted to a cohort whose every volume already has a (noisy) target:

* **supervised term**: soft Dice + cross-entropy of the weak view (the ordinary training patch)
  against its target, each voxel weighted by the target's confidence (:func:`weighted_dice_ce`):
  1 for the template's real label, ``1 - H / ln K`` for a pseudo-label whose previous round left an
  entropy map H (``train --confidence``), 1 where there is none (round 0's labels: the kNN vote's
  shares are not kept, so round 1 weights every voxel alike);
* **weak-to-strong term**: the network's own prediction on the weak view (argmax, detached) is
  the target of a *strongly perturbed* view of the same patch (:func:`strong_views`: contrast and
  brightness jitter, Gaussian blur, and a 3D CutMix box pasted from another patch of the batch,
  whose own prediction fills the box of the target), counted only where the weak prediction is
  confident (maximum softmax >= :data:`CONFIDENCE`, 0.95 as UniMatch);
* **feature-perturbation term**: the same target for a second pass of the weak view whose
  bottleneck features lose whole channels (``dropout3d``, p = :data:`FEATURE_DROPOUT`;
  :class:`BottleneckDropout`).

Loss ``(supervised + 0.5 * strong + 0.5 * feature) / 2`` (UniMatch's weights with one strong view
instead of two). A CutMix box pasted from the template's patch into a cohort patch carries the
template's prediction into it, the bidirectional copy-paste idea of BCP (Bai et al., CVPR 2023)
within the batch.

Cost: one iteration runs the network forward and backward on 3 x the batch (weak, feature-dropped
weak, strong) against 1 x for plain training; the perturbations are a few element-wise operations
and one separable 3D convolution per blurred patch. Every random draw comes from torch's CPU
generator (seeded per checkpoint block by :mod:`semisam_o1.stages.train`), so a resumed run is
exact and the same draws happen on any device; the tensors stay on the batch's device.
"""

from __future__ import annotations

import math

#: weak-prediction confidence (max softmax) above which a voxel teaches the strong / dropped views
CONFIDENCE = 0.95
#: channel dropout of the bottleneck features in the feature-perturbation stream
FEATURE_DROPOUT = 0.5
#: probability of the contrast / brightness jitter, its ranges (contrast factor, brightness in
#: z-score units of the normalised image)
JITTER_PROB = 0.8
CONTRAST = (0.5, 1.5)
BRIGHTNESS = (-0.5, 0.5)
#: probability of a Gaussian blur and its sigma range (voxels)
BLUR_PROB = 0.5
BLUR_SIGMA = (0.1, 1.0)
#: probability of a CutMix box and its volume share of the patch (UniMatch's 0.02 - 0.4)
CUTMIX_PROB = 0.5
CUTMIX_SHARE = (0.02, 0.4)
#: loss weights of the strong and feature-perturbation terms (the total is halved, as UniMatch)
STRONG_WEIGHT = 0.5
FEATURE_WEIGHT = 0.5

#: recorded in a w2s model's config.json
PARAMETERS = {"confidence": CONFIDENCE, "feature_dropout": FEATURE_DROPOUT, "jitter_prob": JITTER_PROB,
              "contrast": list(CONTRAST), "brightness": list(BRIGHTNESS), "blur_prob": BLUR_PROB,
              "blur_sigma": list(BLUR_SIGMA), "cutmix_prob": CUTMIX_PROB, "cutmix_share": list(CUTMIX_SHARE),
              "strong_weight": STRONG_WEIGHT, "feature_weight": FEATURE_WEIGHT,
              "loss": "(supervised + strong_weight * strong + feature_weight * feature) / 2",
              "passes_per_iteration": 3}


def weighted_dice_ce(logits, target, weight=None, smooth: float = 1e-5):
    """Soft Dice + cross-entropy with a weight per voxel.

    With ``weight`` None (or all ones) this equals ``monai.losses.DiceCELoss(to_onehot_y=True,
    softmax=True)``: Dice per sample and class (background included, smoothing 1e-5 in numerator and
    denominator), averaged, plus the mean cross-entropy. With weights, every voxel's share of the
    cross-entropy, the Dice intersection and both Dice sums is multiplied by its weight (a weight of
    0 removes the voxel; a sample and class with no weighted voxel scores a Dice loss of 0).

    Args:
        logits: (B, K, X, Y, Z) float tensor.
        target: (B, 1, X, Y, Z) integer class indices.
        weight: (B, 1, X, Y, Z) float in [0, 1], or None.

    Returns:
        a scalar tensor.
    """
    import torch

    logp = torch.log_softmax(logits, dim=1)
    target = target.long()
    ce = -logp.gather(1, target)  # (B, 1, ...)
    onehot = torch.zeros_like(logits).scatter_(1, target, 1.0)
    prob = logp.exp()
    dims = tuple(range(2, logits.ndim))
    if weight is None:
        ce_term = ce.mean()
        inter = (prob * onehot).sum(dims)
        denom = prob.sum(dims) + onehot.sum(dims)
    else:
        weight = weight.to(logits.dtype)
        ce_term = (weight * ce).sum() / weight.sum().clamp_min(1e-8)
        inter = (weight * prob * onehot).sum(dims)
        denom = (weight * prob).sum(dims) + (weight * onehot).sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)  # (B, K)
    return dice.mean() + ce_term


class BottleneckDropout:
    """A forward hook on a MONAI UNet's bottleneck: while :attr:`active`, the second half of the
    batch leaves the bottleneck with whole channels dropped (``torch.nn.functional.dropout3d``, or
    ``dropout2d`` in a 2D network; p, scaled by 1 / (1 - p)), the first half
    unchanged (UniMatch's feature perturbation, there on the encoder's features; here on the deepest
    ones, since MONAI's UNet nests its skip connections). 3D and 2D (one-slice, :func:`semisam_o1.
    stages.nets.for_2d`) networks alike.

    Use :meth:`attach` / :meth:`detach`.
    """

    def __init__(self, p: float = FEATURE_DROPOUT):
        self.p = float(p)
        self.active = False
        self._handle = None

    @staticmethod
    def bottleneck(net):
        """The bottom layer of ``monai.networks.nets.UNet`` (its blocks are ``Sequential(down,
        SkipConnection(sub), up)`` nested down to the bottom layer)."""
        from monai.networks.layers.simplelayers import SkipConnection
        from torch import nn

        block = getattr(net, "net", net).model  # a 2D network is wrapped (semisam_o1.stages.nets.build_net)
        while True:
            if not (isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection)):
                raise TypeError("not a monai.networks.nets.UNet block: Sequential(down, SkipConnection, up)")
            sub = block[1].submodule
            if isinstance(sub, nn.Sequential) and len(sub) == 3 and isinstance(sub[1], SkipConnection):
                block = sub
            else:
                return sub

    def attach(self, net) -> "BottleneckDropout":
        self._handle = self.bottleneck(net).register_forward_hook(self)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, module, inputs, out):
        if not self.active:
            return None
        import torch
        import torch.nn.functional as F

        half = out.shape[0] // 2
        drop = F.dropout3d if out.ndim == 5 else F.dropout2d  # (B, C, X, Y, Z) or a 2D network's (B, C, X, Y)
        return torch.cat([out[:half], drop(out[half:], p=self.p, training=True)])


def _uniform(lo: float, hi: float) -> float:
    import torch

    return lo + (hi - lo) * float(torch.rand(()))


def _blur(x, sigma: float):
    """Gaussian blur of one (1, C, X, Y, Z) patch, separable, reflect-padded, radius ceil(2 sigma);
    an axis of one voxel (a 2D image) is left alone."""
    import torch
    import torch.nn.functional as F

    r = max(1, int(math.ceil(2.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for axis in range(3):
        if x.shape[2 + axis] == 1:
            continue
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        size = x.shape[2 + axis]
        mode = "reflect" if size > r else "replicate"
        x = F.conv3d(F.pad(x, pad, mode=mode), k.reshape(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return x


def cutmix_box(shape) -> tuple[slice, ...]:
    """A random box of a patch of ``shape`` (X, Y, Z): volume share uniform in :data:`CUTMIX_SHARE`,
    side ratios log-uniform in [0.3, 1 / 0.3] (product 1), position uniform (3D form of UniMatch's box);
    an axis of one voxel (a 2D image) is covered whole and the share spread over the others."""
    import torch

    share = _uniform(*CUTMIX_SHARE)
    axes = [a for a, n in enumerate(shape) if n > 1]
    ratios = [1.0] * len(shape)
    for a in axes[:-1]:
        ratios[a] = math.exp(_uniform(math.log(0.3), -math.log(0.3)))
    if axes:
        ratios[axes[-1]] = 1.0 / math.prod(ratios[a] for a in axes[:-1])
    out = []
    for n, r in zip(shape, ratios):
        if n == 1:
            out.append(slice(0, 1))
            continue
        side = int(min(n, max(1, round(n * share ** (1.0 / len(axes)) * r))))
        start = int(torch.randint(0, n - side + 1, ()))
        out.append(slice(start, start + side))
    return tuple(out)


def strong_views(x):
    """Strongly perturbed copies of a batch of normalised patches, and where CutMix pasted.

    Per patch: with probability :data:`JITTER_PROB` contrast (about the patch mean) and brightness
    jitter; with probability :data:`BLUR_PROB` a Gaussian blur; then, with probability
    :data:`CUTMIX_PROB`, a box (:func:`cutmix_box`) of the next patch's strong view (index i + 1
    modulo B) is pasted in.

    Args:
        x: (B, C, X, Y, Z) float tensor (any device).

    Returns:
        (strong (B, C, X, Y, Z), pasted (B, 1, X, Y, Z) bool: voxels that come from patch i + 1).
    """
    import torch

    b = x.shape[0]
    views = []
    for i in range(b):
        v = x[i:i + 1]
        if float(torch.rand(())) < JITTER_PROB:
            mean = v.mean()
            v = (v - mean) * _uniform(*CONTRAST) + mean + _uniform(*BRIGHTNESS)
        if float(torch.rand(())) < BLUR_PROB:
            v = _blur(v, _uniform(*BLUR_SIGMA))
        views.append(v)
    strong = torch.cat(views)
    mixed = strong.clone()
    pasted = torch.zeros((b, 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
    for i in range(b):
        if float(torch.rand(())) < CUTMIX_PROB:
            box = cutmix_box(x.shape[2:])
            j = (i + 1) % b
            mixed[(i, slice(None), *box)] = strong[(j, slice(None), *box)]
            pasted[(i, 0, *box)] = True
    return mixed, pasted


def w2s_losses(net, hook: BottleneckDropout, x, y, weight=None) -> tuple:
    """The three terms of one weak-to-strong iteration (module docstring); no optimiser step.

    Args:
        net: the student (a MONAI UNet with ``hook`` attached).
        x: (B, 1, X, Y, Z) weak views; y: (B, 1, X, Y, Z) int64 targets; weight: (B, 1, X, Y, Z)
            confidence in [0, 1] or None (every voxel 1).

    Returns:
        (loss, supervised, consistency = 0.5 strong + 0.5 feature, share of confident voxels) with
        the first three tensors (``loss`` differentiable) and the share a float.
    """
    import torch

    b = x.shape[0]
    strong, pasted = strong_views(x)
    hook.active = True
    try:
        both = net(torch.cat([x, x]))
    finally:
        hook.active = False
    logits_w, logits_fp = both[:b], both[b:]
    logits_s = net(strong)
    sup = weighted_dice_ce(logits_w, y, weight)
    with torch.no_grad():
        conf, pseudo = torch.softmax(logits_w.detach(), dim=1).max(dim=1, keepdim=True)
        partner = torch.roll(torch.arange(b, device=x.device), -1)
        pseudo_s = torch.where(pasted, pseudo[partner], pseudo)
        conf_s = torch.where(pasted, conf[partner], conf)
        mask = (conf >= CONFIDENCE).float()
        mask_s = (conf_s >= CONFIDENCE).float()
    cons = (STRONG_WEIGHT * weighted_dice_ce(logits_s, pseudo_s, mask_s)
            + FEATURE_WEIGHT * weighted_dice_ce(logits_fp, pseudo, mask))
    loss = (sup + cons) / 2.0
    return loss, sup, cons, float(mask.mean())
