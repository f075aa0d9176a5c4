"""How much memory one StarGAN-VC training iteration needs: official layout vs vcfast.

One iteration (docs/training.md#one-training-step) = ``n_critic`` D steps (real, fake, gradient
penalty, masked BCE on the classifier, backward, optimizer step) + one G step (D frozen;
G(x_real, c'), D on it, reconstruction G(x_fake, c_real), identity G(x_real, c_real), feature
matching on D's trunk feature, backward, step). The steps are written once, in
vcfast/train/step.py (:class:`vcfast.train.step.Stepper`): ``vcfast train`` runs them on its
batches, and :class:`TrainingIteration` (models, optimizers, one batch) calls the same methods.
The estimator runs it on the ``meta`` device under :class:`vcfast.memory.LiveBytesTracker` (the
paper-size models at batch 16 are sized without allocating anything), the validation and the
benchmarks run the very same code on real CPU tensors (:func:`measure_iteration`); so
``vcfast memory`` sizes what ``vcfast train`` runs for the same options (model ``size``,
bf16 autocast, residual-block checkpointing, ``optimizer``, batch, loss ``weights``).

``implementation="vcfast"``: the trainer's models (StarGANGenerator: LabelConcatConv2d,
keep-one-tensor norm-act units; what :func:`vcfast.convert_stargan` makes of the official G),
the lean penalty, the fused loss, and the identity term back-propagated on its own before the
rest of the G loss (gradients accumulate; one fewer G graph is alive at the peak); each step
frees its network's gradient buffers first (``zero_grad(set_to_none=True)``) and computes the
losses in fp32 outside autocast, as the trainer does.
``implementation="reference"``: the same step in the official StarGAN code's layout
(``Stepper(official=True)``: the official G with its labels tiled and concatenated,
InstanceNorm + ReLU as separate layers, autograd double-backward penalty, plain masked BCE,
the identity term in the main graph), for comparison; the trainer never runs it.
Options: residual-block checkpointing (``checkpoint_residual_blocks``) and bf16 autocast
(``autocast="bf16"``: fp32 weights, gradients and optimizer state; matmul/conv activations
in bf16).

Autocast on the meta device: ``torch.autocast`` only casts tensors of its own device type and
has no meta variant, so on meta the iteration runs under an emulation of it (a
``TorchFunctionMode`` applying autocast's casts for the ops these models use; see
:class:`_MetaAutocast`); on a real device it runs under ``torch.autocast`` itself. A test
checks that the two give the same bytes on CPU.

The default figures are what the tensors need (GPU-oriented): no allocator rounding or
caching, no kernel workspaces. For comparing with a real CPU run, ``workspace`` adds the
scratch PyTorch's CPU convolutions allocate below the dispatcher (oneDNN's blocked-layout
reorders, im2col buffers), which depends on the CPU's instruction set:
``workspace=calibrate_conv_scratch(...)`` takes it as measured on this machine (every
distinct convolution call of the iteration, recorded on meta and replayed once on real
tensors in a fresh process); ``workspace="onednn"`` is the fixed model
:func:`vcfast.memory.onednn_conv_scratch`, fitted on one AVX-512 CPU.

Checked exactly, on any CPU (tests/test_estimate_validation.py): the tracker on real CPU
tensors reads the same baseline, peak and phase peaks as on meta, byte for byte (fp32), the
custom ops' fakes return what their CPU kernels return, and the meta iteration makes the CPU
iteration's convolution calls. Compared with real peak RSS (bench/bench_models.py,
test_memory_estimate_vs_real; torch 2.14.1 CPU, AMD EPYC with AVX-512, 2 threads, 5 D steps
+ 1 G step, memory the iteration adds above weights + gradients + optimizer state + batch),
with the calibrated scratch: reduced size (64x64, conv_dim 16, 16 classes, batch 2)
reference +2.4 % and vcfast +2.0 % on the AVX-512 path, +2.3 % and +0.5 % on the AVX2 path
(ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2); paper size, vcfast, batch 1: 735 vs 735
MiB (AVX-512) and 734 vs 734 MiB (AVX2). The fixed AVX-512 model matches at paper size on
both paths (-0.2 %, -0.0 %) and at the reduced size on AVX-512 (+2.9 %, +2.1 %), but misses
the reduced size on AVX2 (-15.4 %, -18.8 %): small convolutions take other oneDNN kernels.
(These RSS figures predate the iteration running the trainer's own step; rerun
bench/bench_models.py to refresh them.)
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from vcfast import tracking as _memory
from vcfast.labels import LabelSpace

__all__ = ["TrainingIteration", "build_iteration", "calibrate_conv_scratch", "estimate_iteration",
           "iteration_conv_calls", "largest_batches", "measure_iteration"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST = {"bf16": torch.bfloat16}
_WORKSPACES = (None, "onednn")  # named scratch models (see _scratch_model)
_IMPLEMENTATIONS = ("reference", "vcfast")
_OPTIMIZERS = ("rmsprop", "adam")  # vcfast.train.config.OPTIMIZERS
# Loss weights (docs/training.md#weights-and-hyper-parameters); vcfast.train.step.LossWeights
LAMBDA_GP = LAMBDA_REC = LAMBDA_ID = LAMBDA_FM = 10.0


def _scratch_model(workspace):
    if callable(workspace):
        return workspace
    return _memory.onednn_conv_scratch if workspace == "onednn" else None


class TrainingIteration:
    """Models, optimizers and one batch of data for training (docs/training.md), with the steps as
    methods.

    Build it with :func:`build_iteration`. ``d_step()`` and ``g_step()`` are one discriminator /
    generator update each: :meth:`vcfast.train.step.Stepper.d_step` / ``g_step``, the very code
    ``vcfast train`` runs; ``run()`` is one full iteration (``n_critic`` D steps + 1 G step).
    The same object runs on meta or real tensors; nothing here looks at values.
    ``data``: ``x_real``, ``x_orig``, ``c_trg`` (c'), ``c_real``, ``t_real`` and optionally
    ``t_target`` (x_orig's classifier target; ``t_real`` when absent). ``lean=False``: the
    official layout (``Stepper(official=True)``). ``weights``: a
    :class:`vcfast.train.step.LossWeights` (default: docs/training.md's).
    """

    def __init__(self, G, D, g_opt, d_opt, data: dict, *, lean: bool, label_space: LabelSpace,
                 n_critic: int, autocast_dtype: torch.dtype | None, autocast_device: str,
                 weights=None):
        from vcfast.train.step import StepBatch, Stepper

        self.G, self.D, self.g_opt, self.d_opt = G, D, g_opt, d_opt
        self.x_real, self.x_orig = data["x_real"], data["x_orig"]
        self.c_trg, self.c_real, self.t_real = data["c_trg"], data["c_real"], data["t_real"]
        self.t_target = data.get("t_target", self.t_real)
        self.lean = lean
        self.label_space = label_space
        self.n_critic = n_critic
        self.autocast_dtype = autocast_dtype
        self.autocast_device = autocast_device
        self._meta_autocast = (_MetaAutocast(autocast_dtype)
                               if autocast_dtype is not None and autocast_device == "meta"
                               else None)
        if self._meta_autocast is not None and getattr(G, "checkpoint_residual_blocks", False):
            raise ValueError("checkpoint_residual_blocks together with autocast is not supported "
                             "on the meta device (the autocast emulation cannot follow checkpoint "
                             "recomputation); "
                             "estimate them separately")
        self.batch = StepBatch(x_real=self.x_real, x_orig=self.x_orig, c_real=self.c_real,
                               c_target=self.c_trg, t_real=self.t_real, t_target=self.t_target)
        self.stepper = Stepper(G, D, g_opt, d_opt, label_space.sizes, weights=weights,
                               autocast=self._autocast, official=not lean)

    def baseline_bytes(self) -> int:
        """Weights + gradient buffers + optimizer state + the batch: what exists before a step."""
        return _memory.tensor_bytes(*self._baseline())

    def _baseline(self) -> tuple:
        return (self.G, self.D, self.g_opt.state, self.d_opt.state, self.x_real, self.x_orig,
                self.c_trg, self.c_real, self.t_real, self.t_target)

    def tracker(self, scratch: Callable[..., int] | None = None) -> _memory.LiveBytesTracker:
        """A :class:`vcfast.memory.LiveBytesTracker` for :meth:`run`: the baseline counted and
        followed (a step frees its network's gradient buffers, ``zero_grad(set_to_none=True)``,
        and back-propagation makes new ones)."""
        tracker = _memory.LiveBytesTracker(baseline_bytes=self.baseline_bytes(), scratch=scratch)
        tracker.adopt(*self._baseline())
        return tracker

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if self._meta_autocast is not None:
            return self._meta_autocast.region()
        return torch.autocast(self.autocast_device, dtype=self.autocast_dtype)

    def _step_context(self):
        # On meta the autocast emulation is pushed for the whole step; it acts only inside the
        # forward regions (``_autocast()``), as autocast does.
        return self._meta_autocast if self._meta_autocast is not None else contextlib.nullcontext()

    def d_step(self) -> dict:
        """One D update (:meth:`vcfast.train.step.Stepper.d_step`): -D_src(real) + D_src(fake) +
        cls(real) + 10 GP, backward, optimizer step. Returns the loss tensors."""
        with self._step_context():
            return self.stepper.d_step(self.batch)

    def g_step(self) -> dict:
        """One G update (:meth:`vcfast.train.step.Stepper.g_step`, D frozen): adversarial +
        cls(fake) + 10 reconstruction + 10 identity + 10 feature matching, backward, optimizer
        step. vcfast back-propagates the identity term first, on its own graph (its G graph is
        freed before the other ones are built). Returns the loss tensors."""
        with self._step_context():
            return self.stepper.g_step(self.batch)

    def run(self, tracker: _memory.LiveBytesTracker | None = None,
            after_d_steps: Callable[[], None] | None = None) -> None:
        """One full iteration; with a tracker, the D steps and the G step are its phases
        ``"d_step"`` and ``"g_step"``. ``after_d_steps`` is called between the two (e.g. to read
        the process's peak memory so far)."""
        phase = tracker.phase if tracker is not None else (lambda _name: contextlib.nullcontext())
        for _ in range(self.n_critic):
            with phase("d_step"):
                self.d_step()
        if after_d_steps is not None:
            after_d_steps()
        with phase("g_step"):
            self.g_step()


def _check_options(batch, implementation, dtype, autocast, workspace=None, n_critic=1,
                   optimizer="rmsprop", size=None):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be 'vcfast' or 'reference', got {implementation!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if autocast not in (None, *_AUTOCAST):
        raise ValueError(f"autocast must be None or one of {sorted(_AUTOCAST)}, got {autocast!r}")
    if autocast is not None and dtype != "fp32":
        raise ValueError(f"autocast={autocast!r} keeps fp32 weights: dtype must be 'fp32', "
                         f"got {dtype!r}")
    if not callable(workspace) and workspace not in _WORKSPACES:
        raise ValueError("workspace must be None, 'onednn' or a scratch model (callable), "
                         f"got {workspace!r}")
    if isinstance(n_critic, bool) or not isinstance(n_critic, int) or n_critic < 0:
        raise ValueError(f"n_critic must be an int >= 0, got {n_critic!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(_OPTIMIZERS)}, got {optimizer!r}")
    if size is not None and size not in ("paper", "small", "tiny"):
        raise ValueError(f"size must be None or a trainer size (paper, small, tiny), got {size!r}")


def _build_models(implementation, labels, image_size, conv_dim, size, checkpoint):
    """(G, D) as ``vcfast train`` builds them (vcfast/train/models.py); the official layout's G
    for ``implementation="reference"``."""
    from vcfast.models import OfficialGenerator, StarGANDiscriminator, StarGANGenerator
    from vcfast.train.config import SIZES, TrainConfig
    from vcfast.train.models import build_discriminator, build_generator

    if size is not None:
        sizes = SIZES[size]
    else:
        sizes = {"g_conv_dim": conv_dim, "g_repeat": 6, "d_conv_dim": conv_dim, "d_repeat": 6,
                 "image_size": image_size}
    if implementation == "reference":
        G = OfficialGenerator(conv_dim=sizes["g_conv_dim"], c_dim=labels.input_dim,
                              repeat_num=sizes["g_repeat"], in_channels=1)
    elif size is not None:
        G = build_generator(TrainConfig(size=size, checkpoint_blocks=checkpoint), labels)
    else:
        G = StarGANGenerator(conv_dim=sizes["g_conv_dim"], c_dim=labels.input_dim,
                             repeat_num=sizes["g_repeat"], in_channels=1,
                             checkpoint_residual_blocks=checkpoint)
    if size is not None:
        D = build_discriminator(TrainConfig(size=size), labels)
    else:
        D = StarGANDiscriminator(in_channels=1, image_size=sizes["image_size"],
                                 conv_dim=sizes["d_conv_dim"], repeat_num=sizes["d_repeat"],
                                 n_classes=labels.n_classes)
    return G, D, sizes["image_size"]


def build_iteration(batch: int = 16, *, implementation: str = "vcfast", dtype: str = "fp32",
                    image_size: int = 256, label_space: LabelSpace | None = None,
                    conv_dim: int = 64, n_critic: int = 5, device: str | torch.device = "meta",
                    checkpoint_residual_blocks: bool = False, autocast: str | None = None,
                    seed: int = 0, optimizer: str = "rmsprop", size: str | None = None,
                    weights=None) -> TrainingIteration:
    """Models (paper size by default), the trainer's optimizers (``optimizer``: "rmsprop" 1e-5
    or "adam", docs/training.md) with their state in place (one zero-gradient step each), and
    one batch of random data, on ``device``.

    ``conv_dim`` scales both networks (64 = paper; G has 6 residual blocks, D 6 stride-2
    convs, so ``image_size`` must be a multiple of 64). ``size``: one of the trainer's sizes
    (``vcfast train --size``, :data:`vcfast.train.config.SIZES`) instead, built by the
    trainer's own functions (``image_size`` and ``conv_dim`` are then ignored).
    ``checkpoint_residual_blocks`` only applies to ``implementation="vcfast"``. ``weights``: a
    :class:`vcfast.train.step.LossWeights` (the lambdas). Create and run fake-tensor iterations
    inside the same ``FakeTensorMode`` (see :func:`estimate_iteration`).
    """
    from vcfast.train.step import make_optimizer

    _check_options(batch, implementation, dtype, autocast, n_critic=n_critic,
                   optimizer=optimizer, size=size)
    if checkpoint_residual_blocks and implementation != "vcfast":
        raise ValueError("checkpoint_residual_blocks applies to implementation='vcfast' only")
    if size is None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                         or image_size < 64 or image_size % 64):
        raise ValueError(f"image_size must be a positive multiple of 64, got {image_size!r}")
    labels = label_space if label_space is not None else LabelSpace()
    lean = implementation == "vcfast"
    param_dtype = _DTYPES[dtype]
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        G, D, image_size = _build_models(implementation, labels, image_size, conv_dim, size,
                                         bool(checkpoint_residual_blocks))
    # (fake tensors cannot be converted in place: only when needed)
    if param_dtype != torch.float32:
        G, D = G.to(param_dtype), D.to(param_dtype)
    g_opt = make_optimizer(optimizer, G.parameters())
    d_opt = make_optimizer(optimizer, D.parameters())
    # Optimizer state exists from the first step on; take one step of each so the baseline
    # (weights + gradients + optimizer state) is in place before measuring. Between steps of
    # the trainer both networks hold their gradient buffers (each step frees its own first).
    for opt, model in ((d_opt, D), (g_opt, G)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    x_real = torch.rand(batch, 1, image_size, image_size, device=device, dtype=param_dtype)
    c_trg = torch.rand(batch, labels.input_dim, device=device, dtype=param_dtype)
    t_real = torch.randint(-1, 2, (batch, labels.n_classes), device=device, dtype=torch.int8)
    # The trainer's batch (vcfast.train.step.encode_batch): both label vectors, both targets.
    data = dict(x_real=x_real, x_orig=x_real.clone(), c_trg=c_trg, c_real=c_trg.clone(),
                t_real=t_real, t_target=t_real.clone())
    return TrainingIteration(G, D, g_opt, d_opt, data, lean=lean, label_space=labels,
                             n_critic=n_critic, autocast_dtype=_AUTOCAST.get(autocast),
                             autocast_device=device.type, weights=weights)


class _MetaAutocast(TorchFunctionMode):
    """``torch.autocast`` for meta tensors (which autocast ignores: it only casts tensors of its
    own device type, and has no meta variant).

    Sits above autograd like autocast itself, so the casts are recorded and the backward sees
    the same dtypes as under real autocast. The op lists are the part of PyTorch's autocast
    lists (CPU and CUDA agree on them) that this iteration's models and losses use:
    convolutions, transposed convolutions and matrix products run in ``dtype``;
    ``binary_cross_entropy_with_logits`` and ``mse_loss`` in float32; everything else in its
    inputs' dtype (type promotion, as under autocast). As autocast does, the low-precision
    copy of a leaf tensor that requires grad (a weight) is made once per autocast region.
    Active inside :meth:`region` only. Not emulated: re-entering autocast in backward (for
    activation-checkpoint recomputation or ``custom_bwd`` Functions), because ``backward()``
    itself passes through the mode, which is switched off while it handles a call; so
    ``checkpoint_residual_blocks`` with ``autocast`` is refused on meta.
    Checked against real CPU autocast by tests/test_estimate.py (same tracked bytes).
    """

    _LOWER = frozenset({torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
                        torch.conv_transpose2d, torch.conv_transpose3d, torch.convolution,
                        F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                        torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm,
                        torch.baddbmm, torch.addbmm})
    _FP32 = frozenset({F.binary_cross_entropy_with_logits, torch.binary_cross_entropy_with_logits,
                       F.mse_loss})

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self._in_region = False
        self._weight_casts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def region(self):
        """The equivalent of ``with torch.autocast(...):`` (the cast cache lives as long)."""
        self._in_region = True
        try:
            yield
        finally:
            self._in_region = False
            self._weight_casts.clear()

    def _cast(self, t, target: torch.dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != target):
            return t
        cacheable = target == self.dtype and t.is_leaf and t.requires_grad and self._in_region
        if cacheable:
            hit = self._weight_casts.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
        out = t.to(target)
        if cacheable:
            self._weight_casts[id(t)] = (t, out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_region:
            target = (self.dtype if func in self._LOWER
                      else torch.float32 if func in self._FP32 else None)
            if target is not None:
                args, kwargs = tree_map(lambda t: self._cast(t, target), (args, kwargs))
        return func(*args, **kwargs)


def estimate_iteration(batch: int = 16, *, implementation: str = "vcfast", dtype: str = "fp32",
                       image_size: int = 256, label_space: LabelSpace | None = None,
                       conv_dim: int = 64, n_critic: int = 5, device: str = "meta",
                       checkpoint_residual_blocks: bool = False, autocast: str | None = None,
                       workspace: str | Callable[..., int] | None = None,
                       optimizer: str = "rmsprop", size: str | None = None,
                       weights=None, ddp: bool = False) -> dict:
    """Peak bytes of one training iteration, overall and per phase.

    ``autocast="bf16"``: fp32 weights, bf16 autocast (run on fake CPU tensors, see the module
    doc; CPU autocast's op lists). ``checkpoint_residual_blocks``: vcfast G recomputes its
    residual blocks in backward. ``workspace``: kernel scratch below the dispatcher, for
    comparing with a real CPU run; default ``None`` counts tensors only. ``"onednn"``: the
    fixed model :func:`vcfast.memory.onednn_conv_scratch` (fitted on an AVX-512 CPU); a
    callable: any ``scratch`` model of :class:`vcfast.memory.LiveBytesTracker`, e.g. the
    convolution scratch measured on this machine by :func:`calibrate_conv_scratch`.
    ``optimizer``, ``size``, ``weights``: as for :func:`build_iteration` (the trainer's
    optimizer, model size and loss weights). ``ddp``: the figures of one rank of a
    DistributedDataParallel run (``batch`` is per rank): DDP's reducer keeps, for its whole
    life, bucket buffers as large as the gradients of the parameters it all-reduces (G's and
    D's; ``gradient_as_bucket_view`` is off, PyTorch's default and the trainer's), so every
    figure grows by those bytes (``ddp_bucket_bytes``).

    The iteration is ``vcfast train``'s: the steps are :class:`vcfast.train.step.Stepper`'s
    (each frees its network's gradient buffers first, D is frozen in the G step, the losses
    are computed in fp32 outside autocast).

    Returns ``{"peak_bytes", "baseline_bytes" (weights + gradients + optimizer state + batch),
    "peak_allocated_bytes" (peak minus baseline), "phases": {"d_step": peak, "g_step": peak},
    ...options}`` (phase peaks include the baseline).
    """
    _check_options(batch, implementation, dtype, autocast, workspace, n_critic, optimizer, size)
    iteration = build_iteration(batch, implementation=implementation, dtype=dtype,
                                image_size=image_size, label_space=label_space, conv_dim=conv_dim,
                                n_critic=n_critic, device=device,
                                checkpoint_residual_blocks=checkpoint_residual_blocks,
                                autocast=autocast, optimizer=optimizer, size=size,
                                weights=weights)
    tracker = iteration.tracker(scratch=_scratch_model(workspace))
    baseline = tracker.baseline_bytes
    with tracker:
        iteration.run(tracker)
    if size is not None:
        image_size = iteration.x_real.shape[-1]
    buckets = (sum(p.numel() * p.element_size() for net in (iteration.G, iteration.D)
                   for p in net.parameters() if p.requires_grad) if ddp else 0)
    return {
        "implementation": implementation, "batch": batch, "dtype": dtype, "image_size": image_size,
        "conv_dim": conv_dim, "n_critic": n_critic, "autocast": autocast,
        "optimizer": optimizer, "size": size,
        "checkpoint_residual_blocks": bool(checkpoint_residual_blocks),
        "workspace": (workspace if workspace is None or isinstance(workspace, str)
                      else type(workspace).__name__),
        "peak_bytes": tracker.peak_bytes + buckets, "baseline_bytes": baseline + buckets,
        "peak_allocated_bytes": tracker.peak_allocated_bytes,
        "phases": {name: peak + buckets for name, peak in tracker.phase_peaks.items()},
        "ddp": bool(ddp), "ddp_bucket_bytes": buckets,
    }


def largest_batches(budgets_bytes: list[int], *, implementation: str = "vcfast",
                    **kwargs) -> dict[int, int]:
    """For each budget, the largest batch whose estimated iteration peak fits it (0 if none).

    Peak memory is affine in the batch (weights and optimizer state fixed, activations per
    sample), so batches 1 and 2 give the line; each answer is then confirmed by estimating it
    (and stepped down while it does not fit). ``kwargs`` go to :func:`estimate_iteration`.
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


def iteration_conv_calls(batch: int = 16, **options) -> dict[tuple, int]:
    """The distinct convolution calls of one iteration (``options`` as for
    :func:`build_iteration`), recorded on the meta device: :func:`vcfast.memory.conv_call_key`
    -> number of calls."""
    iteration = build_iteration(batch, device="meta", **options)
    with _memory.ConvCallRecorder() as recorder:
        iteration.run()
    return recorder.calls


def calibrate_conv_scratch(batches: Iterable[int] = (16,),
                           implementations: Iterable[str] = _IMPLEMENTATIONS, *, threads: int = 2,
                           **options) -> _memory.MeasuredConvScratch:
    """The scratch of every convolution call the iterations make, measured on this CPU.

    The iterations (each batch x implementation, the other ``options`` as for
    :func:`build_iteration`) run on the meta device to record their convolution calls; the
    distinct calls are then replayed on real CPU tensors in one fresh process
    (:func:`vcfast.memory.measure_conv_scratch`). Pass the result as
    ``estimate_iteration(..., workspace=...)`` for any of those configurations: the estimate
    then uses what this CPU's oneDNN build really allocates instead of the fixed ``"onednn"``
    model (fitted on one AVX-512 CPU).
    """
    calls: dict[tuple, int] = {}
    for batch in batches:
        for implementation in implementations:
            calls.update(iteration_conv_calls(batch, implementation=implementation, **options))
    return _memory.MeasuredConvScratch(_memory.measure_conv_scratch(calls, threads=threads))


_MEASURE_SETUP = textwrap.dedent(
    """
    import resource
    import torch
    from vcfast.estimate import build_iteration
    from vcfast.labels import LabelSpace

    def _resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _max_rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    info = {{"process_bytes": _resident()}}   # interpreter + torch + vcfast, before any model
    groups = {groups!r}
    iteration = build_iteration({batch}, implementation={implementation!r}, image_size={image_size},
                                conv_dim={conv_dim}, n_critic={n_critic}, device="cpu",
                                label_space=LabelSpace(groups) if groups else None,
                                checkpoint_residual_blocks={checkpoint!r}, autocast={autocast!r},
                                optimizer={optimizer!r}, size={size!r})
    info["built_bytes"] = _resident()
    info["estimated_baseline_bytes"] = iteration.baseline_bytes()

    def run():
        iteration.run(after_d_steps=lambda: info.__setitem__("d_steps_max_rss", _max_rss()))
        return torch.zeros(0)
    """
)


def measure_iteration(batch: int, *, implementation: str = "vcfast", image_size: int = 256,
                      label_space: LabelSpace | None = None, conv_dim: int = 64, n_critic: int = 5,
                      checkpoint_residual_blocks: bool = False, autocast: str | None = None,
                      warmup: bool = True, threads: int = 2, optimizer: str = "rmsprop",
                      size: str | None = None) -> dict:
    """Real peak memory of one iteration on CPU (fp32), in a fresh process.

    Method (:func:`vcfast.memory.measure_process_peak`): glibc returns freed memory at once
    (``MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=65536``); models, optimizer state (one
    zero-gradient step) and the batch are built, one warm-up iteration runs (``warmup=False``:
    none), then the baseline is the resident size (lifted by a ballast to the high-water mark
    so ru_maxrss moves with the iteration's first byte); the peak is ru_maxrss after the
    iteration. Returns ``{"peak_allocated_bytes"}`` (peak - baseline: what the iteration adds,
    compare with :func:`estimate_iteration`'s ``peak_allocated_bytes`` with the CPU's
    convolution scratch, ``workspace=calibrate_conv_scratch(...)``),
    ``"d_steps_allocated_bytes"`` (the same up to the end of the D steps),
    ``"peak_bytes"`` (peak above the process's footprint before any model, i.e. weights +
    state + batch + iteration: compare with the estimate's ``peak_bytes``), ``"process_bytes"``,
    ``"built_bytes"`` (resident after building), and the raw figures.
    """
    _check_options(batch, implementation, "fp32", autocast, n_critic=n_critic,
                   optimizer=optimizer, size=size)
    groups = tuple(zip(label_space.names, label_space.sizes)) if label_space is not None else None
    setup = _MEASURE_SETUP.format(groups=groups, batch=batch, implementation=implementation,
                                  image_size=image_size, conv_dim=conv_dim, n_critic=n_critic,
                                  checkpoint=bool(checkpoint_residual_blocks), autocast=autocast,
                                  optimizer=optimizer, size=size)
    raw = _memory.measure_process_peak(setup, threads=threads, warmup=warmup)
    info = raw["info"]
    before_ballast = raw["resident_before_ballast"]
    return {
        "implementation": implementation, "batch": batch, "image_size": image_size,
        "conv_dim": conv_dim,
        "peak_allocated_bytes": raw["extra"],
        "d_steps_allocated_bytes": max(0, info["d_steps_max_rss"] - raw["baseline"]),
        "peak_bytes": before_ballast - info["process_bytes"] + raw["extra"],
        "process_bytes": info["process_bytes"], "built_bytes": info["built_bytes"],
        "estimated_baseline_bytes": info["estimated_baseline_bytes"],
        "raw": raw,
    }
