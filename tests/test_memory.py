"""vcfast/tracking.py (re-exported by vcfast.memory): exact live-storage accounting
(meta == CPU), the convolution-call records and scratch models, and the fresh-process memory
measurement."""

import sys

import pytest
import torch

from vcfast.memory import (
    ConvCallRecorder,
    LiveBytesTracker,
    MeasuredConvScratch,
    conv_call_key,
    measure_conv_scratch,
    measure_process_peak,
    onednn_conv_scratch,
    peak_memory,
    tensor_bytes,
)
from vcfast.tracking import CONV_STACK_WORKLOAD


def test_elementwise_peak_exact():
    x = torch.randn(1000)
    with LiveBytesTracker(baseline_bytes=tensor_bytes(x)) as t:
        y = x * 2
        z = y + 1
        del y
        w = z.view(10, 100)  # view: no storage
        z.add_(1)  # in-place: no storage
        zz = w[3:].t()  # view of a view
    assert t.baseline_bytes == 4000
    assert t.peak_allocated_bytes == 8000
    assert t.peak_bytes == 12000
    assert t.current_bytes == 8000  # x + z
    assert t.num_allocations == 2
    del z, w
    assert t.current_bytes == 8000  # zz still holds z's storage
    del zz
    assert t.current_bytes == 4000  # freed storage decremented (even after the mode exited)


def test_views_and_inplace_not_counted():
    x = torch.randn(64, 64)
    with LiveBytesTracker() as t:
        x.view(-1)
        x.t().contiguous()  # a copy: counted, then freed
        x.transpose(0, 1)[1:, ::2]
        x.mul_(2)
        torch.mul(x, 3, out=x)
    assert t.peak_allocated_bytes == 64 * 64 * 4
    assert t.current_bytes == 0


def test_shared_storage_counted_once():
    with LiveBytesTracker() as t:
        a = torch.empty(100)
        parts = a.split(10)  # views
        b = torch.cat(parts)
    assert t.current_bytes == 800
    del a, parts, b
    assert t.current_bytes == 0


def test_phases_and_reset():
    with LiveBytesTracker(baseline_bytes=100) as t:
        with t.phase("big"):
            a = torch.empty(1000)
            del a
        with t.phase("small"):
            b = torch.empty(10)
        t.reset_peak()
        assert t.peak_bytes == 140
    assert t.phase_peaks == {"big": 4100, "small": 140}
    del b


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_forward_backward_saved_activations(device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 50).to(device)
    x = torch.randn(32, 100, device=device)
    base = tensor_bytes(lin, x)
    assert base == (50 * 100 + 50 + 32 * 100) * 4
    act = 32 * 50 * 4
    with LiveBytesTracker(baseline_bytes=base) as t:
        with t.phase("forward"):
            loss = torch.relu(lin(x)).sum()
        # addmm output (freed after relu) + relu output (saved by relu's backward) + loss
        assert t.phase_peaks["forward"] == base + 2 * act
        assert t.current_bytes == base + act + 4
        with t.phase("backward"):
            loss.backward()
    grads = (50 * 100 + 50) * 4
    # backward ops are seen: grad of relu input, weight and bias grads, all allocated under the mode
    assert t.num_allocations >= 6
    # saved relu output freed with the graph; the grads (and loss) survive
    assert t.current_bytes == base + grads + 4
    # at the backward peak: relu grad (act), weight+bias grads, loss and its ones-like seed grad
    assert t.phase_peaks["backward"] == base + act + grads + 8
    assert t.peak_bytes == t.phase_peaks["backward"]


def _conv_net(memory_format=torch.contiguous_format, c=16):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
    )
    return net.to(memory_format=memory_format)


def test_meta_matches_cpu_conv_net():
    def step(net, x):
        net(x).square().mean().backward()

    net = _conv_net()
    x = torch.randn(2, 3, 24, 24, requires_grad=True)
    cpu = peak_memory(step, net, x, device=None)
    assert net[0].weight.grad is not None  # really ran on CPU
    meta = peak_memory(step, _conv_net(), torch.randn(2, 3, 24, 24, requires_grad=True))
    assert meta["baseline_bytes"] == cpu["baseline_bytes"] == tensor_bytes(_conv_net(), x)
    assert meta["peak_bytes"] == cpu["peak_bytes"]
    assert meta["end_bytes"] == cpu["end_bytes"]
    assert meta["num_allocations"] == cpu["num_allocations"]
    assert cpu["peak_allocated_bytes"] > 6 * 2 * 16 * 24 * 24 * 4  # saved activations at least


