"""vcfast's ops: one module per op family. The op index, in short (full table, with tests and
benchmarks: docs/architecture.md#op-index; the math: docs/ops.md).

log_spectrogram (docs/ops.md#log-spectrogram)
    entry      spectrogram.log_spectrogram (backend= reference | cpu | cuda | triton)
    reference  spectrogram.log_spectrogram_reference
    kernels    csrc/cpu/spectrogram_cpu.cpp, csrc/cuda/spectrogram_kernels.cu,
               kernels/spectrogram.py (launcher spectrogram_triton)
    registered vcfast::log_spectrogram[_backward], vcfast::log_spectrogram_triton[_backward]

masked_multigroup_bce, masked_multigroup_softmax_ce (docs/ops.md#masked-multi-group-losses)
    entry      classification.masked_multigroup_bce / masked_multigroup_softmax_ce (backend=)
    reference  classification.masked_multigroup_{bce,softmax_ce}_reference
    kernels    csrc/cpu/classification_cpu.cpp, csrc/cuda/classification_kernels.cu,
               kernels/classification.py (launcher classification_triton)
    registered vcfast::masked_multigroup_{bce,softmax_ce}[_backward], ..._triton[_backward]

gradient penalty, penalty_terms, leaky_relu_with_bits (docs/ops.md#gradient-penalty)
    entry      gradient_penalty.gradient_penalty (mode= lean | autograd), slope_bits.*
    reference  mode="autograd"; slope_bits.*_reference
    kernels    csrc/cpu/gradient_penalty_cpu.cpp, kernels/gradient_penalty.py
               (launcher gradient_penalty_triton)
    registered vcfast::lean_gradient_penalty, vcfast::{leaky_relu_with_bits,
               scale_by_slope_bits, penalty_terms}[_triton]

label_table (label conv, docs/ops.md#label-conditioned-convolution)
    entry      label_conv.label_table_add / label_table_grad (module vcfast.nn.LabelConcatConv2d)
    reference  label_conv.label_table_{add,grad}_reference
    kernels    csrc/cpu/label_conv_cpu.cpp, kernels/label_conv.py (launcher label_conv_triton)
    registered vcfast::label_table_{add,grad}[_triton]

norm_act (docs/ops.md#instance-norm-relu-conv)
    entry      norm_act.instance_norm_stats / norm_relu_forward / norm_relu_backward
    reference  norm_act.*_reference
    kernels    csrc/cpu/norm_act_cpu.cpp, kernels/norm_act.py (launcher norm_act_triton)
    registered vcfast::instance_norm_stats, vcfast::norm_relu_{forward,backward}[_triton]

spectrogram inversion: inverse.spectrogram_to_wave (plain torch, not a registered op).
multigroup_accuracy: vcfast.metrics (plain torch, not a registered op).

Shared Triton plumbing (op definition, launch checks) is in _triton. Importing this package
imports none of the op modules: each is imported where it is used.
"""
