"""One training step of StarGAN-VC, defined once (docs/training.md#one-training-step).

:class:`Stepper` owns the D step and the G step: losses, the gradient penalty, autocast, the
identity-first backward and the optimizer steps. ``vcfast train`` (vcfast/train/loop.py) calls
it on real batches; the memory estimator (:class:`vcfast.estimate.TrainingIteration`, hence
``vcfast memory``, :func:`vcfast.estimate.measure_iteration` and the benchmarks) calls the very
same methods, on the meta device or on real CPU tensors. Nothing here looks at values (no
``.item()`` inside a step), so a step runs on meta tensors; :meth:`Stepper.values` turns the
returned loss tensors into the floats the trainer logs.

* D: ``-mean D_src(x_real) + mean D_src(G(x_real, c')) + lambda_gp * GP +
  lambda_cls * BCE(D_cls(x_real), c_real)``, the penalty made before D's forwards;
* G (D frozen: no weight gradients for it): ``-mean D_src(x_fake) +
  lambda_cls * BCE(D_cls(x_fake), c') + lambda_rec * MSE(G(x_fake, c_real), x_real) +
  lambda_id * MSE(G(x_real, c_real), x_real) + lambda_fm * MSE(D_feat(x_fake), D_feat(x_orig))``,
  the identity term back-propagated on its own first so its graph is freed before the rest is
  built.

The losses are computed in fp32 outside autocast. ``official=True`` is the official StarGAN
code's layout, for the estimator's comparison only (the trainer never runs it): the autograd
double-backward penalty, the plain masked BCE, and the identity term in the main graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vcfast.labels import LabelSpace
from vcfast.ops.classification import masked_multigroup_bce
from vcfast.ops.gradient_penalty import gradient_penalty
from vcfast.train.config import OPTIMIZERS

__all__ = ["LossWeights", "StepBatch", "Stepper", "encode_batch", "make_optimizer",
           "masked_bce_plain"]


@dataclass(frozen=True)
class LossWeights:
    """The lambdas of the two losses (docs/training.md#weights-and-hyper-parameters)."""

    gp: float = 10.0
    cls: float = 1.0
    rec: float = 10.0
    id: float = 10.0
    fm: float = 10.0

    @classmethod
    def from_config(cls, config) -> LossWeights:
        """The weights of a :class:`vcfast.train.TrainConfig`."""
        return cls(gp=config.lambda_gp, cls=config.lambda_cls, rec=config.lambda_rec,
                   id=config.lambda_id, fm=config.lambda_fm)


@dataclass
class StepBatch:
    """What one step reads: spectrograms ``[B, 1, S, S]`` and the label tensors made from the
    batch's labels (:func:`encode_batch`). ``c_*``: generator label vectors; ``t_*``:
    classifier targets; ``real`` = x_real's labels, ``target`` = x_orig's (c')."""

    x_real: torch.Tensor
    x_orig: torch.Tensor
    c_real: torch.Tensor
    c_target: torch.Tensor
    t_real: torch.Tensor
    t_target: torch.Tensor


def encode_batch(x_real: torch.Tensor, x_orig: torch.Tensor, labels_real: torch.Tensor,
                 labels_orig: torch.Tensor, label_space: LabelSpace,
                 device: torch.device | str | None = None) -> StepBatch:
    """A :class:`StepBatch` from spectrograms and per-group label indices (checked, so real
    tensors only; the estimator makes its label tensors directly)."""
    return StepBatch(
        x_real=x_real,
        x_orig=x_orig,
        c_real=label_space.generator_input(labels_real, device=device),
        c_target=label_space.generator_input(labels_orig, device=device),
        t_real=label_space.classifier_target(labels_real, device=device),
        t_target=label_space.classifier_target(labels_orig, device=device),
    )


def masked_bce_plain(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch masked BCE (what official-style code writes; -1 = unknown)."""
    mask = targets != -1
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype),
                                              reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def make_optimizer(name: str, params, lr: float | None = None) -> torch.optim.Optimizer:
    """The trainer's optimizer ``name`` (:data:`vcfast.train.config.OPTIMIZERS`); ``lr=None``:
    its default learning rate."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    default_lr, extra = OPTIMIZERS[name]
    lr = default_lr if lr is None else lr
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, **extra)
    return torch.optim.Adam(params, lr=lr, **extra)


def discriminate(discriminator, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """(src, cls, feature) with the trunk run once (StarGAN's D exposes its two heads)."""
    if hasattr(discriminator, "conv1") and hasattr(discriminator, "conv2"):
        feature = discriminator.features(x)
        return discriminator.conv1(feature), discriminator.conv2(feature).flatten(1), feature
    src, cls = discriminator(x)
    return src, cls, discriminator.features(x)


def _no_autocast():
    return contextlib.nullcontext()


class Stepper:
    """The D step and the G step (docs/training.md#one-training-step) for one (G, D) pair.

    ``autocast``: a factory of the context the models' forwards run in (e.g.
    ``lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)``); the losses are
    computed outside it, in fp32. ``sizes``: the label space's group sizes (fused masked BCE).
    ``official``: the official layout (see the module doc), for memory comparisons only.
    """

    def __init__(self, generator, discriminator, opt_g, opt_d, sizes, *,
                 weights: LossWeights | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 official: bool = False) -> None:
        self.generator = generator
        self.discriminator = discriminator
        self.opt_g = opt_g
        self.opt_d = opt_d
        self.sizes = tuple(sizes)
        self.weights = weights if weights is not None else LossWeights()
        self.autocast = autocast if autocast is not None else _no_autocast
        self.official = bool(official)

    def _cls_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.official:
            return masked_bce_plain(logits, targets)
        return masked_multigroup_bce(logits, targets, self.sizes)

    def d_step(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """One critic update on ``batch``; returns its loss terms (detached scalar tensors)."""
        w, G, D = self.weights, self.generator, self.discriminator
        self.opt_d.zero_grad(set_to_none=True)
        with torch.no_grad(), self.autocast():
            x_fake = G(batch.x_real, batch.c_target)
        x_fake = x_fake.to(batch.x_real.dtype)
        gp = torch.zeros((), device=batch.x_real.device)
        if w.gp > 0:
            # The penalty before D's forwards: autograd runs the nodes made last first, so the
            # penalty's backward comes after the real/fake backward, when little else is alive
            # (vcfast/ops/gradient_penalty.py, "Order in a combined loss").
            with self.autocast():
                gp = gradient_penalty(D, batch.x_orig, x_fake, weight=w.gp,
                                      mode="autograd" if self.official else "lean")
        with self.autocast():
            src_real, cls_real = D(batch.x_real)
            src_fake, _ = D(x_fake)
        adv = -src_real.float().mean() + src_fake.float().mean()
        cls = self._cls_loss(cls_real.float(), batch.t_real)
        loss = adv + w.cls * cls + gp
        loss.backward()
        self.opt_d.step()
        return {"d_loss": loss.detach(), "d_adv": adv.detach(), "d_cls": cls.detach(),
                "d_gp": gp.detach()}

    def g_step(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """One generator update on ``batch`` (D frozen: no weight gradients computed for it);
        returns its loss terms (detached scalar tensors; ``g_loss`` without the identity term
        unless ``official``: :meth:`values` adds it)."""
        w, G, D = self.weights, self.generator, self.discriminator
        # D is frozen here, so under DistributedDataParallel its wrapper (which has no
        # features()/heads attributes) has nothing to all-reduce: call the module inside it.
        if isinstance(D, torch.nn.parallel.DistributedDataParallel):
            D = D.module
        x_real = batch.x_real
        self.opt_g.zero_grad(set_to_none=True)
        D.requires_grad_(False)
        try:
            identity = None
            if not self.official:
                # Identity first, on its own graph: backward frees it before the main graph
                # exists.
                with torch.set_grad_enabled(w.id > 0), self.autocast():
                    x_id = G(x_real, batch.c_real)
                identity = F.mse_loss(x_id.float(), x_real.float())
                if w.id > 0:
                    (w.id * identity).backward()
                del x_id
            with self.autocast():
                x_fake = G(x_real, batch.c_target)
                src_fake, cls_fake, feature_fake = discriminate(D, x_fake)
                x_rec = G(x_fake, batch.c_real)
                if self.official:
                    with torch.set_grad_enabled(w.id > 0):
                        x_id = G(x_real, batch.c_real)
                with torch.no_grad():
                    feature_orig = D.features(batch.x_orig)
            adv = -src_fake.float().mean()
            cls = self._cls_loss(cls_fake.float(), batch.t_target)
            rec = F.mse_loss(x_rec.float(), x_real.float())
            fm = F.mse_loss(feature_fake.float(), feature_orig.float())
            loss = adv + w.cls * cls + w.rec * rec + w.fm * fm
            if self.official:
                identity = F.mse_loss(x_id.float(), x_real.float())
                loss = loss + w.id * identity
                del x_id
            loss.backward()
            self.opt_g.step()
        finally:
            D.requires_grad_(True)
        return {"g_loss": loss.detach(), "g_adv": adv.detach(), "g_cls": cls.detach(),
                "g_rec": rec.detach(), "g_id": identity.detach(), "g_fm": fm.detach()}

    def values(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss terms a step returned, as floats (what the trainer logs): ``g_loss`` is the
        whole G loss, identity term included."""
        values = {name: float(t.item()) for name, t in losses.items()}
        if "g_loss" in losses and not self.official:
            values["g_loss"] = losses["g_loss"].item() + self.weights.id * losses["g_id"].item()
        return values