def test_peak_memory_meta_leaves_module_alone():
    net = _conv_net()
    out = peak_memory(lambda m, x: m(x), net, torch.randn(1, 3, 8, 8))
    assert net[0].weight.device.type == "cpu"
    assert out["output_bytes"] == 16 * 8 * 8 * 4


def test_round_to():
    with LiveBytesTracker(round_to=512) as t:
        a = torch.empty(3)
    assert t.current_bytes == 512
    del a


# --- real memory and kernel scratch -------------------------------------------------------------




@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous_format"])
def test_tracked_bytes_do_not_depend_on_the_memory_format(memory_format):
    """3 x (conv3x3 + ReLU), 8 -> 64 -> 64 -> 64 channels, batch 2, 192 x 192, fp32, fwd+bwd,
    on meta: saved activations + gradients, the same in both layouts. (What real CPU
    convolutions add below the dispatcher, which depends on the layout and on the CPU, is
    measured in bench/bench_models.py.)"""
    ns: dict = {}
    exec(CONV_STACK_WORKLOAD.format(memory_format=memory_format), ns)
    net = ns["net"].to("meta")
    x = ns["x"].detach().to("meta").requires_grad_()

    def step():
        net.zero_grad(set_to_none=True)
        x.grad = None
        net(x).sum().backward()

    assert peak_memory(step, device=None)["peak_allocated_bytes"] == 75_645_192


def test_tensors_made_from_python_data_are_counted():
    """torch.tensor(data) fills its storage outside the dispatcher; the tracker counts it at
    aten.lift_fresh, as the meta device counts the copy such a tensor gets moved to."""
    with LiveBytesTracker() as t:
        ids = torch.tensor(list(range(64)), dtype=torch.int64)
        on_meta = torch.tensor(list(range(64)), dtype=torch.int64).to("meta")
    assert t.current_bytes == 2 * 64 * 8  # ids + the meta copy (the CPU original is freed)
    assert t.peak_allocated_bytes == 3 * 64 * 8
    del ids, on_meta
    assert t.current_bytes == 0


