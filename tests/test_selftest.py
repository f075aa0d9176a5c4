"""`vcfast selftest` (every op x backend vs float64, timed; model steps) and `info --kernels`."""

import json
import sys
import types

import pytest
import torch

from vcfast import _extension
from vcfast.cli import main
from vcfast.selftest import BF16_TOLERANCE_CAP, OP_CASES, TOLERANCES, bf16_tolerance, relative_error

needs_extension = pytest.mark.skipif(not _extension.EXTENSION_LOADED,
                                     reason="the broken backend is a C++ op of vcfast._C")


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    # The interpreter takes minutes for these shapes; the Triton kernels have their own tests.
    # selftest reads the variable when it starts, so this skips its Triton rows.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _report(path):
    return json.loads(path.read_text())


def test_quick_cpu_selftest_passes_and_reports_every_op(tmp_path, capsys, no_triton_interpreter):
    out = tmp_path / "selftest.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    report = _report(out)
    assert report["ok"] is True
    rows = report["ops"]
    for row in rows:
        assert {"error", "tolerance", "ok"} <= set(row)
        assert row["ok"] is True and row["exception"] is None
        assert 0 <= row["error"] <= row["tolerance"]
        assert row["base_tolerance"] == TOLERANCES[row["op"]][row["dtype"]] <= row["tolerance"]
        assert row["ms"] > 0
    # Every op, both dtypes, the reference and each backend the CPU has.
    expected_backends = {"reference", "cpu", "vcfast"} if _extension.EXTENSION_LOADED else \
        {"reference", "vcfast"}
    for case in OP_CASES:
        for dtype in ("fp32", "bf16"):
            ran = {r["backend"] for r in rows if r["op"] == case.op and r["dtype"] == dtype}
            assert ran == set(case.backends) & expected_backends, (case.op, dtype)
    # Triton on a CPU needs the interpreter, which the fixture turned off: skipped, with why.
    why = report["backends"]["triton"]
    assert ("TRITON_INTERPRET=1" if _extension.triton_available() else "not installed") in why
    assert {s["backend"] for s in report["skipped"]} == \
        ({"triton"} if _extension.EXTENSION_LOADED else {"triton", "cpu"})
    steps = report["models"]["rows"]
    assert [s["step"] for s in steps] == ["D step", "G step"]
    for step in steps:
        assert step["ok"] and step["peak_bytes"] > 0 and step["estimated_bytes"] > 0
    conditions = report["conditions"]
    assert conditions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert conditions["threads"] == torch.get_num_threads()
    assert conditions["torch"] == torch.__version__
    table = capsys.readouterr().out
    assert "skipped backend triton" in table and "log_spectrogram" in table
    assert f"{len(rows) + 2} of {len(rows) + 2} checks passed" in table


@needs_extension
def test_a_backend_giving_wrong_values_fails_the_selftest(tmp_path, monkeypatch, capsys,
                                                          no_triton_interpreter):
    from vcfast.ops import classification

    real = classification._BCE_OP

    def off_by_half(*args):  # the C++ loss, shifted: still differentiable, just wrong
        loss, counts = real(*args)
        return loss + 0.5, counts

    monkeypatch.setattr(classification, "_BCE_OP", off_by_half)
    out = tmp_path / "broken.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--ops", "masked_multigroup_bce",
                 "--json", str(out)]) == 1
    report = _report(out)
    assert report["ok"] is False and report["models"]["rows"] == []
    by_backend = {(r["backend"], r["dtype"]): r for r in report["ops"]}
    for dtype in ("fp32", "bf16"):
        assert by_backend["reference", dtype]["ok"] is True
        broken = by_backend["cpu", dtype]
        assert broken["ok"] is False and broken["exception"] is None
        assert broken["forward_error"] > broken["tolerance"]
    assert "FAIL" in capsys.readouterr().out


@needs_extension
def test_a_backend_that_raises_fails_the_selftest(tmp_path, monkeypatch, no_triton_interpreter):
    from vcfast.ops import classification

    def broken(*args):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(classification, "_SOFTMAX_OP", broken)
    out = tmp_path / "raised.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--ops",
                 "masked_multigroup_softmax_ce", "--json", str(out)]) == 1
    rows = [r for r in _report(out)["ops"] if r["backend"] == "cpu"]
    assert len(rows) == 2
    for row in rows:
        assert row["ok"] is False and row["error"] is None
        assert "kernel launch failed" in row["exception"]


def test_error_is_relative_to_the_largest_reference_value_and_exact_for_bits():
    truth = torch.tensor([4.0, -2.0, 0.0], dtype=torch.float64)
    assert relative_error(torch.tensor([4.0, -2.0, 0.01]), truth) == pytest.approx(0.01 / 4)
    assert relative_error(torch.tensor([4.0, float("nan"), 0.0]), truth) == float("inf")
    assert relative_error(torch.tensor([4.0, -2.0]), truth) == float("inf")  # a wrong shape
    bits = torch.tensor([0b1010_0001, 0xFF], dtype=torch.uint8)
    assert relative_error(bits.clone(), bits) == 0.0
    # One flipped low bit of 255 would be a "relative error" of 1/255 read as numbers: bits
    # are compared exactly instead.
    assert relative_error(bits ^ torch.tensor([0, 1], dtype=torch.uint8), bits) == 1.0


def test_bf16_bound_follows_the_reference_error_up_to_the_cap():
    assert bf16_tolerance(2e-2, None) == 2e-2  # no reference row: the op's own bound
    assert bf16_tolerance(2e-2, 3e-3) == 2e-2  # a precise reference does not loosen it
    assert bf16_tolerance(2e-2, 0.1) == 0.2  # twice what PyTorch reaches in bf16
    assert bf16_tolerance(2e-2, 0.9) == BF16_TOLERANCE_CAP  # a broken reference: capped
    assert bf16_tolerance(2e-2, float("inf")) == 2e-2


def test_selftest_rejects_unknown_checks_and_missing_cuda(capsys):
    assert main(["selftest", "--quick", "--ops", "fft"]) == 2
    assert "unknown check(s) fft" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["selftest", "--device", "cuda", "--quick"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_info_kernels_prints_the_kernel_report(monkeypatch, capsys):
    fake = types.ModuleType("vcfast.aot")
    fake.kernel_report = lambda: {"kernels": ["k"]}
    fake.format_kernel_report = lambda report: f"kernel table: {report['kernels']}"
    monkeypatch.setitem(sys.modules, "vcfast.aot", fake)
    assert main(["info", "--kernels"]) == 0
    assert capsys.readouterr().out.strip() == "kernel table: ['k']"


def test_info_kernels_without_the_report_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vcfast.aot", None)  # None in sys.modules: ImportError
    assert main(["info", "--kernels"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "kernel report is unavailable" in captured.err
