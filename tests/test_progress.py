"""The training progress report (vcfast/train/logs.py ProgressReporter): plain lines when
stderr is not a terminal (CI logs, files), the tqdm bar on a terminal. A fake clock stands in
for time, so nothing here sleeps or depends on how fast the machine is."""

from __future__ import annotations

import io
import re

import pytest

from vcfast.train.logs import DEFAULT_PROGRESS_INTERVAL_S, ProgressReporter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def _losses(step: int) -> dict[str, float]:
    return {"d_loss": step + 0.5, "g_loss": step + 1.5}


def _printed_steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^train: step (\d+)", text, flags=re.MULTILINE)]


def _run(reporter: ProgressReporter, clock: FakeClock, steps, seconds_per_step: float) -> None:
    for step in steps:
        clock.now += seconds_per_step
        reporter.update(step, _losses(step), seconds=seconds_per_step, samples=4)


def test_a_pipe_gets_the_first_step_one_line_per_interval_and_the_last():
    out, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(total=10, stream=out, interval_s=30, clock=clock)
    assert not reporter.uses_bar
    _run(reporter, clock, range(1, 11), seconds_per_step=7.0)
    reporter.close()
    text = out.getvalue()
    assert "\r" not in text
    # step 1 (first) at 7 s; step 6 at 42 s, the first 30 s after it; step 10 (last) at 70 s
    assert _printed_steps(text) == [1, 6, 10]
    # losses of the step, throughput over the steps since the previous line (2..6), elapsed time
    assert text.splitlines()[1] == ("train: step 6/10, d_loss 6.5000, g_loss 7.5000, 7.00 s/step, "
                                    "0.6 samples/s, elapsed 0:00:42")


def test_a_run_stopped_early_prints_its_last_step_when_closed():
    out, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(total=None, desc="train (<= 5 min)", stream=out, interval_s=30,
                                clock=clock)
    _run(reporter, clock, range(1, 4), seconds_per_step=2.0)
    assert _printed_steps(out.getvalue().replace("train (<= 5 min)", "train")) == [1]
    reporter.close()
    reporter.close()  # idempotent: no second copy
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["train (<= 5 min): step 1",
                                                      "train (<= 5 min): step 3"]


def test_a_message_comes_after_the_line_of_its_step():
    out, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(total=100, stream=out, interval_s=30, clock=clock)
    _run(reporter, clock, range(1, 3), seconds_per_step=1.0)
    reporter.write("step 2 eval: accuracy real 0.5")
    _run(reporter, clock, [3], seconds_per_step=1.0)
    reporter.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["train: step 1/100", "train: step 2/100",
                                                      "step 2 eval: accuracy real 0.5",
                                                      "train: step 3/100"]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("VCFAST_PROGRESS_INTERVAL_S", raising=False)
    assert ProgressReporter(total=1, stream=io.StringIO()).interval_s == DEFAULT_PROGRESS_INTERVAL_S
    monkeypatch.setenv("VCFAST_PROGRESS_INTERVAL_S", "0")
    out, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter(total=5, stream=out, clock=clock)
    _run(reporter, clock, range(1, 6), seconds_per_step=0.5)
    assert _printed_steps(out.getvalue()) == [1, 2, 3, 4, 5]
    # explicit wins
    assert ProgressReporter(total=1, stream=io.StringIO(), interval_s=12).interval_s == 12
    monkeypatch.setenv("VCFAST_PROGRESS_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="VCFAST_PROGRESS_INTERVAL_S"):
        ProgressReporter(total=1, stream=io.StringIO())
    with pytest.raises(ValueError, match="interval_s"):
        ProgressReporter(total=1, stream=io.StringIO(), interval_s=-1)
    with pytest.raises(ValueError, match="interval_s"):
        ProgressReporter(total=1, stream=io.StringIO(), interval_s=float("nan"))


def test_a_terminal_keeps_the_bar():
    out, clock = TerminalStream(), FakeClock()
    reporter = ProgressReporter(total=3, stream=out, interval_s=30, clock=clock)
    assert reporter.uses_bar
    _run(reporter, clock, range(1, 4), seconds_per_step=1.0)
    reporter.close()
    text = out.getvalue()
    assert "\r" in text and "3/3" in text  # tqdm redraws in place
    assert _printed_steps(text) == []


def test_the_bar_can_be_refused_on_a_terminal_and_nothing_is_reported_when_disabled():
    out, clock = TerminalStream(), FakeClock()
    plain = ProgressReporter(total=2, stream=out, bar=False, clock=clock)
    _run(plain, clock, range(1, 3), seconds_per_step=1.0)
    plain.close()
    assert (not plain.uses_bar and "\r" not in out.getvalue()
            and _printed_steps(out.getvalue()) == [1, 2])
    silent_out = TerminalStream()
    silent = ProgressReporter(total=2, stream=silent_out, enabled=False, clock=clock)
    _run(silent, clock, range(1, 3), seconds_per_step=1.0)
    silent.write("message")
    silent.close()
    assert silent_out.getvalue() == ""