def _conv_call(device, grad_output_expanded=False):
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    forward = torch.ops.aten.convolution.default
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    out = forward(*args)
    grad = (torch.ones((), device=device).expand(out.shape) if grad_output_expanded
            else torch.ones_like(out))
    backward = torch.ops.aten.convolution_backward.default
    backward_args = (grad, x, w, [4], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    return (forward, args, out), (backward, backward_args)


def test_conv_call_keys_are_the_same_on_meta_and_cpu():
    (f_meta, a_meta, _), (b_meta, ba_meta) = _conv_call("meta", grad_output_expanded=True)
    (f_cpu, a_cpu, _), (b_cpu, ba_cpu) = _conv_call("cpu", grad_output_expanded=True)
    key = conv_call_key(f_cpu, a_cpu)
    assert key == conv_call_key(f_meta, a_meta)
    assert key[0] == "aten.convolution.default"
    assert key[1] == ("tensor", (2, 3, 8, 8), (192, 64, 8, 1), "float32")
    assert key[4:] == ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    backward_key = conv_call_key(b_cpu, ba_cpu)
    assert backward_key == conv_call_key(b_meta, ba_meta)
    # layout is part of the key
    assert backward_key[1] == ("tensor", (2, 4, 8, 8), (0, 0, 0, 0), "float32")
    assert conv_call_key(torch.ops.aten.add.Tensor, (a_cpu[0], a_cpu[0])) is None


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_conv_calls_recorded_on_meta_are_the_cpu_calls(memory_format):
    """The calibrated estimate replays calls recorded on meta: they must be the CPU's, also
    for channels-last convolutions, whose meta outputs come back contiguous."""
    calls = {}
    for device in ("meta", "cpu"):
        net = _conv_net(memory_format).to(device)
        x = (torch.randn(2, 3, 12, 12).to(device=device, memory_format=memory_format)
             .requires_grad_())
        with ConvCallRecorder() as recorder:
            net(x).sum().backward()
        calls[device] = recorder.calls
    assert len(calls["cpu"]) == 4
    assert calls["meta"] == calls["cpu"]
    if memory_format == torch.channels_last:  # every activation described channels-last
        four_d = [spec for key in calls["cpu"] for spec in key[1:]
                  if isinstance(spec, tuple) and spec[:1] == ("tensor",) and len(spec[1]) == 4]
        assert len(four_d) == 10 and all(spec[2][1] == 1 for spec in four_d)


def test_conv_call_recorder_counts_distinct_calls():
    net = _conv_net()
    with ConvCallRecorder() as recorder:
        net(torch.randn(2, 3, 12, 12)).sum().backward()
    # three forward convs: 3 -> 16 (its own key) and 16 -> 16 twice (one key), and likewise
    # their backwards (the first without an input gradient)
    assert sorted(recorder.calls.values()) == [1, 1, 2, 2]
    assert {k[0] for k in recorder.calls} == {"aten.convolution.default",
                                              "aten.convolution_backward.default"}


def test_measured_conv_scratch_uses_the_measurement_then_the_fallback():
    (forward, args, out), (backward, backward_args) = _conv_call("meta")
    model = MeasuredConvScratch({conv_call_key(forward, args): 12345})
    assert model(forward, args, {}, out) == 12345
    assert model.misses == 0
    assert (model(backward, backward_args, {}, None)
            == onednn_conv_scratch(backward, backward_args, {}, None))
    assert model.misses == 1
    assert model(torch.ops.aten.add.Tensor, (out, out), {}, out) == 0
    assert MeasuredConvScratch({}, fallback=None)(forward, args, {}, out) == 0

    def step(x, w):
        torch.ops.aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)

    plain = peak_memory(step, *args[:2])
    with_scratch = peak_memory(step, *args[:2], scratch=model)
    assert with_scratch["peak_bytes"] == plain["peak_bytes"] + 12345


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and glibc malloc")
def test_measure_conv_scratch_replays_each_call():
    """One fresh process replays the calls (an expanded, stride-0 gradient included) and
    returns a byte count per call; how many bytes depends on the CPU and is benchmarked in
    bench/bench_models.py, not asserted here."""
    (forward, args, _), (backward, backward_args) = _conv_call("meta", grad_output_expanded=True)
    keys = [conv_call_key(backward, backward_args), conv_call_key(forward, args)]
    measured = measure_conv_scratch(keys + keys[:1])
    assert set(measured) == set(keys)
    assert all(isinstance(v, int) and v >= 0 for v in measured.values())
    assert measure_conv_scratch([]) == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and glibc malloc")
def test_measure_process_peak_without_warmup_returns_info():
    setup = (
        "import torch\n"
        "info = {'calls': 0}\n"
        "def run():\n"
        "    info['calls'] += 1\n"
        "    scratch = torch.ones(16 * 2**20)  # 64 MiB, freed before returning\n"
        "    return torch.zeros(1024)\n"
    )
    result = measure_process_peak(setup, warmup=False)
    assert result["info"] == {"calls": 1}  # no warm-up call
    assert result["out_bytes"] == 4096
    # The RSS figure itself is checked in bench/ (bench_models.py), not here: tests assert
    # nothing that depends on the allocator or the CPU.
    assert isinstance(result["extra"], int)
    assert result["resident_before_ballast"] <= result["baseline"]


def test_onednn_scratch_counts_the_weight_reorder():
    x = torch.empty(1, 2048, 4, 4, device="meta")
    w = torch.empty(1476, 2048, 4, 4, device="meta")  # the paper D's classifier head
    out = torch.empty(1, 1476, 1, 1, device="meta")
    conv = torch.ops.aten.convolution.default
    assert onednn_conv_scratch(conv, (x, w), {}, out) == x.numel() * 4 + w.numel() * 4
    backward = torch.ops.aten.convolution_backward.default
    assert (onednn_conv_scratch(backward, (out, x, w), {}, None)
            == (out.numel() + x.numel() + w.numel()) * 4)
    assert onednn_conv_scratch(torch.ops.aten.add.Tensor, (x, x), {}, x) == 0
