"""How much memory one StarGAN-VC training iteration needs: official layout vs vcfast.

One iteration (SPEC §5) = ``n_critic`` D steps (real, fake, gradient penalty, masked BCE on
the classifier, backward, RMSprop step) + one G step (G(x_real, c'), D on it, reconstruction
G(x_fake, c_real), identity G(x_real, c_real), feature matching on D's 2048x4x4 feature,
backward, step). It runs on the ``meta`` device under :class:`vcfast.memory.LiveBytesTracker`,
so the paper-size models at batch 16 are sized without allocating anything.

``implementation="reference"``: the official StarGAN code's layout (labels tiled and
concatenated, InstanceNorm + ReLU as separate layers, autograd double-backward penalty).
``implementation="vcfast"``: the same models converted with :func:`vcfast.convert_stargan`
(LabelConcatConv2d, keep-one-tensor norm-act units), the lean penalty, the fused loss, and
the identity term back-propagated on its own before the rest of the G loss (gradients
accumulate; one fewer G graph is alive at the peak).

The figures are what the tensors need. They do not include allocator rounding/caching or
kernel workspaces (cuDNN/oneDNN scratch); see vcfast.memory for what the tracker sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vcfast.labels import LabelSpace
from vcfast.memory import LiveBytesTracker, tensor_bytes

__all__ = ["estimate_iteration", "largest_batches"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _masked_bce_plain(logits, targets):
    mask = targets != -1
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype),
                                              reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def estimate_iteration(batch: int = 16, *, implementation: str = "vcfast", dtype: str = "fp32",
                       image_size: int = 256, label_space: LabelSpace | None = None,
                       n_critic: int = 5, device: str = "meta") -> dict:
    """Peak bytes of one training iteration, overall and per phase.

    Returns ``{"peak_bytes", "baseline_bytes" (weights + gradients + optimizer state),
    "phases": {"d_step": peak, "g_step": peak}, ...}`` (peaks include the baseline).
    """
    from vcfast.models import OfficialGenerator, StarGANDiscriminator, convert_stargan
    from vcfast.ops.classification import masked_multigroup_bce
    from vcfast.ops.gradient_penalty import gradient_penalty

    if implementation not in ("vcfast", "reference"):
        raise ValueError(f"estimate_iteration: implementation must be 'vcfast' or 'reference', "
                         f"got {implementation!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"estimate_iteration: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"estimate_iteration: batch must be an int >= 1, got {batch!r}")
    labels = label_space or LabelSpace()
    lean = implementation == "vcfast"
    param_dtype = _DTYPES[dtype]
    with torch.device(device):
        G = OfficialGenerator(c_dim=labels.input_dim).to(param_dtype)
        D = StarGANDiscriminator(image_size=image_size, n_classes=labels.n_classes).to(param_dtype)
    if lean:
        G, D = convert_stargan(G), convert_stargan(D)
    g_opt = torch.optim.RMSprop(G.parameters(), lr=1e-5)
    d_opt = torch.optim.RMSprop(D.parameters(), lr=1e-5)

    def data():
        x = torch.rand(batch, 1, image_size, image_size, device=device, dtype=param_dtype)
        c = torch.rand(batch, labels.input_dim, device=device, dtype=param_dtype)
        t = torch.randint(-1, 2, (batch, labels.n_classes), device=device, dtype=torch.int8)
        return x, c, t

    def cls_loss(logits, targets):
        return masked_multigroup_bce(logits, targets, labels.sizes) if lean else _masked_bce_plain(logits, targets)

    # Optimizer state exists from the first step on; take one step of each so the baseline
    # (weights + gradients + RMSprop square averages) is in place before measuring.
    for opt, model in ((d_opt, D), (g_opt, G)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    x_real, c_trg, t_real = data()
    x_orig = x_real.clone()
    baseline = tensor_bytes(G, D, g_opt.state, d_opt.state, x_real, c_trg, t_real, x_orig)
    tracker = LiveBytesTracker(baseline_bytes=baseline)
    with tracker:
        for _ in range(n_critic):
            with tracker.phase("d_step"):
                d_opt.zero_grad(set_to_none=False)
                with torch.no_grad():
                    x_fake = G(x_real, c_trg)
                src_real, cls_real = D(x_real)
                src_fake, _ = D(x_fake)
                d_loss = -src_real.mean() + src_fake.mean() + cls_loss(cls_real, t_real)
                d_loss = d_loss + gradient_penalty(D, x_orig, x_fake, mode="lean" if lean else "autograd")
                d_loss.backward()
                d_opt.step()
                del x_fake, src_real, cls_real, src_fake, d_loss
        with tracker.phase("g_step"):
            g_opt.zero_grad(set_to_none=False)
            c_real = c_trg  # the real labels' vector: same shape, same memory
            if lean:  # identity term first, on its own graph
                (10 * (G(x_real, c_real) - x_real).pow(2).mean()).backward()
            x_fake = G(x_real, c_trg)
            src_fake, cls_fake = D(x_fake)
            g_loss = -src_fake.mean() + cls_loss(cls_fake, t_real)
            g_loss = g_loss + 10 * (G(x_fake, c_real) - x_real).pow(2).mean()
            if not lean:
                g_loss = g_loss + 10 * (G(x_real, c_real) - x_real).pow(2).mean()
            g_loss = g_loss + 10 * (D.features(x_fake) - D.features(x_orig).detach()).pow(2).mean()
            g_loss.backward()
            g_opt.step()
    return {
        "implementation": implementation, "batch": batch, "dtype": dtype, "image_size": image_size,
        "peak_bytes": tracker.peak_bytes, "baseline_bytes": baseline,
        "phases": dict(tracker.phase_peaks),
    }


def largest_batches(budgets_bytes: list[int], *, implementation: str = "vcfast", **kwargs) -> dict[int, int]:
    """For each budget, the largest batch whose estimated iteration peak fits it (0 if none).

    Peak memory is affine in the batch (weights and optimizer state fixed, activations per
    sample), so batches 1 and 2 give the line; each answer is then confirmed by estimating it
    (and stepped down while it does not fit).
    """
    def peak(batch: int) -> int:
        return estimate_iteration(batch, implementation=implementation, **kwargs)["peak_bytes"]

    p1, p2 = peak(1), peak(2)
    per_sample = max(p2 - p1, 1)
    answers = {}
    for budget in budgets_bytes:
        guess = int((budget - (p1 - per_sample)) // per_sample)
        while guess >= 1 and peak(guess) > budget:
            guess -= 1
        answers[budget] = max(guess, 0)
    return answers
