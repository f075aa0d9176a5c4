"""scripts/gpu_validate.sh --dry-run: the GPU check's plumbing (steps, logs, summary) on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_validate.sh"
STEPS = ["wheels", "build", "cpp_errors", "selftest", "gpu_tests", "memory_estimator",
         "layouts_batch16", "train_50_steps", "bench", "test_suite"]
RUN_ON_CPU = {"cpp_errors", "selftest", "memory_estimator", "test_suite"}


def _run(*args, timeout=300):
    # The same interpreter as the tests, whatever `python` is on PATH.
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_dry_run_logs_every_step_and_summarises_them(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    result = _run("--dry-run", "--wheels", str(wheels), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [row[0] for row in rows] == STEPS
    status = {row[0]: row[1] for row in rows}
    # What a CPU can run runs and passes; the GPU-sized rest is printed.
    assert {name for name, s in status.items() if s == "pass"} == RUN_ON_CPU
    assert all(s == "printed (dry run)" for name, s in status.items() if name not in RUN_ON_CPU)
    for number, row in enumerate(rows, start=1):
        log = Path(row[5])
        assert log.name == f"{number:02d}_{row[0]}.log" and log.read_text().strip()
    assert "pip install --no-build-isolation --no-deps" in (out / "02_build.log").read_text()
    assert f"--find-links {wheels}" in (out / "01_wheels.log").read_text()

    summary = (out / "summary.md").read_text()
    assert "| # | step | status | seconds | result | log |" in summary
    for step in STEPS:
        assert f"| {step} |" in summary
    assert "checks passed" in summary  # the selftest's own verdict line, read from its log
    assert "all steps passed" in summary
    selftest = json.loads((out / "selftest.json").read_text())
    assert selftest["ok"] is True and selftest["conditions"]["triton_interpret"] is False
    cpp_errors = json.loads((out / "cpp_errors.json").read_text())
    assert cpp_errors["ok"] is True and all(c["outcome"] == "raised" for c in cpp_errors["cases"])
    memory = json.loads((out / "memory_estimator.json").read_text())
    assert memory["rows"][0]["measured_bytes"] > 0 and memory["rows"][0]["estimated_bytes"] > 0


def test_bad_arguments_stop_before_any_step(tmp_path):
    result = _run("--dry-run", "--wheels", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "is not a directory" in result.stderr
    assert not (tmp_path / "o").exists()
    result = _run("--frobnicate", timeout=30)
    assert result.returncode == 2 and "unknown argument --frobnicate" in result.stderr
